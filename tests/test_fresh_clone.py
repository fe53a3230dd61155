"""A fresh clone as a newcomer meets it: the original project's quickstart (`pip3 install -r
requirements.txt`, `python3 download_model.py 117M`), and `bash prod.sh` serving the shipped model.

download_model.py runs in a virtualenv with nothing installed, against a loopback mirror of the hub and of
OpenAI's bucket (fake_hosts.FakeHost). requirements.txt is checked through pip itself, without
installing (that takes minutes): it must install this project with exactly pyproject.toml's dependencies.

For prod.sh the clone is made from the repository's committed HEAD. So that the test does not reinstall every
dependency, the clone's `.venv` is a link to this checkout's (test.sh made it); prod.sh then finds the
project importable and starts `python -m serving` in the clone, whose own `serving/`, `gpt2jax/` and
`checkpoints/pydoc-tiny/` come first on the path. (The install path of prod.sh is the same one test.sh
takes, which CI runs on a clean clone.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hosts import FakeHost, add_hub_repo, hub_files, openai_layout
from test_api_prod import _tail, free_port, get
from test_download_model import assert_clean_failure
from waits import HANG

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "python").exists() or not (REPO / ".git").exists(),
    reason="needs the repo's .venv and git history",
)
def test_fresh_clone_serves_the_shipped_model(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    assert (clone / "checkpoints" / "pydoc-tiny" / "model.safetensors").exists()
    (clone / ".venv").symlink_to(REPO / ".venv")

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MODELS", "MODELS_DIR")}
    env.update(PORT=str(port), JAX_PLATFORMS="cpu")
    log = open(tmp_path / "prod.log", "w+")  # noqa: SIM115 (read back on failure)
    proc = subprocess.Popen(["bash", "prod.sh"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + HANG
        while get(base + "/health") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, _tail(log)
            time.sleep(0.2)
        with urllib.request.urlopen(base + "/v1/models", timeout=HANG) as r:
            assert [m["id"] for m in json.load(r)["data"]] == ["pydoc-tiny"]
        body = json.dumps({"model": "pydoc-tiny", "prompt": "The for statement", "max_tokens": 20, "seed": 1})
        request = urllib.request.Request(
            base + "/v1/completions", body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=HANG) as r:
            answer = json.load(r)
        text = answer["choices"][0]["text"]
        assert answer["model"] == "pydoc-tiny" and answer["usage"]["completion_tokens"] > 0
        assert text.strip(), answer
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG) == 0, _tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(clone, ignore_errors=True)


def copy_working_tree(dest: Path) -> Path:
    """The files a clone of the working tree would have (committed or not, minus ignored ones)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():  # not one deleted in the working tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


needs_git = pytest.mark.skipif(not (REPO / ".git").exists(), reason="copies the files git lists")


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """The bin/ of a virtualenv with nothing installed, not even pip: Python's standard library only."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    for module in ("tqdm", "numpy", "jax", "pip"):
        probe = subprocess.run([venv / "bin" / "python3", "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"{module} is importable in the bare venv"
    return venv / "bin"


@pytest.fixture
def mirror() -> Iterator[FakeHost]:
    """A loopback host laid out as the hub (GPT-2 124M only) and as OpenAI's bucket (117M only)."""
    host = FakeHost()
    add_hub_repo(host, "openai-community/gpt2", hub_files())
    host.openai_files = openai_layout(host)
    yield host
    host.close()


