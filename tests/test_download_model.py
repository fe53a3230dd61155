"""download_model.py and gpt2jax.download, end to end against loopback servers laid out like each source.

The fake hub serves small files under /{repo}/resolve/{revision}/, redirecting LFS files to a "CDN" on
another host name (localhost vs 127.0.0.1) with X-Linked-Etag / X-Linked-Size, as huggingface.co does. The
fake OpenAI bucket serves /models/117M/... with Content-MD5, as Azure blob storage does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from waits import HANG

from gpt2jax.download import OPENAI_FILES, DownloadError, download

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = random.Random(0).randbytes(300_000)


class FakeHost:
    """A loopback HTTP server: files by path, optional misbehaviour per path, and a log of requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.headers: dict[str, dict[str, str]] = {}  # extra response headers, by path
        self.redirects: dict[str, tuple[str, dict[str, str]]] = {}  # path -> (Location, headers)
        self.errors: dict[str, tuple[int, dict[str, str]]] = {}  # path -> (status, headers)
        self.cuts: dict[str, int] = {}  # path -> how many responses still to cut after half the body
        self.stalls: dict[str, int] = {}  # path -> how many responses still to end after the headers
        self.busy: dict[str, int] = {}  # path -> how many requests still to answer 503
        self.ranges = True  # False: ignore Range, as some servers do
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, lower-cased headers)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def requests_to(self, path: str) -> list[dict[str, str]]:
        return [headers for p, headers in self.requests if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(host: FakeHost) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so ending the handler early closes the socket mid-body.
        def log_message(self, *args) -> None:
            pass

        def _reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path
            host.requests.append((path, {k.lower(): v for k, v in self.headers.items()}))
            if host.busy.get(path):
                host.busy[path] -= 1
                return self._reply(503, {"Retry-After": "0"})
            if path in host.redirects:
                location, headers = host.redirects[path]
                return self._reply(302, {"Location": location, **headers})
            if path in host.errors:
                status, headers = host.errors[path]
                return self._reply(status, headers)
            if path not in host.files:
                return self._reply(404, {"X-Error-Code": "EntryNotFound"}, b"Entry not found")
            body, extra = host.files[path], host.headers.get(path, {})
            start, status = 0, 200
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if m and host.ranges:
                start, status = int(m.group(1)), 206
                if start >= len(body):
                    return self._reply(416, {"Content-Range": f"bytes */{len(body)}"})
                extra = {**extra, "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
            chunk = body[start:]
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(chunk)))
            self.end_headers()
            if host.cuts.get(path):
                host.cuts[path] -= 1
                self.wfile.write(chunk[: len(chunk) // 2])
                return
            if host.stalls.get(path):
                host.stalls[path] -= 1
                return
            self.wfile.write(chunk)

    return Handler


def hub_files() -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"model_type": "gpt2", "n_embd": 64}).encode(),
        "model.safetensors": WEIGHTS,
        "vocab.json": json.dumps({"a": 0, "<|endoftext|>": 1}).encode(),
        "merges.txt": b"#version: 0.2\n",
        "tokenizer.json": b'{"model": {"type": "BPE"}}',
        # no generation_config.json: optional, its 404 must be fine
    }


