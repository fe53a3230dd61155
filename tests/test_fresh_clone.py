"""On a fresh clone, `bash prod.sh` with no settings serves the shipped model and completes text.

The clone is made from the repository's committed HEAD. So that the test does not reinstall every
dependency, the clone's `.venv` is a link to this checkout's (test.sh made it); prod.sh then finds the
project importable and starts `python -m serving` in the clone, whose own `serving/`, `gpt2jax/` and
`checkpoints/pydoc-tiny/` come first on the path. (The install path of prod.sh is the same one test.sh
takes, which CI runs on a clean clone.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from test_api_prod import _tail, free_port, get

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "python").exists() or not (REPO / ".git").exists(),
    reason="needs the repo's .venv and git history",
)
def test_fresh_clone_serves_the_shipped_model(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    assert (clone / "checkpoints" / "pydoc-tiny" / "model.safetensors").exists()
    (clone / ".venv").symlink_to(REPO / ".venv")

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MODELS", "MODELS_DIR")}
    env.update(PORT=str(port), JAX_PLATFORMS="cpu")
    log = open(tmp_path / "prod.log", "w+")  # noqa: SIM115 (read back on failure)
    proc = subprocess.Popen(["bash", "prod.sh"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while get(base + "/health") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, _tail(log)
            time.sleep(0.2)
        with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
            assert [m["id"] for m in json.load(r)["data"]] == ["pydoc-tiny"]
        body = json.dumps({"model": "pydoc-tiny", "prompt": "The for statement", "max_tokens": 20, "seed": 1})
        request = urllib.request.Request(
            base + "/v1/completions", body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.load(r)
        text = answer["choices"][0]["text"]
        assert answer["model"] == "pydoc-tiny" and answer["usage"]["completion_tokens"] > 0
        assert text.strip(), answer
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, _tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(clone, ignore_errors=True)
