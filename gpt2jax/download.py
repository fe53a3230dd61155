"""Downloads GPT-2 checkpoints: from the Hugging Face hub (default) or OpenAI's original TensorFlow files.

This module knows what to fetch and from where (the sizes' repos and folders, the files of each layout,
mirrors, tokens); gpt2jax.fetch moves the bytes, resuming and verifying each file. A file under its final
name is always whole, so the next run skips it without asking the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from gpt2jax.fetch import DownloadError, Fetcher, NotFoundError, url_origin

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
        auth_origin=url_origin(src.base),
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
