"""Property-based fuzzing of the whole API from its own /openapi.json, with schemathesis.

Starts the real server (`python -m serving`, the shipped model, an API key) on loopback, or uses --url,
and runs schemathesis's CLI over every operation with these checks:
  not_a_server_error            no 5xx, ever
  openai_error_envelope         every error is {"error": {"message", "type", "param", "code"}} (fuzz_hooks.py)
  status_code_conformance       only the statuses the spec documents
  content_type_conformance      only the content types the spec documents
  response_schema_conformance   bodies (and each streamed event) match the spec's schemas
then checks that /health still answers 200. Prints the statuses seen and exits 1 on any failure.

    python benchmarks/fuzz_api.py                         # the long run: 300 examples per operation
    python benchmarks/fuzz_api.py --max-examples 20       # what CI runs (tests/test_fuzz_api.py)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.server_process import ServerProcess  # noqa: E402

CHECKS = (
    "not_a_server_error",
    "openai_error_envelope",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
KEY = "sk-fuzz-key"
# Small generations keep the run about the HTTP layer, not the model's speed.
SERVER_ENV = {"API_KEYS": KEY, "MAX_TOKENS": "8", "MAX_N": "2", "MAX_PROMPTS": "4", "MAX_BODY_BYTES": "65536"}


@dataclass
class FuzzResult:
    returncode: int  # schemathesis's: 0 when no check failed
    output: str  # what it printed
    statuses: dict[str, int]  # status -> responses
    seconds: float

    @property
    def summary(self) -> str:
        lines = [
            ln for ln in self.output.splitlines() if "generated" in ln or ln.strip().startswith(("❌", "✅"))
        ]
        return "\n".join(lines)


def run_schemathesis(
    url: str,
    key: str | None,
    *,
    max_examples: int,
    seed: int | None = None,
    phases: str = "examples,coverage,fuzzing,stateful",
    workers: int = 1,
    max_time: float | None = None,
) -> FuzzResult:
    """Runs `schemathesis run` against url's /openapi.json with CHECKS and the envelope hook."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "statuses.json"
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "benchmarks.fuzz_hooks",
            "FUZZ_STATS_FILE": str(stats),
            "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
            ),
        }
        cmd = [
            sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
            "--checks", ",".join(CHECKS),
            "--max-examples", str(max_examples),
            "--phases", phases,
            "--workers", str(workers),
            "--request-timeout", "60",
            "--continue-on-failure",
            "--suppress-health-check", "all",
            "--warnings", "off",
            "--report-dir", tmp,
        ]  # fmt: skip
        if key:
            cmd += ["--header", f"Authorization: Bearer {key}"]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        if max_time is not None:
            cmd += ["--max-time", str(int(max_time))]
        start = time.monotonic()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
        seconds = time.monotonic() - start
        statuses = json.loads(stats.read_text()) if stats.exists() else {}
    return FuzzResult(out.returncode, out.stdout + out.stderr, statuses, seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="fuzz a running server instead of starting one (its key in --key)")
    p.add_argument("--key", default=KEY)
    p.add_argument("--max-examples", type=int, default=300, help="test cases per operation and phase")
    p.add_argument("--seed", type=int)
    p.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    p.add_argument("--workers", type=int, default=1, help="schemathesis workers (threads)")
    p.add_argument("--log", default="fuzz_server.log", help="the started server's log")
    args = p.parse_args(argv)

    server = None
    url = args.url
    if url is None:
        server = ServerProcess(SERVER_ENV, log_path=args.log).start()
        print(f"server: {server.url} (log: {args.log}); ready in {server.wait_healthy():.1f} s", flush=True)
        url = server.url
    try:
        result = run_schemathesis(
            url,
            args.key,
            max_examples=args.max_examples,
            seed=args.seed,
            phases=args.phases,
            workers=args.workers,
        )
        print(result.output[-6000:])
        health = ServerProcess.health(server) if server else (0, {})
        if server is None:
            import urllib.request

            with urllib.request.urlopen(url + "/health", timeout=10) as r:
                health = (r.status, json.loads(r.read()))
        responses = sum(result.statuses.values())
        server_errors = sum(n for s, n in result.statuses.items() if int(s) >= 500)
        print(f"fuzz: {responses} responses in {result.seconds:.0f} s; statuses {result.statuses}")
        print(f"fuzz: 5xx responses: {server_errors}; schemathesis exit code {result.returncode}")
        print(f"fuzz: /health afterwards: {health[0]} {health[1].get('status')}")
        ok = result.returncode == 0 and server_errors == 0 and health[0] == 200
        print("fuzz: PASSED" if ok else "fuzz: FAILED")
        return 0 if ok else 1
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
