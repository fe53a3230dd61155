"""What real clients found (issue 12), through a real server on the production engine.

Models: the shipped `pydoc-tiny`, and `rand-small` (random weights, GPT-2's own vocabulary: end-of-text is
50256). Each case is the smallest input seen failing, with the value it must give; references are the
OpenAI API's documented shapes, lm-evaluation-harness's own response parser, and Hugging Face
transformers' PyTorch GPT-2 on the same weights.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fake_engine import ServerThread
from waits import HANG

from serving.loading import registry_for
from serving.settings import Settings

SHIPPED = Path(__file__).parents[1] / "checkpoints" / "pydoc-tiny"
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def server(rand_small):
    from gpt2jax.engine.engine import BatchEngine

    settings = Settings(max_n=4, max_tokens=256)
    registry = registry_for([SHIPPED, Path(rand_small)], settings)

    def build(model, _settings):
        engine = BatchEngine.from_model(model, slots=4)
        engine.warmup = lambda: BatchEngine.warmup(engine, buckets=(16,))
        return engine

    srv = ServerThread(settings, registry, build).start()
    try:
        srv.wait_for(lambda: srv.get("/health")[0] == 200, HANG, "/health 200")
        yield srv
    finally:
        assert srv.shutdown() == 0


def post(server, path: str, body: dict) -> tuple[int, dict]:
    return server.post(path, body)


def stream(server, path: str, body: dict) -> list[dict]:
    """The data chunks of a streamed response, [DONE] excluded."""
    request = urllib.request.Request(
        server.url + path, json.dumps(body | {"stream": True}).encode(), {"Content-Type": "application/json"}
    )
    chunks = []
    with urllib.request.urlopen(request, timeout=HANG) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def completion(server, **body) -> dict:
    status, r = post(server, "/v1/completions", body)
    assert status == 200, r
    return r


def streamed_completion(server, **body) -> tuple[str, dict]:
    """Joins a streamed completion's text and legacy logprobs, as a client would."""
    text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in stream(server, "/v1/completions", body):
        for choice in c["choices"]:
            text += choice["text"]
            for key in lp:
                lp[key] += (choice["logprobs"] or {}).get(key, [])
    return text, lp


# ---- 1. every generated token has its logprobs entry, end-of-text included ----


def test_end_of_text_has_its_logprobs_entry(server):
    body = {"model": "rand-small", "prompt": "The quick", "max_tokens": 3, "logprobs": 1, "temperature": 0}
    r = completion(server, **body, logit_bias={"50256": 100})
    choice = r["choices"][0]
    assert r["usage"]["completion_tokens"] == 1 and choice["finish_reason"] == "stop"
    assert choice["text"] == "" and choice["logprobs"]["tokens"] == [EOS]
    assert choice["logprobs"]["text_offset"] == [len("The quick")]
    assert EOS in choice["logprobs"]["top_logprobs"][0]
    text, lp = streamed_completion(server, **body, logit_bias={"50256": 100})
    assert text == "" and lp["tokens"] == [EOS] and lp["text_offset"] == [len("The quick")]