def add_hub_repo(
    host: FakeHost, repo: str, files: dict[str, bytes], revision: str = "main", lfs: tuple[str, ...] = ()
) -> dict[str, str]:
    """Lays out `files` as the hub does; returns the CDN path of each LFS file."""
    cdn_paths = {}
    for name, data in files.items():
        path = f"/{repo}/resolve/{revision}/{name}"
        if name in lfs or name.endswith(".safetensors"):
            sha = hashlib.sha256(data).hexdigest()
            cdn = f"/cdn-lfs/{sha}"
            host.files[cdn] = data
            host.headers[cdn] = {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}  # S3's: an MD5, not checked
            linked = {"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)), "ETag": f'"{sha}"'}
            host.redirects[path] = (f"http://localhost:{host.port}{cdn}", linked)
            cdn_paths[name] = cdn
        else:
            host.files[path] = data
            host.headers[path] = {"ETag": f'"{hashlib.sha1(data).hexdigest()}"'}  # a git blob id: 40 hex
    return cdn_paths


@pytest.fixture
def host(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for var in ("no_proxy", "NO_PROXY"):  # loopback must never go through a proxy
        monkeypatch.setenv(var, "*")
    h = FakeHost()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("GPT2_OPENAI_BASE_URL", h.url)
    yield h
    h.close()


@pytest.fixture
def hub(host) -> FakeHost:
    host.cdn = add_hub_repo(host, "openai-community/gpt2", hub_files())["model.safetensors"]
    return host


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


def assert_hub_files(folder: Path) -> None:
    for name, data in hub_files().items():
        assert (folder / name).read_bytes() == data, name
    assert not (folder / "generation_config.json").exists()
    assert not list(folder.glob("*.part"))


def test_hf_cli_full_download(hub, tmp_path):
    proc = run_cli("117M", "--dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert_hub_files(tmp_path / "117M")
    assert "model.safetensors" in proc.stderr  # the progress bar
    # The LFS file came from the CDN, after the hub's redirect.
    assert hub.paths().count(hub.cdn) == 1


def test_token_goes_to_the_hub_only(hub, tmp_path, monkeypatch):
    # A renamed repo: the hub answers with a relative redirect, which keeps the token (same host).
    for name in hub_files():
        hub.redirects[f"/gpt2/resolve/main/{name}"] = (f"/openai-community/gpt2/resolve/main/{name}", {})
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    folder = download("gpt2", dest_root=tmp_path, progress=False)
    assert folder == tmp_path / "gpt2"
    assert_hub_files(folder)
    hub_requests = [h for p, h in hub.requests if "/resolve/" in p]
    assert hub_requests and all(h.get("authorization") == "Bearer hf_secret" for h in hub_requests)
    assert [h.get("authorization") for h in hub.requests_to(hub.cdn)] == [None]
    assert hub.requests_to(hub.cdn)[0]["host"].startswith("localhost:")


def test_skips_complete_files(hub, tmp_path):
    download("124M", dest_root=tmp_path, progress=False)
    hub.requests.clear()
    (tmp_path / "124M" / "vocab.json").write_bytes(b"edited")  # a file that exists is taken as is
    download("124M", dest_root=tmp_path, progress=False)
    assert hub.paths() == ["/openai-community/gpt2/resolve/main/generation_config.json"]
    download("124M", dest_root=tmp_path, progress=False, force=True)
    assert_hub_files(tmp_path / "124M")


def test_resumes_a_cut_transfer_in_the_same_run(hub, tmp_path):
    hub.cuts[hub.cdn] = 1
    download("124M", dest_root=tmp_path, progress=False, backoff=0)
    assert_hub_files(tmp_path / "124M")
    first, second = hub.requests_to(hub.cdn)
    assert "range" not in first
    assert second["range"] == f"bytes={len(WEIGHTS) // 2}-"


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


def test_server_without_range_support_starts_over(hub, tmp_path):
    hub.ranges = False
    hub.cuts[hub.cdn] = 1
    download("124M", dest_root=tmp_path, progress=False, backoff=0)
    assert_hub_files(tmp_path / "124M")
    assert "range" in hub.requests_to(hub.cdn)[-1]  # asked to resume, got the whole file (200)


def test_complete_part_file_is_finished_without_a_transfer(hub, tmp_path):
    # A run that died between the last byte and the rename: the server answers 416 to the range.
    folder = tmp_path / "124M"
    folder.mkdir()
    (folder / "model.safetensors.part").write_bytes(WEIGHTS)
    download("124M", dest_root=tmp_path, progress=False)
    assert_hub_files(folder)
    assert hub.requests_to(hub.cdn)[0]["range"] == f"bytes={len(WEIGHTS)}-"


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


def test_sha256_mismatch_after_resume_refetches_whole_file(hub, tmp_path):
    folder = tmp_path / "124M"
    folder.mkdir()
    (folder / "model.safetensors.part").write_bytes(b"stale bytes from another version")
    download("124M", dest_root=tmp_path, progress=False, backoff=0)
    assert_hub_files(folder)
    assert ["range" in h for h in hub.requests_to(hub.cdn)] == [True, False]


def test_retries_server_errors(hub, tmp_path):
    config = "/openai-community/gpt2/resolve/main/config.json"
    hub.busy[config] = 2
    download("124M", dest_root=tmp_path, progress=False, retries=2, backoff=0)
    assert_hub_files(tmp_path / "124M")
    assert hub.paths().count(config) == 3


def test_size_mismatch_is_an_error(hub, tmp_path):
    hub.redirects["/openai-community/gpt2/resolve/main/model.safetensors"][1]["X-Linked-Size"] = "12"
    with pytest.raises(
        DownloadError, match="model.safetensors: got 300000 bytes but the server announced 12"
    ):
        download("124M", dest_root=tmp_path, progress=False)
    assert not list((tmp_path / "124M").glob("model.safetensors*"))


def test_gives_up_after_retries(hub, tmp_path):
    hub.stalls[hub.cdn] = 99
    expected = "gave up after 3 failed attempts: connection closed after 0 of 300000 bytes"
    with pytest.raises(DownloadError, match=expected):
        download("124M", dest_root=tmp_path, progress=False, retries=2, backoff=0)
    assert len(hub.requests_to(hub.cdn)) == 3


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


def openai_layout(host: FakeHost) -> dict[str, bytes]:
    files = {name: f"{name} of 117M\n".encode() * 50 for name in OPENAI_FILES}
    for name, data in files.items():
        path = f"/models/117M/{name}"
        host.files[path] = data
        host.headers[path] = {"Content-MD5": base64.b64encode(hashlib.md5(data).digest()).decode()}
    return files


def test_openai_cli_full_download(host, tmp_path):
    files = openai_layout(host)
    proc = run_cli("124M", "--source", "openai", "--dir", str(tmp_path), "-q")
    assert proc.returncode == 0, proc.stderr
    for name, data in files.items():
        assert (tmp_path / "124M" / name).read_bytes() == data
    assert sorted(host.paths()) == sorted(f"/models/117M/{name}" for name in OPENAI_FILES)


def test_openai_resume_and_md5(host, tmp_path):
    files = openai_layout(host)
    host.cuts["/models/117M/model.ckpt.data-00000-of-00001"] = 1
    download("117M", source="openai", dest_root=tmp_path, progress=False, backoff=0)
    assert (tmp_path / "117M" / "model.ckpt.data-00000-of-00001").read_bytes() == files[
        "model.ckpt.data-00000-of-00001"
    ]
    host.headers["/models/117M/hparams.json"]["Content-MD5"] = base64.b64encode(b"\0" * 16).decode()
    (tmp_path / "117M" / "hparams.json").unlink()
    with pytest.raises(DownloadError, match="hparams.json: md5 mismatch"):
        download("117M", source="openai", dest_root=tmp_path, progress=False)
    assert not (tmp_path / "117M" / "hparams.json").exists()


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
