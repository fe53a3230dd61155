"""Settings from the environment, model discovery, legacy aliases, and the command line's messages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from waits import HANG

from serving import loading
from serving.__main__ import exposure_warning
from serving.loading import NoModelError, discover_models, registry_for
from serving.registry import ModelRegistry, ServedModel, default_aliases
from serving.settings import Settings, SettingsError


def test_defaults_match_the_original_server():
    s = Settings.from_env({})
    assert (s.port, s.max_tokens, s.max_n, s.models_dir, s.host) == (9000, 500, 4, "checkpoints", "127.0.0.1")
    assert s.models == () and s.api_keys == () and s.cors_origins == ("*",)


def test_every_variable(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-b\n\n  sk-c  \n")
    env = {
        "MODELS": "117M, 345M",
        "MODELS_DIR": "/models",
        "PORT": "8000",
        "HOST": "0.0.0.0",
        "MAX_TOKENS": "100",
        "MAX_N": "2",
        "MAX_PROMPTS": "3",
        "API_KEYS": "sk-a",
        "API_KEYS_FILE": str(keys),
        "CORS_ORIGINS": "http://a.example,http://b.example",
        "MODEL_ALIASES": "davinci=345M, ada=117M",
        "CHAT_TEMPLATE": "/t.txt",
        "MAX_BODY_BYTES": "65536",
        "GRACEFUL_TIMEOUT": "5",
        "DTYPE": "bfloat16",
        "QUANTIZATION": "INT8",
        "LOG_LEVEL": "debug",
        "SLOTS": "32",
        "CHUNK_SIZE": "4",
        "KV_CACHE_DTYPE": "BFloat16",
    }
    s = Settings.from_env(env)
    assert (
        s.models == ("117M", "345M") and s.models_dir == "/models" and (s.port, s.host) == (8000, "0.0.0.0")
    )
    assert (s.max_tokens, s.max_n, s.max_prompts, s.max_body_bytes) == (100, 2, 3, 65536)
    assert s.api_keys == ("sk-a", "sk-b", "sk-c") and s.cors_origins == (
        "http://a.example",
        "http://b.example",
    )
    assert s.model_aliases == (("davinci", "345M"), ("ada", "117M")) and s.chat_template == "/t.txt"
    assert (s.graceful_timeout, s.dtype, s.log_level) == (5.0, "bfloat16", "DEBUG")
    assert (s.slots, s.chunk_size, s.quantization) == (32, 4, "int8")
    assert (
        Settings.from_env({}).quantization is None
        and Settings.from_env({"QUANTIZATION": "none"}).quantization is None
    )
    assert (s.slots, s.chunk_size, s.kv_cache_dtype) == (32, 4, "bfloat16")
    assert Settings.from_env({}).kv_cache_dtype == "auto"
    assert (Settings.from_env({}).slots, Settings.from_env({}).chunk_size) == (None, None)  # the engine's
    assert Settings.from_env({"CORS_ORIGINS": ""}).cors_origins == ()  # set but empty: CORS off


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"MAX_TOKENS": "0"}, "MAX_TOKENS"),
        ({"MODEL_ALIASES": "davinci"}, "MODEL_ALIASES"),
        ({"API_KEYS_FILE": "/no/such/file"}, "API_KEYS_FILE"),
        ({"GRACEFUL_TIMEOUT": "-1"}, "GRACEFUL_TIMEOUT"),
        ({"CHUNK_SIZE": "0"}, "CHUNK_SIZE"),
        ({"QUANTIZATION": "int4"}, "QUANTIZATION"),
        ({"KV_CACHE_DTYPE": "int8"}, "KV_CACHE_DTYPE"),
    ],
)
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(SettingsError, match=needle):
        Settings.from_env(env)


def test_exposure_warning():
    assert exposure_warning(Settings(host="0.0.0.0"))
    assert exposure_warning(Settings(host="0.0.0.0", api_keys=("k",))) is None
    assert exposure_warning(Settings()) is None


def test_discovery(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(loading, "SHIPPED_DIR", tmp_path / "shipped")
    with pytest.raises(NoModelError, match="download_model.py 117M"):
        discover_models(Settings(models_dir=str(tmp_path)))
    (tmp_path / "shipped").mkdir()
    os.symlink(tiny_checkpoint, tmp_path / "shipped" / "pydoc-tiny")
    assert [p.name for p in discover_models(Settings(models_dir=str(tmp_path)))] == ["pydoc-tiny"]
    (tmp_path / "notes").mkdir()
    os.symlink(tiny_checkpoint, tmp_path / "117M")
    assert [p.name for p in discover_models(Settings(models_dir=str(tmp_path)))] == ["117M"]
    assert [p.name for p in discover_models(Settings(models=("117M",), models_dir=str(tmp_path)))] == ["117M"]
    with pytest.raises(NoModelError, match="download_model.py 345M"):
        discover_models(Settings(models=("345M",), models_dir=str(tmp_path)))
    registry = registry_for(discover_models(Settings(models_dir=str(tmp_path))), Settings())
    assert registry.models["117M"].n_params > 0 and registry.resolve("davinci").name == "117M"


def test_legacy_names_follow_size():
    sizes = {"1558M": 1558, "117M": 117, "345M": 345}
    models = [ServedModel(name, n_params=n) for name, n in sizes.items()]
    aliases = default_aliases(models)
    assert aliases["ada"] == aliases["text-ada-001"] == "117M"
    assert aliases["davinci"] == aliases["text-davinci-003"] == aliases["davinci-002"] == "1558M"
    assert aliases["babbage"] == aliases["babbage-002"] == "345M" and aliases["curie-beta"] == "345M"
    registry = ModelRegistry(models, [("davinci", "117M"), ("my-model", "345M")])
    assert registry.resolve("davinci").name == "117M" and registry.resolve("my-model").name == "345M"
    with pytest.raises(ValueError, match="not a served model"):
        ModelRegistry(models, [("davinci", "774M")])


def test_command_line_without_a_model(tmp_path):
    # MODELS names a model that is not there (with MODELS unset, the repo's shipped model would be served).
    env = {**os.environ, "MODELS": "117M", "MODELS_DIR": str(tmp_path / "empty"), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "serving"], env=env, capture_output=True, text=True, timeout=HANG
    )
    assert out.returncode == 1 and "python3 download_model.py 117M" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "serving", "--port", "x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert out.returncode == 2 and "PORT" in out.stderr
