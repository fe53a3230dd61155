"""The server under load, through HTTP: 16 concurrent streamed completions vs the same one after another.

A 124M-shaped model with random fp32 weights and a synthetic byte-level vocabulary (as in bench_engine.py)
is saved to a temporary folder and served by the real server (`python -m serving`, Hypercorn + the
batching engine) on loopback. Each request: 32 prompt token ids, 64 new tokens, greedy, end-of-text
banned with logit_bias (so every request makes exactly 64 tokens), streamed with usage. Compared in one
run: 16 requests at once; the first --sequential of them one after another (rate per token); and HF
transformers' PyTorch `generate` at batch 8 on the same weights. Time to first token is from sending the
request to the first streamed text.

    python benchmarks/bench_engine_http.py          # a few minutes, most of it the server's warm-up
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_engine import drive, hf_load, make_requests, synthetic_tokenizer  # noqa: E402
from benchmarks.common import gpt2_124m, hf_model, machine, random_params  # noqa: E402
from gpt2jax.checkpoint_save import save_params  # noqa: E402
from gpt2jax.engine.api import Event, GenerationRequest  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy")


async def http_load(base: str, model: str, requests: list[GenerationRequest], concurrency: int, eos: int):
    """bench_engine.drive over HTTP: each streamed chunk becomes an engine Event."""
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)

    async def stream(r: GenerationRequest) -> AsyncIterator[Event]:
        chunks = await client.completions.create(
            model=model,
            prompt=list(r.prompt),
            max_tokens=r.params.max_tokens,
            temperature=0,
            logit_bias={str(eos): -100},
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in chunks:
            text = chunk.choices[0].text if chunk.choices else ""
            used = chunk.usage.completion_tokens if chunk.usage else 0
            yield Event(index=0, text=text, completion_tokens=used)

    try:
        return await drive(stream, requests, concurrency)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--sequential", type=int, default=4, help="requests timed one after another")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hf-batch", type=int, default=8)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    config = gpt2_124m()
    params = random_params(config)
    tokenizer = synthetic_tokenizer(config.n_vocab)
    requests = make_requests(args.requests, 32, args.new_tokens, config.n_vocab)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-124m-random"
        save_params(folder, config, params)
        tokenizer._tok.save(str(folder / "tokenizer.json"))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "MODELS": str(folder), "PORT": str(port), "MAX_N": "1", "LOG_LEVEL": "WARNING"}
        env["WARMUP"] = "all"  # load, not compile: every program compiled before /health is 200
        env["MAX_TOKENS"] = str(args.new_tokens)
        proc = subprocess.Popen([sys.executable, "-m", "serving"], env=env)
        try:
            t = time.perf_counter()
            wait_healthy(base, proc)
            print(f"server healthy after {time.perf_counter() - t:.0f} s (warm-up)", flush=True)
            name, eos = folder.name, config.eos_token_id
            asyncio.run(http_load(base, name, requests[:1], 1, eos))  # first request's one-off costs
            rows = {
                f"HTTP, {args.requests} concurrent": asyncio.run(
                    http_load(base, name, requests, args.requests, eos)
                ),
                "HTTP, one after another": asyncio.run(
                    http_load(base, name, requests[: args.sequential], 1, eos)
                ),
            }
        finally:
            proc.terminate()
            proc.wait(60)
    rows[f"HF transformers generate, batch {args.hf_batch}"] = hf_load(
        hf_model(config, params), requests, args.hf_batch
    )
    base_rate = rows["HTTP, one after another"].tok_per_s
    hf = rows[f"HF transformers generate, batch {args.hf_batch}"].tok_per_s
    print(
        f"\nServer load over HTTP, GPT-2 124M shapes, fp32 random weights, 32-token prompts + {args.new_tokens}"
    )
    print(f"new tokens, greedy, streamed; {machine()}; load average {os.getloadavg()}\n")
    print("| run | tok/s | vs one after another | vs HF | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(
            f"| {label} | {r.tok_per_s:.1f} | {r.tok_per_s / base_rate:.2f}x | {r.tok_per_s / hf:.2f}x "
            f"| {r.ttft_ms(50):.0f} | {r.ttft_ms(99):.0f} |"
        )


if __name__ == "__main__":
    main()
