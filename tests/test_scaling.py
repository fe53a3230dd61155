"""Deployment files: replicas behind nginx (examples/nginx.conf), tpu_setup.sh, the accelerator extras."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fake_engine import ScriptedEngine, ServerThread
from test_api_prod import free_port
from waits import HANG

from serving.loading import registry_for
from serving.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_tpu_setup_script_is_valid_bash_and_installs_the_tpu_extra():
    script = ROOT / "tpu_setup.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert '-e ".[tpu]"' in text and "prod.sh" in text


def test_accelerator_extras():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is Python 3.11+")
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("jax[cuda12]") for r in extras["cuda"])
    assert any(r.startswith("jax[tpu]") for r in extras["tpu"])
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.fullmatch(r"jax>=[\d.]+", r) for r in base)  # the CPU stays the default


def completion(base: str, **body) -> tuple[int, str]:
    data = json.dumps({"model": "davinci", "prompt": "Hi", "max_tokens": 4, **body}).encode()
    req = urllib.request.Request(base + "/v1/completions", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=HANG) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (ConnectionError, urllib.error.URLError):
        return 0, ""  # nothing listens yet


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (Debian: apt-get install nginx-light)")
def test_nginx_spreads_requests_over_ready_replicas(tiny_checkpoint, tokenizer_dir, tmp_path):
    """Two replicas behind examples/nginx.conf: while one is still loading (503) every request goes to
    the other; once both are ready, both answer. Streams pass through unbuffered."""
    from gpt2jax.tokenizer import GPT2Tokenizer

    tokenizer = GPT2Tokenizer.from_dir(tokenizer_dir)
    loading = threading.Event()

    def builder(reply: str, gate: threading.Event | None):
        def build(model, _settings):
            engine = ScriptedEngine(tokenizer, name=model.name, reply=reply)
            engine.warmup = lambda: gate.wait(HANG) if gate is not None else None
            engine.start = lambda: None
            return engine

        return build

    settings = Settings()
    replicas = [
        ServerThread(settings, registry_for([tiny_checkpoint], settings), builder(" one one", None)).start(),
        ServerThread(
            settings, registry_for([tiny_checkpoint], settings), builder(" two two", loading)
        ).start(),
    ]
    port = free_port()
    conf = (ROOT / "examples" / "nginx.conf").read_text()
    conf = conf.replace("127.0.0.1:9001", f"127.0.0.1:{replicas[0].port}")
    conf = conf.replace("127.0.0.1:9002", f"127.0.0.1:{replicas[1].port}")
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};").replace(
        "fail_timeout=5s", "fail_timeout=1s"
    )
    (tmp_path / "nginx.conf").write_text(conf)
    nginx = subprocess.Popen(
        ["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        replicas[0].wait_for(lambda: replicas[0].get("/health")[0] == 200, what="replica one ready")
        assert replicas[1].get("/health")[0] == 503  # still loading
        deadline = time.monotonic() + HANG
        while completion(base)[0] in (0, 502) and time.monotonic() < deadline:  # nginx starting
            assert nginx.poll() is None, nginx.stdout.read()
            time.sleep(0.1)
        answers = [completion(base) for _ in range(6)]
        assert all(status == 200 and " one one" in body for status, body in answers), answers

        loading.set()
        replicas[1].wait_for(lambda: replicas[1].get("/health")[0] == 200, what="replica two ready")
        seen, deadline = set(), time.monotonic() + HANG
        while len(seen) < 2 and time.monotonic() < deadline:  # the loading one was skipped for a second
            status, body = completion(base)
            assert status == 200, body
            seen.add(json.loads(body)["choices"][0]["text"].split()[0])
            time.sleep(0.05)
        assert seen == {"one", "two"}

        status, body = completion(base, stream=True)
        assert status == 200 and body.rstrip().endswith("data: [DONE]") and body.count("data: {") >= 2
    finally:
        nginx.terminate()
        nginx.wait(HANG)
        loading.set()
        for r in replicas:
            assert r.shutdown() == 0
