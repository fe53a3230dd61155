"""gpt2jax.fetch through download(): resuming, retrying and verifying transfers against a fake hub and bucket."""

from __future__ import annotations

import base64

import pytest
from fake_hosts import WEIGHTS, assert_hub_files, hub_files, openai_layout

from gpt2jax.download import download
from gpt2jax.fetch import DownloadError


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


def test_resumes_a_cut_transfer_in_the_same_run(hub, tmp_path):
    hub.cuts[hub.cdn] = 1
    download("124M", dest_root=tmp_path, progress=False, backoff=0)
    assert_hub_files(tmp_path / "124M")
    first, second = hub.requests_to(hub.cdn)
    assert "range" not in first
    assert second["range"] == f"bytes={len(WEIGHTS) // 2}-"


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
