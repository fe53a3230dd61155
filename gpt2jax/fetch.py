"""Fetches one URL into a file over HTTP(S), with only the standard library: resumed, retried and verified.

Every file goes to `<file>.part` first and is resumed with an HTTP Range request after a cut connection. It
is checked against the size the server announced and against a checksum where the host publishes one (the
hub: sha256 of LFS files in X-Linked-Etag; Azure blob storage: Content-MD5), then renamed into place. So a
file under its final name is always whole. Which files to fetch, and from where: gpt2jax.download.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from pathlib import Path

from gpt2jax.progress import Progress

_SHA256 = re.compile(r"[0-9a-f]{64}")

CHUNK_BYTES = 1 << 18
MAX_REDIRECTS = 10
USER_AGENT = "gpt2jax-download/0.1 (python-urllib)"


class DownloadError(Exception):
    """A download failed; the message is one line for the user."""


class NotFoundError(DownloadError):
    """The server has no such file (HTTP 404, or the hub's RepoNotFound / EntryNotFound)."""


class _Interrupted(Exception):
    """A failure that retrying (and resuming) may fix: network errors, cut transfers, 5xx, 429."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Redirects are followed by hand: to read the hub's own headers on its redirect, and to keep the
    # token away from the CDN it redirects to (urllib would forward the Authorization header).
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def url_origin(url: str) -> str:
    """scheme://host:port of a URL, lower-cased: what a token is bound to."""
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.netloc}".lower()


@dataclasses.dataclass
class _Published:
    """What the host said about the whole file, from the headers of responses on its own origin."""

    size: int | None = None
    sha256: str | None = None
    md5: str | None = None

    def note(self, headers: Message, status: int) -> None:
        linked = _strip_etag(headers.get("X-Linked-Etag"))
        etag = headers.get("ETag", "")
        # A weak ETag is no content hash; a strong 64-hex one from the hub is the LFS file's sha256.
        for tag in (linked, None if etag.startswith("W/") else _strip_etag(etag)):
            if self.sha256 is None and tag and _SHA256.fullmatch(tag.lower()):
                self.sha256 = tag.lower()
        if self.size is None and headers.get("X-Linked-Size", "").isdigit():
            self.size = int(headers["X-Linked-Size"])
        # Azure blob storage: Content-MD5 is the body's, so the whole file's only on a 200.
        md5 = headers.get("x-ms-blob-content-md5") or (headers.get("Content-MD5") if status == 200 else None)
        if self.md5 is None and md5:
            with contextlib.suppress(ValueError):  # not base64: nothing usable
                digest = base64.b64decode(md5, validate=True)
                self.md5 = digest.hex() if len(digest) == 16 else None


