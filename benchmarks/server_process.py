"""The real server (`python -m serving`) in a subprocess on loopback, for the load test, the fuzzer and tests.

    with ServerProcess({"API_KEYS": "sk-x"}, log_path="server.log") as srv:
        srv.wait_healthy()
        srv.rss_kib(), srv.metrics()["gpt2jax_engine_busy_slots"]
        srv.terminate()   # SIGTERM: drains, exits 0

The code served is this checkout's (its root goes first on PYTHONPATH); the model defaults to the shipped
`checkpoints/pydoc-tiny`. Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "checkpoints" / "pydoc-tiny"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `python -m serving` process; `env` is added to this process's environment."""

    def __init__(self, env: dict[str, str] | None = None, log_path: str | Path | None = None) -> None:
        self.port = int((env or {}).get("PORT") or free_port())
        self.env = {
            **os.environ,
            "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
            "MODELS": str(SHIPPED_MODEL),
            "HOST": "127.0.0.1",
            **(env or {}),
            "PORT": str(self.port),
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        self.key = self.env.get("API_KEYS", "").split(",")[0].strip() or None
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "serving"],
                env=self.env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the child has its own descriptor
        return self

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def get(self, path: str, timeout: float = 10, key: bool = True, body: Any = None) -> tuple[int, bytes]:
        """GET path (POST with a JSON `body`) -> (status, body); (0, b"") when nothing answers."""
        headers = {"Authorization": f"Bearer {self.key}"} if key and self.key else {}
        data = None if body is None else json.dumps(body).encode()
        try:
            request = urllib.request.Request(
                self.url + path, data, headers | {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (OSError, urllib.error.URLError):
            return 0, b""

    def health(self) -> tuple[int, dict[str, Any]]:
        status, body = self.get("/health", key=False)
        try:
            return status, json.loads(body) if body else {}
        except ValueError:
            return status, {}

    def wait_healthy(self, timeout: float = 300) -> float:
        """Polls /health until 200; returns the seconds it took. Raises if the process exits or time runs out."""
        start = time.monotonic()
        while self.health()[0] != 200:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited ({self.proc and self.proc.returncode}):\n{self.log_tail()}"
                )
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"the server was not healthy within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)
        return time.monotonic() - start

    def rss_kib(self) -> int:
        """Resident memory of the server process (VmRSS from /proc), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")

    def metrics(self) -> dict[str, float]:
        """/metrics as {name or name{labels}: value}; a metric with labels also appears summed by name."""
        status, body = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            m = _SAMPLE.match(line)
            if m and not line.startswith("#"):
                name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
                out[name + labels] = value
                if labels:
                    out[name] = out.get(name, 0.0) + value
        return out

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (the server drains its in-flight requests), then waits for the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> int:
        """SIGKILL: no draining, no clean-up (a crash)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(30)

    def stop(self) -> None:
        """Terminates if still running; kills if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.terminate(60)
        except subprocess.TimeoutExpired:
            self.kill()
