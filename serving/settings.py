"""Server settings, read once from the environment into a frozen dataclass.

Names follow the original openai-server where it had them (MODELS, PORT, MAX_TOKENS, MAX_N).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path


class SettingsError(ValueError):
    """An environment variable has a value we cannot use; the message names it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] = ()  # MODELS; empty: every model folder under models_dir
    models_dir: str = "checkpoints"  # MODELS_DIR
    host: str = "127.0.0.1"  # HOST
    port: int = 9000  # PORT
    max_tokens: int = 500  # MAX_TOKENS: the largest max_tokens a request may ask for
    max_n: int = 4  # MAX_N: the most choices (n, best_of) per prompt
    max_prompts: int = 16  # MAX_PROMPTS: the most prompts in one completions request
    api_keys: tuple[str, ...] = ()  # API_KEYS (comma list) + API_KEYS_FILE (one per line); empty: open
    cors_origins: tuple[str, ...] = ("*",)  # CORS_ORIGINS (comma list; "" disables CORS)
    model_aliases: tuple[tuple[str, str], ...] = ()  # MODEL_ALIASES "davinci=117M,ada=117M"
    chat_template: str | None = None  # CHAT_TEMPLATE: path of a template file for every model
    max_body_bytes: int = 2 * 1024 * 1024  # MAX_BODY_BYTES: larger request bodies get 413
    graceful_timeout: float = 30.0  # GRACEFUL_TIMEOUT: seconds to finish in-flight requests on SIGTERM
    dtype: str = "float32"  # DTYPE: float32 or bfloat16 weights
    quantization: str | None = None  # QUANTIZATION: int8 (weight-only, gpt2jax.packed); empty: none
    # KV_CACHE_DTYPE: auto (bf16 with bf16/int8 weights or activations, else float32), float32 or bfloat16
    kv_cache_dtype: str = "auto"
    slots: int | None = None  # SLOTS: the engine's decode slots (default: the engine's choice per device)
    chunk_size: int | None = None  # CHUNK_SIZE: decode steps per device call (default: the engine's choice)
    mesh: str = ""  # MESH: "data:4,model:2" device mesh (gpt2jax.sharding); empty: slots over all devices
    max_queue: int = 64  # MAX_QUEUE: requests that may wait for a slot; more get 429
    queue_timeout: float = 30.0  # QUEUE_TIMEOUT: seconds a request may wait for a slot before a 429
    # BATCH_INVARIANT: a request's tokens do not depend on what runs beside it (slower; README, "Seeds and batch invariance")
    batch_invariant: bool = False
    # WARMUP: "background" compiles what a lone short request needs before /health turns 200 and the
    # other programs while serving (gpt2jax/engine/warmup.py); "all" compiles every program first.
    warmup: str = "background"
    log_level: str = "INFO"  # LOG_LEVEL

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Reads the settings from `env` (default: os.environ); raises SettingsError for bad values."""
        env = os.environ if env is None else env
        get = lambda name: (env.get(name) or "").strip()
        d = cls()
        keys = _comma_list(get("API_KEYS"))
        if get("API_KEYS_FILE"):
            keys += _read_keys_file(get("API_KEYS_FILE"))
        cors = env.get("CORS_ORIGINS")
        return cls(
            models=_comma_list(get("MODELS")),
            models_dir=get("MODELS_DIR") or d.models_dir,
            host=get("HOST") or d.host,
            port=_int(env, "PORT", d.port, 0, 65535),
            max_tokens=_int(env, "MAX_TOKENS", d.max_tokens, 1, 1_000_000),
            max_n=_int(env, "MAX_N", d.max_n, 1, 128),
            max_prompts=_int(env, "MAX_PROMPTS", d.max_prompts, 1, 4096),
            api_keys=keys,
            cors_origins=d.cors_origins if cors is None else _comma_list(cors),
            model_aliases=_aliases(get("MODEL_ALIASES")),
            chat_template=get("CHAT_TEMPLATE") or None,
            max_body_bytes=_int(env, "MAX_BODY_BYTES", d.max_body_bytes, 1024, 1 << 31),
            graceful_timeout=_float(env, "GRACEFUL_TIMEOUT", d.graceful_timeout),
            dtype=get("DTYPE") or d.dtype,
            quantization=_quantization(get("QUANTIZATION").lower()),
            kv_cache_dtype=_kv_cache_dtype((get("KV_CACHE_DTYPE") or d.kv_cache_dtype).lower()),
            slots=_int(env, "SLOTS", 0, 1, 1 << 16) or None,
            chunk_size=_int(env, "CHUNK_SIZE", 0, 1, 1024) or None,
            mesh=_mesh(get("MESH")),
            max_queue=_int(env, "MAX_QUEUE", d.max_queue, 0, 1 << 20),
            queue_timeout=_float(env, "QUEUE_TIMEOUT", d.queue_timeout),
            batch_invariant=_bool(env, "BATCH_INVARIANT", d.batch_invariant),
            warmup=_warmup((get("WARMUP") or d.warmup).lower()),
            log_level=(get("LOG_LEVEL") or d.log_level).upper(),
        )

    @property
    def binds_all_interfaces(self) -> bool:
        return self.host in ("0.0.0.0", "::", "[::]", "")


def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected an integer") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={value}: expected {lo}..{hi}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number") from None
    if value < 0:
        raise SettingsError(f"{name}={value}: expected a number >= 0")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r}: expected 1 or 0 (true/false, yes/no, on/off)")


def _quantization(value: str) -> str | None:
    if value in ("", "none"):
        return None
    if value != "int8":
        raise SettingsError(f"QUANTIZATION={value!r}: expected int8 or none")
    return value


def _warmup(value: str) -> str:
    if value not in ("background", "all"):
        raise SettingsError(f"WARMUP={value!r}: expected background or all")
    return value


def _kv_cache_dtype(value: str) -> str:
    # The names of gpt2jax/kv_cache.py, which imports JAX: these settings are read without it.
    if value not in ("auto", "float32", "bfloat16", "fp32", "bf16"):
        raise SettingsError(f"KV_CACHE_DTYPE={value!r}: expected auto, float32 or bfloat16")
    return value


def _mesh(value: str) -> str:
    if value:
        from gpt2jax.sharding import MeshShape, ShardingError  # imports JAX: only when MESH is set

        try:
            MeshShape.parse(value)
        except ShardingError as e:
            raise SettingsError(f"MESH={value!r}: {e}") from None
    return value


def _aliases(value: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in _comma_list(value):
        alias, sep, target = item.partition("=")
        if not sep or not alias.strip() or not target.strip():
            raise SettingsError(f"MODEL_ALIASES: {item!r} is not of the form alias=model")
        pairs.append((alias.strip(), target.strip()))
    return tuple(pairs)


def _read_keys_file(path: str) -> tuple[str, ...]:
    """One key per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise SettingsError(f"API_KEYS_FILE={path!r}: cannot read it ({e.strerror})") from None
    return tuple(s for s in (line.strip() for line in lines) if s and not s.startswith("#"))
