"""llama.cpp for the benchmarks: built once from the llama-cpp-python sdist's vendored sources, GGUF files
converted from a Hugging Face GPT-2 folder, and its tools run with their output parsed.

    tools = LlamaCpp.ensure()                       # builds into ~/.cache/gpt2jax-bench/llama.cpp/<version>
    gguf = tools.convert(hf_folder, "q8_0")         # <hf_folder>/ggml-model-q8_0.gguf
    tools.decode_tps(gguf, new_tokens=128)          # llama-bench: batch-1 decode tok/s
    tools.batched_tps(gguf, batch=8, prompt=32, new_tokens=128)   # llama-batched-bench: S_TG tok/s
    tools.server_command(gguf, port, parallel=16)   # llama-server's argv

q8_0 weights are repacked for the CPU by default, which crawls on some VMs (0.7 tok/s here): every tool is
run with repacking off for q8_0 (`--repack 0` for llama-bench, `--no-repack` for the others).
The cache's root is $GPT2JAX_BENCH_CACHE, else ~/.cache/gpt2jax-bench.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python's sdist (its vendor/llama.cpp is the source built)
TOOLS = ("llama-bench", "llama-batched-bench", "llama-server")
CMAKE_FLAGS = (
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
    # nothing fetched at build time, nothing built that the benchmark does not run
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)
OUTTYPES = ("f32", "f16", "q8_0")


def cache_root() -> Path:
    return Path(os.environ.get("GPT2JAX_BENCH_CACHE") or Path.home() / ".cache" / "gpt2jax-bench")


def ensure_n_ctx(folder: Path) -> bool:
    """Adds `n_ctx` (= n_positions) to folder/config.json when it lacks it; True when the file changed.

    llama.cpp's converter reads `n_ctx` for GPT-2, which transformers 5 no longer writes.
    """
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if "n_ctx" in config:
        return False
    config["n_ctx"] = config["n_positions"]
    path.write_text(json.dumps(config, indent=2) + "\n")
    return True


def parse_llama_bench(stdout: str) -> float:
    """Mean tokens/s of llama-bench's `-o json` output (one test expected)."""
    tests = json.loads(stdout)
    if len(tests) != 1:
        raise ValueError(f"expected one llama-bench test, got {len(tests)}")
    return float(tests[0]["avg_ts"])


def parse_batched_bench(stdout: str) -> float:
    """Decode tokens/s (all sequences together, `speed_tg`) of llama-batched-bench's jsonl output."""
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    rows = [r for r in rows if "speed_tg" in r]
    if len(rows) != 1:
        raise ValueError(f"expected one llama-batched-bench row, got {len(rows)}")
    return float(rows[0]["speed_tg"])


def repack_off(outtype: str, flag: tuple[str, ...] = ("--no-repack",)) -> list[str]:
    return list(flag) if outtype == "q8_0" else []