def _strip_etag(tag: str | None) -> str | None:
    return tag.removeprefix("W/").strip('"') if tag else None


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from "bytes 100-199/200" or "bytes */200"."""
    m = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not m:
        return None, None
    first, total = m.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


@dataclasses.dataclass
class Fetcher:
    """Fetches URLs into files, resuming and verifying; holds the settings of one download session."""

    token: str | None = None
    auth_origin: str | None = None  # the only scheme://host:port that gets the token
    auth_hint: str = ""  # appended to 401/403 messages
    progress: bool = True
    retries: int = 5
    timeout: float = 60.0
    backoff: float = 1.0

    def fetch(self, url: str, dest: Path) -> None:
        """Downloads `url` to `dest` through `dest.part`, retrying failed transfers and resuming them."""
        part = dest.with_name(dest.name + ".part")
        failures = 0
        best = part.stat().st_size if part.exists() else 0
        while True:
            try:
                return self._attempt(url, dest, part)
            except _Interrupted as e:
                size = part.stat().st_size if part.exists() else 0
                if size > best:  # the attempt got further than ever: the link works, resume at once
                    best = size
                    failures = 0
                    self._say(f"{dest.name}: {e}; resuming")
                    continue
                failures += 1
                if failures > self.retries:
                    tail = "; run the same command again to resume" if size else ""
                    tries = f"{failures} failed attempt{'s' if failures > 1 else ''}"
                    raise DownloadError(f"{url}: gave up after {tries}: {e}{tail}") from None
                delay = self.backoff * 2 ** (failures - 1)
                self._say(f"{dest.name}: {e}; retrying in {delay:g} s")
                time.sleep(delay)

    def _say(self, message: str) -> None:
        if self.progress:
            Progress.write(message, file=sys.stderr)

    def _attempt(self, url: str, dest: Path, part: Path) -> None:
        offset = part.stat().st_size if part.exists() else 0
        status, resp, published = self._open(url, offset)
        with resp:
            if status == 416:  # nothing after `offset`: the part is whole, or longer than the file
                total = _parse_content_range(resp.headers.get("Content-Range"))[1]
                if total != offset:
                    part.unlink()
                    raise _Interrupted("server refused to resume (HTTP 416); starting over")
                received = 0
            else:
                if status == 206:
                    first, total = _parse_content_range(resp.headers.get("Content-Range"))
                    if first != offset:
                        part.unlink()
                        raise _Interrupted(f"server resumed at byte {first}, not {offset}; starting over")
                else:  # 200: we asked for no range, or the server ignored it and sent all from byte 0
                    offset = 0
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                if total is not None:
                    _check_disk_space(dest, total - offset)
                received = self._receive(resp, part, offset, total, dest.name)
            got = offset + received
            if total is not None and got < total:
                raise _Interrupted(f"connection closed after {got} of {total} bytes")
        self._verify(part, got, total, published, resumed=offset > 0)
        os.replace(part, dest)

    def _receive(
        self, resp: http.client.HTTPResponse, part: Path, offset: int, total: int | None, name: str
    ) -> int:
        received = 0
        with (
            open(part, "ab" if offset else "wb") as f,
            Progress(
                total=total,
                initial=offset,
                desc=name,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not self.progress,
                file=sys.stderr,
            ) as bar,
        ):
            while True:
                try:
                    chunk = resp.read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as e:
                    raise _Interrupted(f"connection lost ({e or type(e).__name__})") from e
                if not chunk:
                    return received
                f.write(chunk)  # a disk error here is no network error: it propagates, unretried
                received += len(chunk)
                bar.update(len(chunk))

    def _verify(
        self, part: Path, got: int, total: int | None, published: _Published, *, resumed: bool
    ) -> None:
        problem = _problem(part, got, total, published)
        if problem is None:
            return
        part.unlink()  # never leave a bad file where a later run would resume from it or use it
        if resumed:  # the earlier bytes may be stale (the file changed upstream): fetch it whole
            raise _Interrupted(f"{problem} after resuming; starting over")
        raise DownloadError(f"{part.name.removesuffix('.part')}: {problem}; deleted the download")

    def _open(self, url: str, offset: int) -> tuple[int, http.client.HTTPResponse, _Published]:
        published = _Published()
        origin = url_origin(url)
        for _ in range(MAX_REDIRECTS):
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            same_host = url_origin(url) in (origin, self.auth_origin)
            if self.token and url_origin(url) == (self.auth_origin or origin):
                headers["Authorization"] = f"Bearer {self.token}"
            try:
                resp = _opener.open(urllib.request.Request(url, headers=headers), timeout=self.timeout)
            except urllib.error.HTTPError as e:
                if same_host:
                    published.note(e.headers, e.code)
                location = e.headers.get("Location")
                if e.code in (301, 302, 303, 307, 308) and location:
                    e.close()
                    url = urllib.parse.urljoin(url, location)
                    continue
                if e.code == 416:
                    return e.code, e, published
                e.close()
                raise self._http_error(e, url) from None
            except (OSError, http.client.HTTPException) as e:  # URLError, refused, reset, timeouts
                reason = getattr(e, "reason", None) or e or type(e).__name__
                raise _Interrupted(f"cannot reach {urllib.parse.urlsplit(url).netloc} ({reason})") from e
            if same_host:
                published.note(resp.headers, resp.status)
            return resp.status, resp, published
        raise DownloadError(f"{url}: more than {MAX_REDIRECTS} redirects")

    def _http_error(self, e: urllib.error.HTTPError, url: str) -> Exception:
        # The hub explains its errors in X-Error-Code / X-Error-Message (e.g. RepoNotFound on a 401).
        code, why = e.headers.get("X-Error-Code", ""), e.headers.get("X-Error-Message") or e.reason
        if e.code == 404 or code.endswith("NotFound"):
            return NotFoundError(f"not found (HTTP {e.code}: {why}): {url}")
        if e.code in (401, 403):
            return DownloadError(f"access denied (HTTP {e.code}: {why}): {url}{self.auth_hint}")
        if e.code == 429 or e.code >= 500:
            return _Interrupted(f"HTTP {e.code} {why}")
        return DownloadError(f"HTTP {e.code} {why}: {url}")


def _problem(part: Path, got: int, total: int | None, published: _Published) -> str | None:
    """What is wrong with a finished download, judged by what the server announced, or None."""
    for announced in (total, published.size):
        if announced is not None and announced != got:
            return f"got {got} bytes but the server announced {announced}"
    for algo, expected in (("sha256", published.sha256), ("md5", published.md5)):
        if expected is not None and (actual := _file_digest(part, algo)) != expected:
            return f"{algo} mismatch (expected {expected}, got {actual})"
    return None


def _file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _check_disk_space(dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest.parent).free
    if needed > free:
        raise DownloadError(f"{dest.name} needs {needed:,} bytes but {dest.parent} has {free:,} free")
