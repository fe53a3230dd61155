"""Several processes as one server (gpt2jax/engine/multihost.py, gpt2jax/engine/wire.py).

The end-to-end test starts two `python -m serving` processes on loopback joined by jax.distributed (two CPU
devices each: a data 2 x model 2 mesh whose data axis spans the processes and whose model axis is tensor
parallel inside each), sends HTTP requests to process 0, compares with the one-process notebook API, and
stops both with SIGTERM. The other tests check the settings and the broadcast protocol in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from test_api_prod import free_port, get
from waits import HANG

import gpt2jax
from gpt2jax import cluster
from gpt2jax.cluster import Cluster, ClusterError
from gpt2jax.engine import multihost
from gpt2jax.engine.slots import make_row
from gpt2jax.engine.wire import INIT, NOOP, Channel, decode_row, encode_row
from gpt2jax.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_settings():
    assert not Cluster.from_env({}).enabled
    c = Cluster.from_env({"COORDINATOR_ADDRESS": "10.0.0.1:8476", "NUM_PROCESSES": "4", "PROCESS_ID": "3"})
    assert c.enabled and (c.coordinator_address, c.num_processes, c.process_id) == ("10.0.0.1:8476", 4, 3)
    assert Cluster.from_env({"DISTRIBUTED": "auto"}).auto
    assert (c.heartbeat_timeout, c.startup_timeout) == (100, 1800)
    auto = Cluster.from_env({"DISTRIBUTED": "auto", "HEARTBEAT_TIMEOUT": "7", "STARTUP_TIMEOUT": "60"})
    assert (auto.heartbeat_timeout, auto.startup_timeout) == (7, 60)
    bad = [
        ({"COORDINATOR_ADDRESS": "10.0.0.1"}, "host:port"),
        ({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2"}, "0..NUM_PROCESSES-1"),
        ({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "two", "PROCESS_ID": "0"}, "NUM_PROCESSES"),
        ({"NUM_PROCESSES": "2", "PROCESS_ID": "1"}, "need COORDINATOR_ADDRESS"),
        ({"DISTRIBUTED": "yes"}, "DISTRIBUTED"),
        ({"DISTRIBUTED": "auto", "HEARTBEAT_TIMEOUT": "soon"}, "HEARTBEAT_TIMEOUT"),
        ({"DISTRIBUTED": "auto", "HEARTBEAT_TIMEOUT": "0"}, "HEARTBEAT_TIMEOUT"),
        ({"DISTRIBUTED": "auto", "STARTUP_TIMEOUT": "0"}, "STARTUP_TIMEOUT"),
        ({"DISTRIBUTED": "auto", "STARTUP_TIMEOUT": "1.5"}, "STARTUP_TIMEOUT"),
    ]
    for env, message in bad:
        with pytest.raises(ClusterError, match=message):
            Cluster.from_env(env)


def row(**kw):
    settings = dict(
        temperature=0.7, top_k=5, top_p=0.9, presence_penalty=0.5, frequency_penalty=-1.0,
        logit_bias={3: 2.5, 500: -100.0}, seed=2**63 + 12345,
    )  # fmt: skip
    settings.update(kw)
    return make_row(7, 511, SamplingParams(max_tokens=20, logprobs=1, **settings), 512)


def test_a_slot_row_survives_the_broadcast_encoding():
    for r in (row(), row(logit_bias=(), temperature=0.0, seed=0)):
        back = decode_row(encode_row(r), 512)
        for a, b in zip(_leaves(r), _leaves(back), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


class Recorder:
    """Stands in for SlotPrograms: records its calls (with comparable arguments)."""

    windows = (32, 64)
    local_slots = 4
    chunk_size = 8
    config = gpt2jax.GPT2Config(n_vocab=512, n_ctx=64, n_embd=8, n_head=2, n_layer=1)

    def __init__(self, name: str) -> None:
        self.name, self.calls = name, []

    def init_state(self):
        self.calls.append(("init",))
        return 0

    def prefill(self, prompts, bucket, score):
        self.calls.append(("prefill", [list(p) for p in prompts], bucket, score))
        return [f"prefilled {list(p)}" for p in prompts]

    def insert(self, state, pre, slot, r):
        self.calls.append(("insert", state, pre, slot, encode_row(r)))
        return state + 1, None

    def decode(self, state, active, window, rows, steps):
        self.calls.append(("decode", state, np.asarray(active).tolist(), window, rows, steps))
        return state + 1, None


def test_followers_make_the_leaders_calls_in_its_order():
    wire: deque = deque()
    send = lambda x: (wire.append(np.array(x)), x)[1]
    leader = Channel(send, is_leader=True)
    programs = [Recorder("a"), Recorder("b")]
    led = [multihost.LeaderPrograms(p, i, leader) for i, p in enumerate(programs)]
    # What two engines' workers would do, interleaved.
    sa, sb = led[0].init_state(), led[1].init_state()
    pre = led[0].prefill([[1, 2, 3]], 16, True)
    sa, _ = led[0].insert(sa, pre[0], 5, row())
    sb, _ = led[1].decode(sb, np.array([True, False, True, True]), 64, 1, 3)
    long_prompt = list(range(300))  # a payload over the smallest broadcast size
    pre = led[1].prefill([[7], long_prompt], 512, False)
    sb, _ = led[1].insert(sb, pre[1], 0, row(logit_bias=None))  # the second prompt of the batch
    sa, _ = led[0].decode(sa, np.array([False, True]))  # no window, rows nor steps: the largest
    leader.send(NOOP)
    leader.stop()

    follower = Channel(lambda x: wire.popleft(), is_leader=False)
    followers = [Recorder("a"), Recorder("b")]
    multihost.follow(followers, follower)
    assert not wire
    for p, f in zip(programs, followers, strict=True):
        assert f.calls == p.calls
    assert [c[0] for c in followers[0].calls] == ["init", "prefill", "insert", "decode"]
    assert followers[1].calls[2] == ("prefill", [[7], long_prompt], 512, False)
    assert followers[1].calls[3][2] == f"prefilled {long_prompt}"
    assert followers[0].calls[3][-3:] == (64, 4, 8)
    assert followers[1].calls[1][-3:] == (64, 1, 3)


def test_each_process_meets_the_others_once_before_its_first_broadcast():
    """The start-up barrier comes before the first collective (it sets up Gloo, which waits only 30 s for
    the others), on the leader (its heartbeat or first call) and on a follower (its first receive)."""
    seen: list = []
    wire: deque = deque()
    send = lambda x: (seen.append("broadcast"), wire.append(np.array(x)), x)[2]
    leader = Channel(send, is_leader=True, meet=lambda: seen.append("met"))
    leader.send(NOOP)
    leader.send(INIT)
    leader.stop()
    assert seen == ["met", "broadcast", "broadcast", "broadcast"]

    seen.clear()
    receive = lambda x: (seen.append("broadcast"), wire.popleft())[1]
    follower = Channel(receive, is_leader=False, meet=lambda: seen.append("met"))
    multihost.follow([Recorder("a")], follower)
    assert seen == ["met", "broadcast", "broadcast", "broadcast"] and not wire


def _leaves(tree):
    import jax

    return [np.asarray(a) for a in jax.tree.leaves(tree)]


# ---- two processes, one server ----


# The processes wait for each other this long at start, and give up by themselves after it (or after
# HEARTBEAT_TIMEOUT once one is gone); the test's own waits only guard against a hang (tests/waits.py).
STARTUP_TIMEOUT = 1800


def post(base: str, body: dict) -> dict | str:
    req = urllib.request.Request(
        base + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=HANG) as r:
        return r.read().decode() if body.get("stream") else json.load(r)


@contextlib.contextmanager
def two_processes(tiny_checkpoint: Path, tmp_path: Path, **extra_env: str):
    """Starts `python -m serving` as processes 0 and 1 of one cluster on loopback and waits until process
    0 is healthy; yields (base URL, processes, a function giving both logs' tails); kills what is left."""
    port, coordinator = free_port(), free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "MODELS": str(tiny_checkpoint),
        "PORT": str(port),
        "COORDINATOR_ADDRESS": f"127.0.0.1:{coordinator}",
        "NUM_PROCESSES": "2",
        "MESH": "data:2,model:2",
        "SLOTS": "4",
        "LOG_LEVEL": "INFO",
        "STARTUP_TIMEOUT": str(STARTUP_TIMEOUT),
        **extra_env,
    }
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]  # noqa: SIM115 (read on failure)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "serving"],
            cwd=ROOT,
            env={**env, "PROCESS_ID": str(i), "JAX_CACHE_DIR": str(tmp_path / f"cache{i}")},
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    tail = lambda: "\n".join(f"--- process {i}\n{_tail(log)}" for i, log in enumerate(logs))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT + HANG
        while get(base + "/health") != 200:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, tail()
            time.sleep(0.2)
        yield base, procs, tail
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def test_two_processes_serve_a_request_end_to_end(tiny_checkpoint, tmp_path):
    with two_processes(tiny_checkpoint, tmp_path) as (base, procs, tail):
        lm = gpt2jax.load(tiny_checkpoint)
        prompt = "The for statement"
        greedy = post(base, {"model": "davinci", "prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert greedy["choices"][0]["text"] == lm.generate(prompt, max_tokens=12, temperature=0)[0]
        seeded = post(
            base,
            {
                "model": "davinci",
                "prompt": "import os",
                "max_tokens": 10,
                "temperature": 0.9,
                "n": 2,
                "seed": 3,
            },
        )
        want = lm.generate("import os", max_tokens=10, temperature=0.9, n=2, seed=3)
        assert [c["text"] for c in seeded["choices"]] == want and want[0] != want[1]
        stream = post(
            base, {"model": "davinci", "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}
        )
        events = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events) == greedy["choices"][0]["text"]
        assert stream.rstrip().endswith("data: [DONE]")

        for p in procs:
            p.send_signal(signal.SIGTERM)
        assert [p.wait(HANG) for p in procs] == [0, 0], tail()
        assert "process 0 stopped: leaving" in tail().split("--- process 1")[1]


def test_a_dead_follower_stops_the_leader_after_the_heartbeat_timeout(tiny_checkpoint, tmp_path):
    """A killed process 1 must not leave process 0 serving a cluster that can no longer run anything:
    JAX's coordination service aborts it once HEARTBEAT_TIMEOUT passes, for a supervisor to restart."""
    with two_processes(tiny_checkpoint, tmp_path, HEARTBEAT_TIMEOUT="20") as (base, procs, tail):
        procs[1].kill()
        procs[1].wait()
        killed = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            procs[0].wait(HANG)
        waited = time.monotonic() - killed
        assert procs[0].returncode not in (None, 0), (waited, tail())
        # JAX says why. That HEARTBEAT_TIMEOUT reaches JAX is checked without a clock below. 20 s rather
        # than less: a live process starved of CPU by a busy machine must not miss its heartbeats.
        assert "stopped sending heartbeats" in (tmp_path / "process0.log").read_text(), (waited, tail())


def test_the_timeouts_reach_jax_distributed(monkeypatch):
    import jax

    calls, updates = [], {}
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.__setitem__(name, value))
    env = {"COORDINATOR_ADDRESS": "127.0.0.1:1", "NUM_PROCESSES": "2", "PROCESS_ID": "1"}
    cluster.initialize(Cluster.from_env({**env, "HEARTBEAT_TIMEOUT": "5"}))
    assert calls[-1] == (
        ("127.0.0.1:1", 2, 1),
        {"initialization_timeout": 1800, "heartbeat_timeout_seconds": 5},
    )
    # The CPU backend's exchange of devices between processes waits as long (in minutes).
    assert updates["jax_cpu_get_local_topology_timeout_minutes"] == 30
    assert updates["jax_cpu_get_global_topology_timeout_minutes"] == 31
    cluster.initialize(Cluster.from_env({"DISTRIBUTED": "auto", "STARTUP_TIMEOUT": "90"}))
    assert calls[-1] == ((), {"initialization_timeout": 90, "heartbeat_timeout_seconds": 100})


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]
