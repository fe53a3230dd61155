"""Engines for the HTTP tests (implementing gpt2jax.engine.api.Engine), and a real server to run them in.

FakeEngine: a real LanguageModel, one request at a time, all tokens of a request sampled in one call and
then handed out as events, so its outputs are the model's own (stop strings, logprobs, echo scores).
ScriptedEngine: no model; every choice is a fixed reply, for fast tests of the HTTP layer.
ServerThread: the production serve() (Hypercorn, loading, warm-up, graceful stop) in a background thread.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from waits import HANG

from gpt2jax import sampling
from gpt2jax.engine.api import EngineError, EngineOverloaded, Event, GenerationRequest, TokenLogprob
from gpt2jax.engine.choice import choice_for, find_stop
from gpt2jax.lm import LanguageModel
from gpt2jax.sampling_params import derive_seed
from gpt2jax.tokenizer import GPT2Tokenizer


def events_for(
    tok: GPT2Tokenizer, index: int, tokens: Sequence[TokenLogprob], request: GenerationRequest, eos: int
) -> list[Event]:
    """Events of one choice from its sampled tokens, made by the engine's own ChoiceStream."""
    choice, events = choice_for(tok, request, index, eos), []
    for t in tokens:
        top_ids = np.array([i for i, _, _ in t.top], np.int32)
        top_lps = np.array([lp for _, _, lp in t.top], np.float32)
        choice.push(t.token, t.logprob, top_ids, top_lps)
        if (event := choice.take_event()) is not None:
            events.append(event)
        if choice.finished:
            break
    choice.end("length")
    if (event := choice.take_event()) is not None:
        events.append(event)
    return events


class FakeEngine:
    """The Engine protocol on a LanguageModel: one request at a time, events after the whole sampling.

    Every call uses the same compiled shapes (batch `rows`, KV cache n_ctx) by adding dummy rows whose
    max_tokens fills the context and that are stopped at once, so tests compile once per prompt bucket.
    """

    def __init__(self, model: LanguageModel, name: str | None = None, rows: int = 8) -> None:
        self.model = model
        self.name = name or model.name
        self.n_ctx = model.config.n_ctx
        self.tokenizer = model.tokenizer
        self.rows = rows
        self.requests: list[GenerationRequest] = []
        self.overloaded = False  # tests set this to see a 429
        self._lock = asyncio.Lock()

    def start(self) -> None:
        pass

    def stop(self, drain: bool = True) -> None:
        pass

    def warmup(self) -> None:
        self._run(GenerationRequest.of(prompt=(self.model.config.eos_token_id,), max_tokens=2))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        self.requests.append(request)
        if self.overloaded:
            raise EngineOverloaded("fake engine: overloaded")
        if len(request.prompt) + request.params.max_tokens > self.n_ctx:
            raise EngineError(f"prompt + max_tokens exceeds the context length {self.n_ctx}")
        async with self._lock:
            choices = await asyncio.to_thread(self._run, request)
        for events in choices:
            for event in events:
                yield event

    def _token(self, token: int, logprob: float | None, top_ids=(), top_lps=(), k: int = 0) -> TokenLogprob:
        tok = self.tokenizer
        top = tuple(
            (int(i), tok.token_str(int(i)), float(lp))
            for i, lp in list(zip(top_ids, top_lps, strict=True))[:k]
        )
        return TokenLogprob(int(token), tok.token_str(int(token)), logprob, top)

    def _run(self, r: GenerationRequest) -> list[list[Event]]:
        cfg, tok = self.model.config, self.tokenizer
        rows = r.params.candidates
        batch = max(self.rows, rows + 1)
        seed = secrets.randbits(63) if r.params.seed is None else r.params.seed
        sp = sampling.tensors_from(
            [r.params.replace(seed=derive_seed(seed, i)) for i in range(batch)], cfg.n_vocab
        )
        limits = [r.params.max_tokens] * rows + [self.n_ctx - len(r.prompt)] * (batch - rows)

        def should_stop(row: int, ids: list[int]) -> bool:
            return row >= rows or (
                bool(r.params.stop) and find_stop(tok.decode(ids).lstrip(r.strip_leading), r.params.stop) >= 0
            )

        result = self.model.sampler.generate(
            self.model.params,
            [list(r.prompt)] * batch,
            limits,
            sp,
            logprobs=r.params.logprobs is not None,
            should_stop=should_stop,
        )
        k = r.params.logprobs or 0
        choices = []
        for row in range(rows):
            toks = [
                self._token(t, lp, ti, tl, k)
                for t, lp, ti, tl in zip(
                    result.tokens[row],
                    result.logprobs[row],
                    result.top_tokens[row],
                    result.top_logprobs[row],
                    strict=True,
                )
            ]
            events = events_for(tok, row, toks, r, cfg.eos_token_id)
            mean = float(np.mean([t.logprob for t in toks])) if toks else 0.0
            choices.append((mean, events))
        if r.params.best_of:  # the n with the best mean token logprob, renumbered
            choices = sorted(choices, key=lambda c: -c[0])[: r.params.n]
            choices = [
                (m, [Event(**{**e.__dict__, "index": i}) for e in ev]) for i, (m, ev) in enumerate(choices)
            ]
        out = [events for _, events in choices]
        if r.params.prompt_logprobs:
            scores = self.model.score_ids([list(r.prompt)])[0]
            prompt = tuple(
                self._token(
                    t,
                    None if j == 0 else float(scores.logprob[j]),
                    scores.top_tokens[j],
                    scores.top_logprobs[j],
                    0 if j == 0 else k,
                )
                for j, t in enumerate(r.prompt)
            )
            out = [[Event(**{**ev[0].__dict__, "prompt": prompt}), *ev[1:]] for ev in out]
        return out


