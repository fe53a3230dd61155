"""Downloads GPT-2 checkpoints: from the Hugging Face hub (default) or OpenAI's original TensorFlow files.

Every file goes to `<file>.part` first and is resumed with an HTTP Range request after a cut connection. It
is checked against the size the server announced and against a checksum where the host publishes one (the
hub: sha256 of LFS files in X-Linked-Etag; Azure blob storage: Content-MD5), then renamed into place. So a
file under its final name is always whole, and the next run skips it without asking the server.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from email.message import Message
from pathlib import Path

from gpt2jax.progress import Progress

HF_DEFAULT_ENDPOINT = "https://huggingface.co"  # overridden by $HF_ENDPOINT, as in huggingface_hub
OPENAI_DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2"  # by $GPT2_OPENAI_BASE_URL

# The four released sizes, by OpenAI's folder names (117M and 345M were miscounts) and by true size.
HF_REPOS = {
    "117M": "openai-community/gpt2",
    "124M": "openai-community/gpt2",
    "345M": "openai-community/gpt2-medium",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
OPENAI_FOLDERS = {
    "117M": "117M",
    "124M": "117M",
    "345M": "345M",
    "355M": "345M",
    "774M": "774M",
    "1558M": "1558M",
}

# config.json first: a wrong name fails before any big transfer.
HF_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
HF_OPTIONAL_FILES = ("tokenizer.json", "generation_config.json")
OPENAI_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)

# The hub's rules for repo ids, plus no "--", which we use for "/" in folder names.
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_REPO_PART}(?:/{_REPO_PART})?")
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


def _origin(url: str) -> str:
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
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS):
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            same_host = _origin(url) in (origin, self.auth_origin)
            if self.token and _origin(url) == (self.auth_origin or origin):
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


def hf_repo_id(name: str) -> str:
    """The Hugging Face repo of a GPT-2 size name, or `name` itself if it is a valid repo id."""
    if name in HF_REPOS:
        return HF_REPOS[name]
    if not _REPO_ID.fullmatch(name) or ".." in name or "--" in name:
        raise DownloadError(
            f"{name!r} is neither a GPT-2 size ({', '.join(HF_REPOS)}) nor a Hugging Face repo id "
            "(like distilgpt2 or user/my-gpt2)"
        )
    return name


@dataclasses.dataclass(frozen=True)
class _Source:
    base: str  # URL of the folder holding the files, ending in "/"
    token: str | None
    auth_hint: str  # for 401/403 messages
    not_found_hint: str  # for 404 messages on required files
    known: bool  # one of OpenAI's GPT-2 sizes: its files exist, so a 404 is the server's, not the name's


def _env_url(var: str, default: str) -> tuple[str, str]:
    """The base URL from $var, and how messages name it: the default host, or the mirror set in $var."""
    url = (os.environ.get(var) or default).rstrip("/")
    return url, urllib.parse.urlsplit(url).netloc if url == default else f"the mirror {var}={url}"


def _resolve(name: str, source: str, revision: str | None, token: str | None) -> _Source:
    if source == "hf":
        repo = hf_repo_id(name)
        endpoint, host = _env_url("HF_ENDPOINT", HF_DEFAULT_ENDPOINT)
        if name in HF_REPOS:
            wrong = f"; is revision {revision!r} right?" if revision else ""
            hint = f"{host} lacks this file of {repo} (revision {revision or 'main'!r}){wrong}"
        else:
            hint = (
                f"is {name!r} right? expected a GPT-2 size ({', '.join(HF_REPOS)}) or a Hugging Face repo "
                "id; private repos need HF_TOKEN"
            )
        # As huggingface_hub does: a revision like "refs/pr/1" is one path segment.
        return _Source(
            base=f"{endpoint}/{repo}/resolve/{urllib.parse.quote(revision or 'main', safe='')}/",
            token=token or os.environ.get("HF_TOKEN") or None,
            auth_hint="; the repo may not exist, or be private or gated: set HF_TOKEN to a token with access",
            not_found_hint=hint,
            known=name in HF_REPOS,
        )
    if source == "openai":
        if name not in OPENAI_FOLDERS:
            known = ", ".join(OPENAI_FOLDERS)
            raise DownloadError(f"unknown GPT-2 size {name!r} for --source openai; known: {known}")
        if revision:
            raise DownloadError("a revision only applies to the Hugging Face hub (--source hf)")
        endpoint, host = _env_url("GPT2_OPENAI_BASE_URL", OPENAI_DEFAULT_BASE_URL)
        return _Source(
            base=f"{endpoint}/models/{OPENAI_FOLDERS[name]}/",
            token=None,
            auth_hint="",
            not_found_hint=f"{host} lacks this file of GPT-2 {OPENAI_FOLDERS[name]}",
            known=True,
        )
    raise DownloadError(f"unknown source {source!r}; use 'hf' or 'openai'")


def download(
    name: str,
    *,
    source: str = "hf",
    dest_root: str | os.PathLike = "checkpoints",
    revision: str | None = None,
    token: str | None = None,
    progress: bool = True,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    force: bool = False,
) -> Path:
    """Downloads a GPT-2 checkpoint into `dest_root/<name>` ("/" in the name becomes "--").

    source="hf": config.json, model.safetensors, vocab.json, merges.txt (+ tokenizer.json and
    generation_config.json where the repo has them) from {$HF_ENDPOINT}/{repo}/resolve/{revision}/, with
    $HF_TOKEN (or `token`) for private and gated repos. source="openai": OpenAI's TensorFlow checkpoint
    from {$GPT2_OPENAI_BASE_URL}/models/{117M|345M|774M|1558M}/. Files already there are skipped unless
    `force`. `retries` counts failed tries in a row that got no further (a cut transfer that made progress
    is resumed at once). Raises DownloadError with a one-line message; returns the checkpoint folder.
    """
    src = _resolve(name, source, revision, token)
    fetcher = Fetcher(
        token=src.token,
        auth_origin=_origin(src.base),
        auth_hint=src.auth_hint,
        progress=progress,
        retries=retries,
        timeout=timeout,
        backoff=backoff,
    )
    dest = Path(dest_root) / name.replace("/", "--")

    def get(file: str) -> Path:
        path = dest / file
        if path.exists() and not force:  # only complete, verified files ever get their final name
            if progress:
                print(f"{file}: already downloaded", file=sys.stderr)
            return path
        fetcher.fetch(src.base + urllib.parse.quote(file), path)
        return path

    def get_required(file: str) -> Path:
        try:
            return get(file)
        except NotFoundError as e:
            raise DownloadError(f"{e} ({src.not_found_hint})") from None

    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if source == "openai":
            for file in OPENAI_FILES:
                get_required(file)
            return dest
        for file in HF_FILES:
            if file == "model.safetensors":
                no_weights = src.not_found_hint if src.known else "the repo has no safetensors weights"
                _get_hf_weights(get, get_required, no_weights)
            else:
                get_required(file)
        for file in HF_OPTIONAL_FILES:
            with contextlib.suppress(NotFoundError):  # not every repo has them
                get(file)
        return dest
    except DownloadError:
        if created and not any(dest.iterdir()):  # a wrong name should leave no empty folder behind
            dest.rmdir()
        raise


def _get_hf_weights(get: Callable[[str], Path], get_required: Callable[[str], Path], no_weights: str) -> None:
    """model.safetensors, or the shards that model.safetensors.index.json lists (big models saved sharded).

    no_weights: what a message says when neither is found."""
    try:
        get("model.safetensors")
        return
    except NotFoundError as e:
        missing = e
    try:
        index = get("model.safetensors.index.json")
    except NotFoundError:
        raise DownloadError(f"{missing}; no sharded index either ({no_weights})") from None
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise DownloadError(f"{index}: not a safetensors index ({e!r})") from None
    for shard in shards:
        if "/" in shard or shard.startswith("."):  # the index is remote input: stay inside the folder
            raise DownloadError(f"{index}: unexpected shard file name {shard!r}")
        get_required(shard)