@pytest.mark.parametrize("streamed", [False, True])
def test_a_natural_end_of_text_is_listed(server, streamed):
    prompt = 'The "pass" statement'
    body = {"model": "pydoc-tiny", "prompt": prompt, "max_tokens": 200, "seed": 8, "logprobs": 1}
    r = completion(server, **body)
    n = r["usage"]["completion_tokens"]
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and n < 200  # this seed ends with end-of-text
    text, lp = streamed_completion(server, **body) if streamed else (choice["text"], choice["logprobs"])
    assert text == choice["text"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["tokens"][-1] == EOS and EOS not in text
    assert "".join(lp["tokens"][:-1]) == text
    assert lp["text_offset"][-1] == len(prompt) + len(text)


def test_lm_eval_harness_scores_a_continuation_that_ends_the_document(server, rand_small):
    """lm-evaluation-harness's local-completions loglikelihood request, parsed by its own code, against
    Hugging Face's PyTorch GPT-2 on the same weights. The forced next token is end-of-text: before the fix
    its entry was missing and the harness dropped a real continuation token."""
    import torch
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from transformers import GPT2LMHeadModel

    from gpt2jax.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer.from_dir(rand_small)
    context, continuation = tok.encode("The capital of France is"), tok.encode(" Paris, of course")
    ids = context + continuation
    # The payload the harness sends for a loglikelihood request (LocalCompletionsAPI._create_payload).
    api = LocalCompletionsAPI.__new__(LocalCompletionsAPI)
    api.model = "rand-small"
    payload = LocalCompletionsAPI._create_payload(api, [ids], generate=False)
    assert payload["echo"] and payload["max_tokens"] == 1 and payload["logprobs"] == 1
    r = completion(server, **payload | {"logit_bias": {"50256": 100}})
    assert r["choices"][0]["logprobs"]["tokens"][-1] == EOS
    [(logprob, greedy)] = LocalCompletionsAPI.parse_logprobs(r, ctxlens=[len(context)])

    hf = GPT2LMHeadModel.from_pretrained(rand_small).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    lps = torch.log_softmax(logits, -1)
    want = sum(float(lps[i - 1, ids[i]]) for i in range(len(context), len(ids)))
    want_greedy = all(int(lps[i - 1].argmax()) == ids[i] for i in range(len(context), len(ids)))
    assert math.isclose(logprob, want, abs_tol=1e-3 * len(continuation)), (logprob, want)
    assert greedy == want_greedy


# ---- 2. the chosen token is among top_logprobs ----


@pytest.mark.parametrize("k", [0, 1])
def test_top_logprobs_hold_the_sampled_token(server, k):
    body = {"model": "pydoc-tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 1.5, "seed": 3}
    r = completion(server, **body, logprobs=k, echo=True)
    lp = r["choices"][0]["logprobs"]
    assert lp["top_logprobs"][0] is None  # the first prompt token has no logprob
    for token, logprob, top in zip(
        lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True
    ):
        assert top[token] == logprob and len(top) <= k + 1
        assert k == 0 or max(top.values()) >= logprob
        assert k > 0 or list(top) == [token]


# ---- 3, 4, 5. chat: stops and logprobs apply to the content the client sees; top_logprobs up to 20 ----

CHAT = {
    "model": "pydoc-tiny",
    "messages": [{"role": "user", "content": "What is Deep Learning?"}],
    "max_tokens": 8,
    "top_p": 0.5,
    "seed": 1,
}


def chat(server, **body) -> dict:
    status, r = post(server, "/v1/chat/completions", CHAT | body)
    assert status == 200, r
    return r


def streamed_chat(server, **body) -> tuple[str, list[dict]]:
    content, entries = "", []
    for c in stream(server, "/v1/chat/completions", CHAT | body):
        for choice in c["choices"]:
            content += choice["delta"].get("content") or ""
            entries += (choice["logprobs"] or {}).get("content", [])
    return content, entries


@pytest.mark.parametrize("stop", [" ", " T", " The ", '"'])
def test_chat_stop_strings_match_the_content(server, stop):
    reply = chat(server)["choices"][0]["message"]["content"]
    assert reply and not reply.startswith(" ")
    want = reply[: reply.find(stop)] if stop in reply else reply
    assert chat(server, stop=[stop])["choices"][0]["message"]["content"] == want
    assert streamed_chat(server, stop=[stop])[0] == want


def test_chat_logprobs_join_to_the_content(server):
    for seed in range(4):
        r = chat(server, seed=seed, logprobs=True, max_tokens=16)
        choice = r["choices"][0]
        content, entries = choice["message"]["content"], choice["logprobs"]["content"]
        assert "".join(e["token"] for e in entries) == content
        assert b"".join(bytes(e["bytes"]) for e in entries) == content.encode()
        assert streamed_chat(server, seed=seed, logprobs=True, max_tokens=16) == (content, entries)


def test_chat_top_logprobs_up_to_20(server):
    entries = chat(server, logprobs=True, top_logprobs=20)["choices"][0]["logprobs"]["content"]
    for e in entries:
        assert len(e["top_logprobs"]) == 20
        values = [t["logprob"] for t in e["top_logprobs"]]
        assert values == sorted(values, reverse=True) and e["logprob"] <= values[0]
    status, r = post(server, "/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 21})
    assert status == 400 and r["error"]["param"] == "top_logprobs"


# ---- 6. best_of counts every candidate ----


def test_best_of_usage_counts_every_candidate(server):
    body = {"model": "rand-small", "prompt": "Hi", "n": 2, "best_of": 3, "max_tokens": 5}
    r = completion(server, **body, logit_bias={"50256": -100})
    assert len(r["choices"]) == 2 and r["usage"]["completion_tokens"] == 15


# ---- 7. a character split between a token-id prompt and the completion ----


def test_completion_finishes_the_prompts_last_character(server):
    body = {"model": "rand-small", "prompt": [447], "max_tokens": 1, "temperature": 0, "logprobs": 0}
    r = completion(server, **body, logit_bias={"247": 100})  # b"\xe2\x80" + b"\x99" = U+2019
    choice = r["choices"][0]
    assert choice["text"] == "\u2019" and choice["logprobs"]["text_offset"] == [0]
    assert streamed_completion(server, **body, logit_bias={"247": 100})[0] == "\u2019"
    echoed = completion(server, **body, logit_bias={"247": 100}, echo=True)["choices"][0]
    assert echoed["text"] == "\u2019" and echoed["logprobs"]["text_offset"] == [0, 0]
    scored = completion(server, **body | {"max_tokens": 0}, echo=True)["choices"][0]
    assert scored["text"] == "\ufffd"  # nothing finished it


# ---- 9. streaming: one event per token ----


def test_streaming_sends_one_token_per_event(server):
    body = {"model": "rand-small", "prompt": "Once", "max_tokens": 32, "logprobs": 0, "seed": 5}
    chunks = stream(server, "/v1/completions", body | {"logit_bias": {"50256": -100}})
    counts = [len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks if c["choices"]]
    assert sum(counts) == 32 and max(counts) == 1, counts
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert len(texts) >= 32
