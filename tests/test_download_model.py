"""download_model.py and gpt2jax.download, end to end against loopback servers laid out like each source
(tests/fake_hosts.py): names, layouts, skipping, errors. Transfers (resume, retry, checksums): test_fetch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fake_hosts import WEIGHTS, add_hub_repo, assert_hub_files, hub_files, openai_layout
from waits import HANG

from gpt2jax.download import OPENAI_FILES, download
from gpt2jax.fetch import DownloadError

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "download_model.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=HANG,
    )


def assert_clean_failure(proc: subprocess.CompletedProcess) -> str:
    """Non-zero exit, no traceback, one line on stderr; returns that line."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_hf_cli_full_download(hub, tmp_path):
    proc = run_cli("117M", "--dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert_hub_files(tmp_path / "117M")
    assert "model.safetensors" in proc.stderr  # the progress bar
    # The LFS file came from the CDN, after the hub's redirect.
    assert hub.paths().count(hub.cdn) == 1


def test_skips_complete_files(hub, tmp_path):
    download("124M", dest_root=tmp_path, progress=False)
    hub.requests.clear()
    (tmp_path / "124M" / "vocab.json").write_bytes(b"edited")  # a file that exists is taken as is
    download("124M", dest_root=tmp_path, progress=False)
    assert hub.paths() == ["/openai-community/gpt2/resolve/main/generation_config.json"]
    download("124M", dest_root=tmp_path, progress=False, force=True)
    assert_hub_files(tmp_path / "124M")


def test_resumes_on_the_next_run(hub, tmp_path):
    # Cut halfway, then dead: the run gives up, keeping the half it got; the next run asks for the rest.
    hub.cuts[hub.cdn] = 1
    hub.stalls[hub.cdn] = 1
    proc = run_cli("124M", "--dir", str(tmp_path), "--retries", "0", "-q")
    line = assert_clean_failure(proc)
    assert "run the same command again to resume" in line and hub.cdn not in line
    folder = tmp_path / "124M"
    assert (folder / "model.safetensors.part").read_bytes() == WEIGHTS[: len(WEIGHTS) // 2]
    assert not (folder / "model.safetensors").exists()
    proc = run_cli("124M", "--dir", str(tmp_path), "-q")
    assert proc.returncode == 0, proc.stderr
    assert_hub_files(folder)
    assert hub.requests_to(hub.cdn)[-1]["range"] == f"bytes={len(WEIGHTS) // 2}-"


@pytest.mark.parametrize("name", ["no-such/model", "999M"])
def test_not_found(host, tmp_path, name):
    proc = run_cli(name, "--dir", str(tmp_path))
    line = assert_clean_failure(proc)
    assert "404" in line
    assert f"{host.url}/{name}/resolve/main/config.json" in line
    assert f"is '{name}' right?" in line and "117M" in line
    assert not (tmp_path / name.replace("/", "--")).exists()


def test_hub_access_errors(host, tmp_path):
    gated = "/org/gated/resolve/main/config.json"
    host.errors[gated] = (401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access is restricted"})
    with pytest.raises(DownloadError, match="HTTP 401: Access is restricted.*set HF_TOKEN"):
        download("org/gated", dest_root=tmp_path, progress=False)
    # Without a token the hub answers 401 for a repo that does not exist: that is "not found".
    host.errors["/org/absent/resolve/main/config.json"] = (401, {"X-Error-Code": "RepoNotFound"})
    with pytest.raises(DownloadError, match="not found.*is 'org/absent' right"):
        download("org/absent", dest_root=tmp_path, progress=False)


def test_sha256_mismatch_leaves_no_file(hub, tmp_path):
    location, headers = hub.redirects["/openai-community/gpt2/resolve/main/model.safetensors"]
    headers["X-Linked-Etag"] = '"' + "0" * 64 + '"'
    proc = run_cli("124M", "--dir", str(tmp_path), "-q")
    line = assert_clean_failure(proc)
    assert "model.safetensors: sha256 mismatch" in line
    folder = tmp_path / "124M"
    assert not (folder / "model.safetensors").exists()
    assert not (folder / "model.safetensors.part").exists()


def test_unreachable_host(tmp_path, monkeypatch):
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there now
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "*")
    line = assert_clean_failure(run_cli("124M", "--dir", str(tmp_path), "--retries", "0"))
    assert f"cannot reach 127.0.0.1:{port}" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["../../etc"], "neither a GPT-2 size"),
        (["has space"], "neither a GPT-2 size"),
        (["a--b"], "neither a GPT-2 size"),
        (["999M", "--source", "openai"], "unknown GPT-2 size '999M' for --source openai; known: 117M"),
        (["124M", "--source", "openai", "--revision", "v1"], "revision only applies"),
    ],
)
def test_bad_names_fail_before_any_request(host, tmp_path, args, message):
    line = assert_clean_failure(run_cli(*args, "--dir", str(tmp_path)))
    assert message in line
    assert host.requests == []
    assert list(tmp_path.iterdir()) == []


def test_custom_repo_revision_and_sharded_weights(host, tmp_path):
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    shards = {one: b"shard one", two: b"shard two"}
    index = {"weight_map": {"wte": one, "h.0.attn": two, "h.0.mlp": two}}
    files = {k: v for k, v in hub_files().items() if k != "model.safetensors"}
    files.update(shards, **{"model.safetensors.index.json": json.dumps(index).encode()})
    add_hub_repo(host, "user/my-gpt2", files, revision="refs%2Fpr%2F1")
    folder = download("user/my-gpt2", revision="refs/pr/1", dest_root=tmp_path, progress=False)
    assert folder == tmp_path / "user--my-gpt2"
    for name, data in files.items():
        assert (folder / name).read_bytes() == data


def test_openai_cli_full_download(host, tmp_path):
    files = openai_layout(host)
    proc = run_cli("124M", "--source", "openai", "--dir", str(tmp_path), "-q")
    assert proc.returncode == 0, proc.stderr
    for name, data in files.items():
        assert (tmp_path / "124M" / name).read_bytes() == data
    assert sorted(host.paths()) == sorted(f"/models/117M/{name}" for name in OPENAI_FILES)


def test_notebook_load_downloads_a_missing_model(host, tiny_checkpoint, tmp_path, monkeypatch):
    """gpt2jax.load(name, download=True) fetches a name that has no folder yet, then loads it; a second
    load finds the folder and sends no request; without download=True the error says how to get it."""
    import gpt2jax

    files = {f.name: f.read_bytes() for f in tiny_checkpoint.iterdir() if f.is_file()}
    add_hub_repo(host, "user/tiny-gpt2", files)
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="download=True"):
        gpt2jax.load("user/tiny-gpt2")
    assert host.requests == []
    model = gpt2jax.load("user/tiny-gpt2", download=True)
    assert sorted(p.name for p in (tmp_path / "user--tiny-gpt2").iterdir()) == sorted(files)
    want = gpt2jax.load(tiny_checkpoint).generate("The for statement", max_tokens=8, temperature=0)
    assert model.generate("The for statement", max_tokens=8, temperature=0) == want
    sent = len(host.requests)
    gpt2jax.load("user/tiny-gpt2", download=True)
    assert len(host.requests) == sent