@dataclass
class LlamaCpp:
    """A built llama.cpp: `src` its sources (vendor/llama.cpp), `bin` its tools; `threads` for every run."""

    src: Path
    bin: Path
    build_seconds: float | None = None  # None: found in the cache
    threads: int = 2

    @classmethod
    def ensure(
        cls, version: str = VERSION, threads: int = 2, needed: tuple[str, ...] = TOOLS, log=print
    ) -> LlamaCpp:
        """The cached build of `version`, building all TOOLS first (5-30 min on 2 cores) if one of `needed`
        is missing."""
        home = cache_root() / "llama.cpp" / version
        src = home / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
        build = home / "build"
        if all((build / "bin" / t).is_file() for t in needed):
            return cls(src, build / "bin", None, threads)
        t0 = time.monotonic()
        if not (src / "CMakeLists.txt").is_file():
            log(f"downloading llama-cpp-python=={version}'s sdist into {home}")
            home.mkdir(parents=True, exist_ok=True)
            _run(
                [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
                + ["-d", str(home), f"llama-cpp-python=={version}"]
            )
            with tarfile.open(home / f"llama_cpp_python-{version}.tar.gz") as tar:
                tar.extractall(home, filter="data")
        log(f"building {', '.join(TOOLS)} in {build} (nice 19, {os.cpu_count()} jobs; 5-30 min on 2 cores)")
        generator = ["-G", "Ninja"] if _has("ninja") else []
        _run(["nice", "-n", "19", "cmake", "-S", str(src), "-B", str(build), *generator, *CMAKE_FLAGS])
        jobs = str(os.cpu_count() or 2)
        _run(["nice", "-n", "19", "cmake", "--build", str(build), "-j", jobs, "--target", *TOOLS])
        return cls(src, build / "bin", time.monotonic() - t0, threads)

    def version(self) -> str:
        """`--version`'s `version: N (commit)` line of a built tool that has one, e.g. "version: 1 (0c1e570)"."""
        for tool in ("llama-server", "llama-batched-bench"):
            if (self.bin / tool).is_file():
                done = subprocess.run([str(self.bin / tool), "--version"], capture_output=True, text=True)
                lines = [x for x in (done.stdout + done.stderr).splitlines() if x.startswith("version:")]
                if lines:
                    return lines[0]
        return "version unknown"

    def convert(self, hf_folder: Path, outtype: str) -> Path:
        """hf_folder converted to GGUF `outtype` (f32, f16 or q8_0) by llama.cpp's convert_hf_to_gguf.py."""
        if outtype not in OUTTYPES:
            raise ValueError(f"outtype must be one of {OUTTYPES}")
        out = Path(hf_folder) / f"ggml-model-{outtype}.gguf"
        if out.is_file():
            return out
        ensure_n_ctx(hf_folder)
        script = self.src / "convert_hf_to_gguf.py"  # imports its own gguf-py and conversion/ package
        part = out.with_suffix(".gguf.part")  # renamed when complete, so an interrupted run is redone
        cmd = [sys.executable, str(script), str(hf_folder), "--outtype", outtype, "--outfile", str(part)]
        _run(cmd, cwd=self.src)
        part.replace(out)
        return out

    def decode_tps(self, gguf: Path, new_tokens: int, outtype: str = "f32") -> float:
        """llama-bench's batch-1 decode (`-p 0 -n new_tokens`, one repetition after its warm-up run)."""
        cmd = [str(self.bin / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(new_tokens)]
        cmd += ["-t", str(self.threads), "-r", "1", "-o", "json"]
        cmd += repack_off(outtype, ("--repack", "0"))
        return parse_llama_bench(_run(cmd, capture=True))

    def batched_tps(
        self, gguf: Path, batch: int, prompt: int, new_tokens: int, outtype: str = "f32"
    ) -> float:
        """llama-batched-bench: `batch` sequences of `prompt` tokens, then `new_tokens` decoded in lockstep."""
        ctx = batch * (prompt + new_tokens) + 64
        cmd = [str(self.bin / "llama-batched-bench"), "-m", str(gguf), "-c", str(ctx), "-b", "2048"]
        cmd += ["-ub", "512", "-npp", str(prompt), "-ntg", str(new_tokens), "-npl", str(batch)]
        cmd += ["-t", str(self.threads), "--output-format", "jsonl", *repack_off(outtype)]
        return parse_batched_bench(_run(cmd, capture=True))

    def server_command(self, gguf: Path, port: int, parallel: int, ctx_per_slot: int = 1024, outtype="f32"):
        """llama-server on 127.0.0.1:port with `parallel` slots of `ctx_per_slot` positions each."""
        cmd = [str(self.bin / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["-np", str(parallel), "-c", str(parallel * ctx_per_slot), "-t", str(self.threads)]
        return cmd + ["-tb", str(self.threads), *repack_off(outtype)]


def _has(program: str) -> bool:
    return any((Path(d) / program).is_file() for d in os.environ.get("PATH", "").split(os.pathsep))


def _run(cmd: list[str], cwd: Path | None = None, capture: bool = False) -> str:
    """Runs cmd; raises with its output's tail when it fails. Returns stdout when `capture`."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {done.returncode}:\n{tail}")
    return done.stdout if capture else ""