def quickstart(bin_dir: Path, cwd: Path, mirror: FakeHost, *args: str) -> subprocess.CompletedProcess:
    """`python3 download_model.py ...` as typed, with `python3` from bin_dir and the mirror's env vars."""
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(cwd),
        "HF_ENDPOINT": mirror.url,
        "GPT2_OPENAI_BASE_URL": mirror.url,
        "NO_PROXY": "*",  # loopback must never go through a proxy
    }
    return subprocess.run(
        ["python3", "download_model.py", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG,
    )


@needs_git
def test_download_model_needs_only_the_standard_library(bare_venv, mirror, tmp_path):
    clone = copy_working_tree(tmp_path / "clone")
    proc = quickstart(bare_venv, clone, mirror, "117M")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    for name, data in hub_files().items():
        assert (clone / "checkpoints" / "117M" / name).read_bytes() == data, name
    assert "/openai-community/gpt2/resolve/main/config.json" in mirror.paths()  # the layout --help gives
    assert "model.safetensors: 0.3 MiB of 0.3 MiB (100%)" in proc.stderr  # the plain progress, no tqdm
    assert "117M: downloaded to checkpoints/117M" in proc.stdout

    proc = quickstart(bare_venv, clone, mirror, "117M", "--source", "openai", "--dir", "tf", "-q")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for name, data in mirror.openai_files.items():
        assert (clone / "tf" / "117M" / name).read_bytes() == data, name


@needs_git
def test_help_gives_both_mirror_layouts(bare_venv, mirror, tmp_path):
    clone = copy_working_tree(tmp_path / "clone")
    proc = quickstart(bare_venv, clone, mirror, "--help")
    assert proc.returncode == 0, proc.stderr
    for text in (
        "{HF_ENDPOINT}/{repo}/resolve/{revision}/<file>",
        "{GPT2_OPENAI_BASE_URL}/models/{size}/<file>",
        "HF_ENDPOINT   the hub or a mirror of it (default https://huggingface.co)",
        "117M, 124M -> openai-community/gpt2\n",
        "345M, 355M -> openai-community/gpt2-medium\n",
        "345M, 355M -> 345M\n",
        "revision      --revision (default main)",
        "HF_TOKEN",
        "(default https://openaipublic.blob.core.windows.net/gpt-2)",
    ):
        assert text in proc.stdout, text


@needs_git
@pytest.mark.parametrize(
    ("args", "url", "why"),
    [
        (["345M"], "/openai-community/gpt2-medium/resolve/main/config.json", "HF_ENDPOINT={url} lacks"),
        (
            ["124M", "--revision", "v2"],
            "/openai-community/gpt2/resolve/v2/config.json",
            "HF_ENDPOINT={url} lacks this file of openai-community/gpt2 (revision 'v2'); "
            "is revision 'v2' right?",
        ),
        (["345M", "--source", "openai"], "/models/345M/checkpoint", "GPT2_OPENAI_BASE_URL={url} lacks"),
        (["gpt2-large"], "/gpt2-large/resolve/main/config.json", "is 'gpt2-large' right? expected"),
    ],
)
def test_a_mirror_without_the_file_is_blamed_not_the_name(bare_venv, mirror, tmp_path, args, url, why):
    clone = copy_working_tree(tmp_path / "clone")
    line = assert_clean_failure(quickstart(bare_venv, clone, mirror, *args))
    assert f"not found (HTTP 404: Not Found): {mirror.url}{url} " in line
    assert why.format(url=mirror.url) in line
    if args[0] != "gpt2-large":  # a known name: no doubt cast on it
        assert f"is '{args[0]}' right" not in line


def test_a_mirror_without_the_weights_of_a_known_model(mirror, tmp_path, monkeypatch):
    from gpt2jax.download import download
    from gpt2jax.fetch import DownloadError

    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    monkeypatch.setenv("NO_PROXY", "*")
    add_hub_repo(mirror, "openai-community/gpt2-xl", {"config.json": b"{}"})
    with pytest.raises(DownloadError) as e:
        download("1558M", dest_root=tmp_path, progress=False)
    weights = f"{mirror.url}/openai-community/gpt2-xl/resolve/main/model.safetensors"
    assert str(e.value) == (
        f"not found (HTTP 404: Not Found): {weights}; no sharded index either "
        f"(the mirror HF_ENDPOINT={mirror.url} lacks this file of openai-community/gpt2-xl (revision 'main'))"
    )


@needs_git
def test_requirements_txt_installs_the_project_with_pyprojects_dependencies(tmp_path):
    """What `pip3 install -r requirements.txt` would install, from pip itself (a dry run, no index: a
    requirement that is not this project fails here). Its dependencies must be pyproject.toml's own
    (no test extras: no torch), and editable, so that `import gpt2jax` sees this checkout."""
    tomllib = pytest.importorskip("tomllib")
    clone = copy_working_tree(tmp_path / "clone")
    args = ["install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation", "--ignore-installed"]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--quiet", "--report", "-", "-r", "requirements.txt"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert proc.returncode == 0, proc.stderr
    [item] = json.loads(proc.stdout)["install"]
    assert item["metadata"]["name"] == "gpt2jax"
    assert item["download_info"] == {"url": clone.as_uri(), "dir_info": {"editable": True}}
    wanted = tomllib.loads((clone / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = [r for r in item["metadata"]["requires_dist"] if "extra ==" not in r]
    assert installed == wanted
    assert not any(r.startswith("torch") for r in installed)
