"""A model folder that fails to load never stops the others from serving (issue 6).

Real loading (`serving.loading.load_all` through `gpt2jax.load`) of one good folder and two broken ones,
in the production `serve()` under Hypercorn; the engines are FakeEngine (no compiling).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from fake_engine import FakeEngine, ServerThread

from serving.loading import public_error, registry_for
from serving.settings import Settings


def post(srv: ServerThread, path: str, body: dict) -> tuple[int, dict]:
    return srv.post(path, body)


@pytest.fixture()
def folders(tmp_path, tiny_checkpoint):
    good = Path(shutil.copytree(tiny_checkpoint, tmp_path / "good"))
    truncated = Path(shutil.copytree(tiny_checkpoint, tmp_path / "truncated"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a half-copied download
    bad_config = Path(shutil.copytree(tiny_checkpoint, tmp_path / "bad-config"))
    (bad_config / "config.json").write_text("{not json")
    return good, truncated, bad_config


def test_a_broken_model_folder_does_not_stop_the_others(folders, tmp_path, caplog):
    good, truncated, bad_config = folders
    settings = Settings()
    registry = registry_for([truncated, good, bad_config], settings)  # the broken config: failed at once
    srv = ServerThread(settings, registry, lambda model, _s: FakeEngine(model)).start()
    try:
        with caplog.at_level(logging.INFO, logger="serving"):
            srv.wait_for(lambda: srv.get("/health")[0] == 200, what="/health 200")
        status, health = srv.get("/health")
        assert health["status"] == "degraded"
        assert health["models"]["good"] == {"status": "ready"}
        for name, file in (("truncated", "model.safetensors"), ("bad-config", "config.json")):
            entry = health["models"][name]
            assert entry["status"] == "failed" and file in entry["error"], entry
            assert str(tmp_path) not in entry["error"]  # /health needs no key: no filesystem layout in it

        # The good model serves, and is the only one listed (also under the legacy names).
        assert [m["id"] for m in srv.get("/v1/models")[1]["data"]] == ["good"]
        assert [e["id"] for e in srv.get("/v1/engines")[1]["data"]] == ["good"]
        status, body = post(srv, "/v1/completions", {"model": "davinci", "prompt": "Hi", "max_tokens": 3})
        assert status == 200 and body["model"] == "good", body
        status, body = post(srv, "/v1/completions", {"model": "truncated", "prompt": "Hi"})
        assert status == 404 and body["error"]["code"] == "model_not_found", body
        assert "failed to load" in body["error"]["message"] and "good" in body["error"]["message"]

        # A clear log line for each failure, naming the model (the full detail goes to the log only).
        failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("truncated" in r.getMessage() and r.exc_info for r in failures), failures
        assert any("bad-config" in r.getMessage() for r in failures), failures
    finally:
        assert srv.shutdown() == 0


def test_no_model_loads_exits_1(folders):
    _, truncated, bad_config = folders
    settings = Settings()
    srv = ServerThread(settings, registry_for([truncated, bad_config], settings), FakeEngine).start()
    srv.wait_for(lambda: srv.exit_code is not None or srv.get("/health")[1].get("status") == "failed")
    assert srv.shutdown() == 1


def test_public_error_hides_paths(tmp_path):
    folder = tmp_path / "m"
    error = FileNotFoundError(f"{folder}/model.safetensors: missing; see also /etc/gpt2/settings.json")
    text = public_error(error, folder)
    assert text == "FileNotFoundError: m/model.safetensors: missing; see also settings.json"