class ScriptedEngine:
    """Every choice answers `reply` (cut at max_tokens and stop strings), one event per token; records requests."""

    def __init__(
        self,
        tokenizer: GPT2Tokenizer,
        name: str = "scripted",
        n_ctx: int = 128,
        reply: str = " lorem ipsum dolor",
    ) -> None:
        self.name, self.n_ctx, self.tokenizer, self.reply = name, n_ctx, tokenizer, reply
        self.requests: list[GenerationRequest] = []
        self.error: Exception | None = None  # raised before the first event when set
        self.fail_after_first: Exception | None = None  # raised after the first event when set
        self.delay = 0.0  # seconds before each event
        self.open_streams = 0  # generate() calls not finished or closed yet
        self.events_sent = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        tok = self.tokenizer
        ids = tok.encode(self.reply)[: request.params.max_tokens]
        if len(ids) < request.params.max_tokens:  # the reply ended: as if the model sampled end-of-text
            ids.append(tok.eos_token_id)
        k = request.params.logprobs or 0
        toks = [
            TokenLogprob(
                t, tok.token_str(t), -1.0, tuple((t, tok.token_str(t), -1.0) for _ in range(min(k, 1)))
            )
            for t in ids
        ]
        prompt = ()
        if request.params.prompt_logprobs:
            prompt = tuple(
                TokenLogprob(t, tok.token_str(t), None if j == 0 else -2.0)
                for j, t in enumerate(request.prompt)
            )
        self.open_streams += 1
        try:
            for i in range(request.params.n):
                for j, event in enumerate(events_for(tok, i, toks, request, tok.eos_token_id)):
                    if j == 0 and prompt:
                        event = Event(**{**event.__dict__, "prompt": prompt})
                    await asyncio.sleep(self.delay)
                    self.events_sent += 1
                    yield event
                    if self.fail_after_first is not None:
                        raise self.fail_after_first
        finally:  # also when the HTTP layer closes the stream (the client went away)
            self.open_streams -= 1


def call(app, method: str, path: str, **kwargs) -> tuple[int, Any, str]:
    """One request through the app's in-process test client: (status, headers (case-insensitive), body)."""

    async def go():
        response = await app.test_client().open(path, method=method, **kwargs)
        return response.status_code, response.headers, await response.get_data(as_text=True)

    return asyncio.run(go())


def sse_payloads(body: str) -> list:
    """The JSON payloads of an SSE body, then "[DONE]" if it ended so."""
    out = []
    for block in body.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def make_app(engines: dict, **settings: object):
    """The real app over `engines` (name -> engine), with Settings fields overridden by `settings`."""
    from serving.app import create_app
    from serving.settings import Settings

    return create_app(Settings(**settings), engines)


class ServerThread:
    """serving.__main__.serve on a free loopback port, in a thread with its own event loop."""

    def __init__(self, settings, registry, build=None) -> None:
        self.settings, self.registry, self.build = settings, registry, build
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.exit_code: int | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        from serving.__main__ import serve

        async def run() -> int:
            self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            kwargs = {"build": self.build} if self.build is not None else {}
            return await serve(self.settings, self.registry, stop=self.stop, sock=self.sock, **kwargs)

        self.exit_code = asyncio.run(run())

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(HANG)
        return self

    def get(self, path: str, timeout: float = HANG) -> tuple[int, dict]:
        """GET path -> (status, JSON body); (0, {}) while nothing listens yet."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except (ConnectionError, urllib.error.URLError):
            return 0, {}

    def post(self, path: str, body: dict, timeout: float = HANG) -> tuple[int, dict]:
        """POST a JSON body -> (status, JSON body)."""
        request = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_for(self, predicate, timeout: float = HANG, what: str = "") -> None:
        """Polls (no fixed sleeps) until predicate() is true."""
        deadline = time.monotonic() + timeout
        while not predicate():
            # A server that ended between the check and here may have made the predicate true (its exit code).
            if time.monotonic() > deadline or (not self._thread.is_alive() and not predicate()):
                raise TimeoutError(f"server at {self.url}: gave up waiting for {what or predicate}")
            time.sleep(0.05)

    def shutdown(self, timeout: float = HANG) -> int | None:
        """Sets the stop event (as SIGTERM does) and waits for serve() to return its exit code."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop.set)
            self._thread.join(timeout)
        self.sock.close()
        return self.exit_code
