"""How a serving process joins the others of a multi-process server (gpt2jax/engine/multihost.py): the settings
and jax.distributed's initialization.

Settings (environment; all processes get the same ones except PROCESS_ID):
    COORDINATOR_ADDRESS   host:port of process 0's coordinator (jax.distributed), e.g. 10.0.0.1:8476
    NUM_PROCESSES         how many processes
    PROCESS_ID            this process's index, 0 for the one serving HTTP
    DISTRIBUTED=auto      instead of the three above: let JAX find them (TPU pod slices, SLURM, ...)
    HEARTBEAT_TIMEOUT     seconds without a heartbeat from a process before JAX's coordination service
                          aborts the others (default 100, JAX's), so a supervisor can restart the group
    STARTUP_TIMEOUT       seconds the processes wait for each other at start: to join (jax.distributed)
                          and for the slowest to load and compile its models (default 1800)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

log = logging.getLogger("gpt2jax.cluster")


class ClusterError(ValueError):
    """A cluster setting is missing or malformed; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins the others (jax.distributed); `enabled` False: a single process."""

    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    auto: bool = False  # DISTRIBUTED=auto: JAX detects the cluster
    heartbeat_timeout: int = 100  # seconds; JAX's default
    # Seconds to wait for the others at start (jax.distributed's connection, the warm-up barrier): loading
    # and compiling a model on a busy machine can take many minutes, and nothing is lost by waiting.
    startup_timeout: int = 1800

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator_address is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Cluster:
        get = lambda name: (env.get(name) or "").strip()
        mode, address = get("DISTRIBUTED").lower(), get("COORDINATOR_ADDRESS")
        if mode not in ("", "auto", "0", "off"):
            raise ClusterError(f"DISTRIBUTED={mode!r}: expected auto (or leave it unset)")
        timeouts = dict(
            heartbeat_timeout=_seconds(get, "HEARTBEAT_TIMEOUT", cls.heartbeat_timeout),
            startup_timeout=_seconds(get, "STARTUP_TIMEOUT", cls.startup_timeout),
        )
        if mode == "auto" and not address:
            return cls(auto=True, **timeouts)
        if not address:
            if get("NUM_PROCESSES") not in ("", "1") or get("PROCESS_ID") not in ("", "0"):
                raise ClusterError(
                    "NUM_PROCESSES and PROCESS_ID need COORDINATOR_ADDRESS (host:port of process 0)"
                )
            return cls()
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ClusterError(f"COORDINATOR_ADDRESS={address!r}: expected host:port")
        n, pid = _int(get, "NUM_PROCESSES"), _int(get, "PROCESS_ID")
        if n < 1 or not 0 <= pid < n:
            raise ClusterError(f"PROCESS_ID={pid}: expected 0..NUM_PROCESSES-1 ({n - 1})")
        return cls(address, n, pid, **timeouts)


def _int(get: Callable[[str], str], name: str) -> int:
    raw = get(name)
    if not raw.isdigit():
        raise ClusterError(f"{name}={raw!r}: expected a whole number")
    return int(raw)


def _seconds(get: Callable[[str], str], name: str, default: int) -> int:
    value = _int(get, name) if get(name) else default
    if value < 1:
        raise ClusterError(f"{name}={value}: expected at least 1 (seconds)")
    return value


def initialize(cluster: Cluster) -> None:
    """jax.distributed.initialize for this cluster: call before anything touches a device."""
    import jax

    # CPU devices of several processes talk over Gloo: JAX 0.10's default, unset in some older ones.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The CPU backend's start exchanges the devices of every process (defaults: 2 and 5 minutes).
    minutes = -(-cluster.startup_timeout // 60)
    if minutes > jax.config.jax_cpu_get_local_topology_timeout_minutes:
        jax.config.update("jax_cpu_get_local_topology_timeout_minutes", minutes)
        jax.config.update("jax_cpu_get_global_topology_timeout_minutes", minutes + 1)
    timeouts = dict(
        initialization_timeout=cluster.startup_timeout, heartbeat_timeout_seconds=cluster.heartbeat_timeout
    )
    if cluster.auto:
        jax.distributed.initialize(**timeouts)
    else:
        jax.distributed.initialize(
            cluster.coordinator_address, cluster.num_processes, cluster.process_id, **timeouts
        )
    log.info(
        "process %d of %d: %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
