"""examples/ against a real server with API_KEYS: every script prints the server's own error message on
stderr and exits non-zero (no traceback, no error body taken for an answer); the shipped model is listed
as the project's own (owned_by "gpt2jax", not "openai").

The server is serving.__main__.serve on loopback with the shipped checkpoints/pydoc-tiny, answered by
ScriptedEngine (what these tests check is the HTTP around it, not the model).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fake_engine import ScriptedEngine, ServerThread
from test_api_prod import free_port
from waits import HANG

from serving.loading import registry_for
from serving.registry import SHIPPED_DIR
from serving.settings import Settings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
KEY = "sk-examples"

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the examples use curl")


class Scripted(ScriptedEngine):
    """ScriptedEngine with the lifecycle load_all calls."""

    def warmup(self) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self, drain: bool = True) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    settings = Settings(api_keys=(KEY,), max_tokens=64)
    registry = registry_for([SHIPPED_DIR / "pydoc-tiny"], settings)
    build = lambda model, _settings: Scripted(model.tokenizer, n_ctx=model.config.n_ctx)
    srv = ServerThread(settings, registry, build).start()
    try:
        srv.wait_for(lambda: srv.get("/health")[0] == 200, what="/health 200")
        yield srv
    finally:
        assert srv.shutdown() == 0


def answer(server, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    """The server's own answer to a request, for comparison with what a script prints."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.url + path, data, headers)
    try:
        with urllib.request.urlopen(request, timeout=HANG) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def error_line(status: int, body: dict) -> str:
    error = body["error"]
    return f"error: HTTP {status} ({error['code']}): {error['message']}"


def run(server, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_API_BASE", "E", "M")}
    full.update({"PORT": str(server.port), "NO_PROXY": "*", **env})
    command = [sys.executable] if script.endswith(".py") else ["bash"]
    return subprocess.run(
        [*command, str(EXAMPLES / script), *args], env=full, capture_output=True, text=True, timeout=HANG
    )


def assert_server_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "KeyError" not in proc.stderr, proc.stderr
    assert expected in proc.stderr.splitlines(), proc.stderr
    assert "\033c" not in proc.stdout  # 003 stopped before redrawing the screen


COMPLETION = "002_test_completion.sh"


def test_a_missing_key_prints_the_401(server):
    missing = error_line(*answer(server, "/v1/engines"))
    assert missing.startswith("error: HTTP 401 (missing_api_key): ")
    for script in ("001_test_list.sh", COMPLETION, "003_completions.sh"):
        assert_server_error(run(server, script, "Hi", N="1"), missing)
    wrong = error_line(*answer(server, "/v1/engines", key="sk-wrong"))
    assert wrong.startswith("error: HTTP 401 (invalid_api_key): ")
    assert_server_error(run(server, COMPLETION, "Hi", OPENAI_API_KEY="sk-wrong"), wrong)
    # openai_client.py sends a placeholder key when OPENAI_API_KEY is unset.
    assert_server_error(run(server, "openai_client.py"), wrong.replace("sk-wrong", "unused"))


def test_a_wrong_engine_prints_the_404(server):
    body = {"prompt": "Hi", "temperature": 0.6, "max_tokens": 32, "echo": True}
    status, error = answer(server, "/v1/engines/nope/completions", body, key=KEY)
    assert status == 404 and "nope" in error["error"]["message"]
    for script in (COMPLETION, "003_completions.sh"):
        assert_server_error(
            run(server, script, "Hi", E="nope", N="1", OPENAI_API_KEY=KEY), error_line(404, error)
        )


def test_too_many_tokens_prints_the_400(server):
    body = {"prompt": "Hi", "temperature": 0.6, "max_tokens": 5000, "echo": True}
    status, error = answer(server, "/v1/engines/davinci/completions", body, key=KEY)
    assert status == 400 and "max_tokens" in error["error"]["message"]
    assert_server_error(run(server, COMPLETION, "Hi", M="5000", OPENAI_API_KEY=KEY), error_line(400, error))


def test_with_the_key_the_examples_answer(server):
    proc = run(server, COMPLETION, "Hi", OPENAI_API_KEY=KEY)
    assert proc.returncode == 0 and proc.stdout == "Hi lorem ipsum dolor\n", proc.stderr
    proc = run(server, "001_test_list.sh", OPENAI_API_KEY=KEY)
    assert proc.returncode == 0, proc.stderr
    assert [(e["id"], e["owner"]) for e in json.loads(proc.stdout)["data"]] == [("pydoc-tiny", "gpt2jax")]
    status, models = answer(server, "/v1/models", key=KEY)
    assert [(m["id"], m["owned_by"]) for m in models["data"]] == [("pydoc-tiny", "gpt2jax")]


def test_no_server_is_no_traceback(server):
    port = str(free_port())  # nothing listens there
    for script in ("001_test_list.sh", COMPLETION, "openai_client.py"):
        proc = run(server, script, PORT=port, OPENAI_API_KEY=KEY)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "onnect" in proc.stderr  # curl's "Failed to connect", openai's "Connection error."
