"""`bash prod.sh` end to end: the real engine on a tiny model in a subprocess, then SIGTERM mid-stream.

prod.sh installs the project into the repo's .venv only if it cannot import it, so here (after test.sh
installed it) it goes straight to `python -m serving`. The first run compiles the engine's programs
(JAX's persistent cache keeps them for the next run).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from waits import HANG

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (ConnectionError, urllib.error.URLError, TimeoutError):
        return 0


@pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "python").exists(), reason="prod.sh serves from the repo's .venv"
)
def test_prod_sh_serves_and_stops_gracefully(tiny_checkpoint):
    import openai

    port = free_port()
    env = {
        **os.environ,
        "MODELS": str(tiny_checkpoint),
        "PORT": str(port),
        "JAX_PLATFORMS": "cpu",
        "MAX_N": "2",
    }
    log = open(Path(tiny_checkpoint).parent / "prod.log", "w+")  # noqa: SIM115 (read back on failure)
    proc = subprocess.Popen(["bash", str(REPO / "prod.sh")], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, seen = time.monotonic() + HANG, set()
        while (status := get(base + "/health")) != 200:
            seen.add(status)
            assert proc.poll() is None and time.monotonic() < deadline, _tail(log)
            time.sleep(0.2)
        assert 503 in seen  # listening while the engine warmed up

        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=HANG)
        name = Path(tiny_checkpoint).name
        r = client.completions.create(
            model="davinci", prompt="Hello", n=2, max_tokens=6, echo=True, logprobs=1
        )
        assert r.model == name and len(r.choices) == 2 and all(c.text.startswith("Hello") for c in r.choices)
        assert r.choices[0].logprobs.token_logprobs[0] is None

        stream = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=40, stream=True
        )
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)  # with the stream in flight
        chunks += list(stream)
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason
        assert proc.wait(HANG) == 0, _tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]
