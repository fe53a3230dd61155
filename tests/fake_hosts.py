"""Loopback HTTP servers laid out like each download source, for the tests of gpt2jax.fetch and download.

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
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from gpt2jax.download import OPENAI_FILES

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


def assert_hub_files(folder: Path) -> None:
    for name, data in hub_files().items():
        assert (folder / name).read_bytes() == data, name
    assert not (folder / "generation_config.json").exists()
    assert not list(folder.glob("*.part"))


def openai_layout(host: FakeHost) -> dict[str, bytes]:
    files = {name: f"{name} of 117M\n".encode() * 50 for name in OPENAI_FILES}
    for name, data in files.items():
        path = f"/models/117M/{name}"
        host.files[path] = data
        host.headers[path] = {"Content-MD5": base64.b64encode(hashlib.md5(data).digest()).decode()}
    return files
