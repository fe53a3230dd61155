"""The CPU kernels (gpt2jax/kernels/): the packed-weight matmul and decode attention.

XLA:CPU has no fast path for a few rows against int8 or bf16 weights: it widens the whole matrix to f32
in memory before the dot (benchmarks/README.md, "Packed weights"). `packed_matmul` widens them in
registers instead, so a decode step reads 1, 2 or 4 bytes per weight. `decode_attention` reads only the
cache entries each row can see, a bf16 cache widened in registers, from a cache that may hold more rows
than the batch. Both are compiled once per machine with the host's C++ compiler (`-march=native`, like
llama.cpp's GGML_NATIVE) into a cache folder and registered with XLA through `jax.ffi`. Without a
compiler, or off the CPU, `available()` is False and callers use XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"
SOURCES = (KERNELS / "packed_matmul.cc", KERNELS / "attention.cc")
HEADERS = (KERNELS / "parallel.h",)
LANES = 16  # columns per packed tile; fixed by the kernel
TARGETS = {
    jnp.dtype(jnp.int8): "gpt2jax_packed_matmul_s8",
    jnp.dtype(jnp.bfloat16): "gpt2jax_packed_matmul_bf16",
    jnp.dtype(jnp.float32): "gpt2jax_packed_matmul_f32",
}
ATTENTION_TARGETS = {
    jnp.dtype(jnp.float32): "gpt2jax_decode_attention_f32",
    jnp.dtype(jnp.bfloat16): "gpt2jax_decode_attention_bf16",
}
_SYMBOLS = {
    "gpt2jax_packed_matmul_s8": "Gpt2jaxPackedMatmulS8",
    "gpt2jax_packed_matmul_bf16": "Gpt2jaxPackedMatmulBF16",
    "gpt2jax_packed_matmul_f32": "Gpt2jaxPackedMatmulF32",
    "gpt2jax_decode_attention_f32": "Gpt2jaxDecodeAttentionF32",
    "gpt2jax_decode_attention_bf16": "Gpt2jaxDecodeAttentionBF16",
}


def cache_dir() -> Path:
    """$GPT2JAX_KERNEL_CACHE, else $XDG_CACHE_HOME/gpt2jax/kernels (~/.cache/gpt2jax/kernels)."""
    if os.environ.get("GPT2JAX_KERNEL_CACHE"):
        return Path(os.environ["GPT2JAX_KERNEL_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "gpt2jax" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def build(compiler: str | None = None, dest: Path | None = None) -> Path:
    """Compiles the kernels (once; the file name hashes the sources, the compiler and jaxlib's version).

    Returns the shared library's path. Raises RuntimeError with the compiler's message when it fails, or
    when no C++ compiler is found ($CXX, g++, clang++).
    """
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found ($CXX, g++ or clang++)")
    source = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    key = hashlib.sha256(source + compiler.encode() + jax.__version__.encode() + os.uname().machine.encode())
    out = (dest or cache_dir()) / f"gpt2jax_kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed, so a concurrent process never loads half a library.
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    cmd = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
    cmd += ["-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp_path.unlink(missing_ok=True)
        raise RuntimeError(f"building the CPU kernels failed: {done.stderr.strip()[-2000:]}")
    tmp_path.replace(out)
    return out


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered for the CPU backend (compiles them on first call).

    False, with a warning in the log, when it cannot be built; $GPT2JAX_KERNELS=0 turns it off.
    """
    if os.environ.get("GPT2JAX_KERNELS", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as e:
        log.warning("CPU kernels unavailable, using XLA's dot and attention instead: %s", e)
        return False
    for target, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True


def enabled() -> bool:
    """Whether the kernels run here: the default backend is the CPU and they are built (`available()`)."""
    return jax.default_backend() == "cpu" and available()


def packed_matmul(x: jax.Array, data: jax.Array, scale: jax.Array, n: int) -> jax.Array:
    """y [M, n] f32 = (x [M, K] f32 @ W [K, n]) * scale[:n], W packed as data [T, K, 16] int8 or bf16.

    Column j of W is data[j // 16, :, j % 16]; scale [T * 16] f32. Requires `available()`.
    """
    target = TARGETS[jnp.dtype(data.dtype)]
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x.astype(jnp.float32), data, scale)


def decode_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    position: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One new token per row against its cache, then written into it: returns (out, k_cache, v_cache).

    out [B, H, D] f32 = softmax(q . [K[:pos], k_new] / sqrt(D)) @ [V[:pos], v_new] for q, k_new, v_new
    [B, H, D] f32, caches [B', H, S, D] (B' >= B: the first B rows are used; f32 or bf16) and position [B]
    i32 (entries before it are visible); the caches come back with k_new, v_new at `position` (rounded to
    the cache's dtype; a position >= S writes nothing), updated in place when the inputs are not used
    again (donated). Requires `available()`.
    """
    target = ATTENTION_TARGETS[jnp.dtype(k_cache.dtype)]
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype))
    f32 = lambda a: a.astype(jnp.float32)
    call = jax.ffi.ffi_call(
        target, (*shapes, shapes[1]), vmap_method="sequential", input_output_aliases={3: 1, 4: 2}
    )
    out, k_cache, v_cache = call(f32(q), f32(k_new), f32(v_new), k_cache, v_cache, position.astype(jnp.int32))
    return out, k_cache, v_cache
