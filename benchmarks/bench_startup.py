"""Start-up time and resident memory of the real server, per KV-cache dtype, cold and warm.

A 124M-shaped model with random fp32 weights and a synthetic byte-level vocabulary (as in
bench_engine_http.py) is saved to a temporary folder and served by `python -m serving` (16 slots,
n_ctx 1,024). For each KV_CACHE_DTYPE: a cold start (an empty JAX_CACHE_DIR), then a warm one (the cache
the cold one filled). Each start is timed from launching the process to `/health` 200; then one short
completion is sent, the background warm-up is awaited (its log line), and the process's resident memory
(VmRSS) and its peak (VmHWM) are read from /proc; `--bursts N` then sends N bursts of 16 concurrent
streamed completions (as bench_engine_http.py's) and reads VmRSS after each. Optionally the shipped
checkpoints/pydoc-tiny too.

    python benchmarks/bench_startup.py                      # float32 and bfloat16 KV, cold + warm
    python benchmarks/bench_startup.py --kv bfloat16 --shipped --env DTYPE=bfloat16
    python benchmarks/bench_startup.py --kv bfloat16 --env DTYPE=bfloat16 --bursts 2   # memory under load
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import gpt2_124m, machine, random_params  # noqa: E402
from benchmarks.server_process import SHIPPED_MODEL, ServerProcess  # noqa: E402

BACKGROUND_DONE = "compiled in the background"


def status_kib(pid: int, field: str) -> int:
    """A memory field of /proc/PID/status (VmRSS, VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def one_start(
    folder: Path,
    cache_dir: Path,
    env: dict[str, str],
    log: Path,
    settle: float,
    max_wait: float,
    bursts: int = 0,
) -> dict:
    """Starts a server, times /health 200, sends one request, waits for the background warm-up, reads
    its memory, then sends `bursts` bursts of 16 concurrent streamed completions (32-token prompts, 64
    tokens each) and reads it after each; returns the figures."""
    server_env = {"MODELS": str(folder), "JAX_CACHE_DIR": str(cache_dir), "LOG_LEVEL": "INFO", **env}
    log.write_bytes(b"")
    srv = ServerProcess(server_env, log_path=log)
    start = time.monotonic()
    with srv.start():
        ready = srv.wait_healthy(timeout=900)
        rss_ready = srv.rss_kib()
        body = {"model": folder.name, "prompt": [10, 20, 30], "max_tokens": 8, "temperature": 0}
        status, _ = srv.get("/v1/completions", timeout=600, body=body)
        first = time.monotonic() - start - ready
        deadline = time.monotonic() + max_wait
        while env.get("WARMUP") != "all" and BACKGROUND_DONE not in srv.log_text():
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        finished = env.get("WARMUP") == "all" or BACKGROUND_DONE in srv.log_text()
        all_compiled = time.monotonic() - start if finished else float("nan")
        time.sleep(settle)
        figures = {
            "ready_s": ready,
            "request_status": status,
            "first_request_s": first,
            "all_compiled_s": all_compiled,
            "rss_ready_mib": rss_ready / 1024,
            "rss_mib": status_kib(srv.pid, "VmRSS") / 1024,
            "peak_mib": status_kib(srv.pid, "VmHWM") / 1024,
        }
        figures["rss_bursts_mib"] = rss_after_bursts(srv, folder, bursts, settle)
        cache_lines = [line for line in srv.log_text().splitlines() if "compile cache:" in line]
        figures["cache"] = [line.split("compile cache: ")[1].rstrip(")") for line in cache_lines]
        srv.terminate()
    return figures


def rss_after_bursts(srv: ServerProcess, folder: Path, bursts: int, settle: float) -> list[float]:
    """VmRSS (MiB) after each of `bursts` bursts of 16 concurrent 64-token completions, `settle` s after."""
    import asyncio
    import json

    from benchmarks.bench_engine import make_requests
    from benchmarks.bench_engine_http import http_load

    config = json.loads((folder / "config.json").read_text())
    n_vocab, eos = config.get("vocab_size", config.get("n_vocab")), config.get("eos_token_id", -1)
    rss = []
    for i in range(bursts):
        requests = make_requests(16, 32, 64, n_vocab, seed=i + 1)
        asyncio.run(http_load(srv.url, folder.name, requests, 16, eos))
        time.sleep(settle)
        rss.append(status_kib(srv.pid, "VmRSS") / 1024)
    return rss


def save_random_124m(folder: Path) -> None:
    from benchmarks.bench_engine import synthetic_tokenizer
    from gpt2jax.checkpoint_save import save_params

    config = gpt2_124m()
    save_params(folder, config, random_params(config))
    synthetic_tokenizer(config.n_vocab)._tok.save(str(folder / "tokenizer.json"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv", default="float32,bfloat16", help="KV_CACHE_DTYPE values, comma list")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server, repeatable")
    parser.add_argument("--shipped", action="store_true", help="also time the shipped pydoc-tiny")
    parser.add_argument("--no-124m", action="store_true", help="only the shipped model")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before reading memory")
    parser.add_argument(
        "--bursts", type=int, default=0, help="then bursts of 16 concurrent completions, RSS after each"
    )
    parser.add_argument(
        "--max-wait", type=float, default=1800, help="seconds to wait for the background compile"
    )
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.env)
    extra.setdefault("SLOTS", "16")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = [] if args.no_124m else [tmp / "gpt2-124m-random"]
        if models:
            save_random_124m(models[0])
        if args.shipped:
            models.append(SHIPPED_MODEL)
        for folder in models:
            for kv in args.kv.split(","):
                cache_dir = tmp / f"jax-cache-{folder.name}-{kv}"
                for label in ("cold", "warm"):
                    env = {**extra, "KV_CACHE_DTYPE": kv}
                    log = tmp / "server.log"
                    f = one_start(folder, cache_dir, env, log, args.settle, args.max_wait, args.bursts)
                    rows.append((folder.name, kv, label, f))
                    print(folder.name, kv, label, f, flush=True)
    print(f"\nServer start-up and memory; {machine()}; load average {os.getloadavg()}; env {extra}\n")
    print(
        "| model | KV cache | start | /health 200 | first request | all compiled | RSS ready | RSS after "
        "| peak | RSS after bursts | compile cache (ready; background) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, kv, label, f in rows:
        print(
            f"| {name} | {kv} | {label} | {f['ready_s']:.1f} s | {f['first_request_s']:.1f} s "
            f"| {f['all_compiled_s']:.0f} s | {f['rss_ready_mib']:.0f} MiB | {f['rss_mib']:.0f} MiB "
            f"| {f['peak_mib']:.0f} MiB | {' / '.join(f'{r:.0f}' for r in f['rss_bursts_mib']) or '-'} "
            f"| {'; '.join(f['cache'])} |"
        )


if __name__ == "__main__":
    main()
