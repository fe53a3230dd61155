"""The server under HTTP load, this tree against another checkout (a `git worktree` of an earlier revision),
alternated in one run: did a change to the engine move the HTTP figures?

Each round starts `python -m serving` from each tree in turn (WARMUP=all, the same random 124M-shaped fp32
checkpoint and synthetic vocabulary as bench_engine_http.py) and sends 16 and then 32 concurrent streamed
requests (32 prompt tokens, 64 new tokens, greedy, end-of-text banned): 16 fill the 16 slots, 32 keep a
queue. Prints tok/s and time to first token p50 per tree, load and round.

    git worktree add /tmp/before <rev>
    python benchmarks/bench_http_ab.py --before /tmp/before [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_engine import make_requests, synthetic_tokenizer  # noqa: E402
from bench_engine_http import free_port, http_load, wait_healthy  # noqa: E402
from common import gpt2_124m, machine, random_params  # noqa: E402

from gpt2jax.checkpoint_save import save_params  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the other checkout's root folder")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    config = gpt2_124m()
    requests = make_requests(32, 32, 64, config.n_vocab)
    trees = {"before": str(Path(args.before).resolve()), "this tree": str(HERE.parent)}
    rows: dict[tuple[str, int], list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-124m-random"
        save_params(folder, config, random_params(config))
        synthetic_tokenizer(config.n_vocab)._tok.save(str(folder / "tokenizer.json"))
        for _ in range(args.rounds):
            for name, tree in trees.items():
                port = free_port()
                base = f"http://127.0.0.1:{port}"
                env = {**os.environ, "MODELS": str(folder), "PORT": str(port), "MAX_N": "1", "WARMUP": "all"}
                env.update(LOG_LEVEL="WARNING", MAX_TOKENS="64", PYTHONPATH=tree)
                proc = subprocess.Popen([sys.executable, "-m", "serving"], env=env, cwd=tree)
                try:
                    wait_healthy(base, proc)
                    eos = config.eos_token_id
                    asyncio.run(http_load(base, folder.name, requests[:1], 1, eos))  # one-off costs
                    for n in (16, 32):
                        r = asyncio.run(http_load(base, folder.name, requests[:n], n, eos))
                        rows.setdefault((name, n), []).append(f"{r.tok_per_s:.1f} / {r.ttft_ms(50):.0f}")
                        print(name, n, rows[name, n][-1], flush=True)
                finally:
                    proc.terminate()
                    proc.wait(60)
    print(f"\n{machine()}; tok/s / TTFT p50 ms per round; load average {os.getloadavg()}\n")
    print("| tree | concurrent | rounds |\n|---|---|---|")
    for (name, n), runs in rows.items():
        print(f"| {name} | {n} | {', '.join(runs)} |")


if __name__ == "__main__":
    main()
