"""A bounded load test of the real server on loopback: concurrent clients, streamed and whole responses,
clients that hang up mid-request, then a check that nothing leaked.

Starts `python -m serving` on the shipped model (benchmarks/server_process.py), or uses --url. Each of
--clients clients sends requests one after another until --requests have been sent in all: completions
and chat, streamed or not, n 1-2, sometimes logprobs/echo, max_tokens 1-16. A --disconnect share of them
hang up on purpose: a stream after its first event, a whole response before it arrives. At the end:
  - every other request must have succeeded (200 and a complete body, a stream ending in [DONE] with no
    error event); anything else is an unexpected error (429s are counted apart, as shed load);
  - the server's /metrics must show no busy slot and an empty queue once it settles (no leaked slots);
  - the server's resident memory (VmRSS) after the run is compared with before it (after a warm-up round).
Prints p50/p99 latency (whole request; time to first event for streams). The client is a small HTTP/1.1
client on raw asyncio sockets, so a hang-up is exactly a closed socket.

    python benchmarks/load_test.py                                  # 64 clients, 1,000 requests
    python benchmarks/load_test.py --requests 150                   # what CI runs (tests/test_load_test.py)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.server_process import ServerProcess  # noqa: E402

KEY = "sk-load-test"
PROMPTS = (
    "The for statement",
    "A function definition",
    "Exceptions are raised",
    "The import statement",
    "class C:",
    "Hello",
)


@dataclass
class Outcome:
    kind: str  # ok, disconnected (on purpose), shed (429), unexpected
    seconds: float = 0.0  # whole request (send to last byte)
    first_event: float | None = None  # streams: send to first event
    detail: str = ""


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    busy_slots: float = -1
    queue_length: float = -1
    engine_failed: float = 0  # the engine's requests_failed during the run
    engine_finished: float = 0  # requests the engine ran to the end (a cancelled one does not count)
    rss_samples: list[tuple[int, int]] = field(default_factory=list)  # (requests done, KiB) during the run

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    @property
    def unexpected(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == "unexpected"]

    @property
    def rss_growth_pct(self) -> float:
        return 100.0 * (self.rss_after_kib - self.rss_before_kib) / max(self.rss_before_kib, 1)

    def lines(self) -> list[str]:
        ok = [o for o in self.outcomes if o.kind == "ok"]
        whole = sorted(o.seconds for o in ok)
        firsts = sorted(o.first_event for o in ok if o.first_event is not None)
        out = [
            f"requests: {len(self.outcomes)} in {self.seconds:.1f} s ({len(self.outcomes) / max(self.seconds, 1e-9):.1f}/s)",
            f"  ok {len(ok)}, disconnected on purpose {self.count('disconnected')}, shed (429) "
            f"{self.count('shed')}, unexpected errors {len(self.unexpected)}",
            f"latency of a whole request: p50 {pct(whole, 50) * 1000:.0f} ms, p99 {pct(whole, 99) * 1000:.0f} ms",
            f"time to first event (streams): p50 {pct(firsts, 50) * 1000:.0f} ms, p99 {pct(firsts, 99) * 1000:.0f} ms",
            f"engine: {self.engine_finished:g} requests run to the end, "
            f"{len(self.outcomes) - self.count('shed') - self.engine_finished:g} cancelled by their client's "
            f"hang-up, {self.engine_failed:g} failed",
            f"after the run: busy slots {self.busy_slots:g}, queue length {self.queue_length:g}",
            f"server RSS: before {self.rss_before_kib / 1024:.1f} MiB, after {self.rss_after_kib / 1024:.1f} MiB "
            f"({self.rss_growth_pct:+.1f}%); during the run: "
            + ", ".join(f"{kib / 1024:.1f} MiB after {done}" for done, kib in self.rss_samples),
        ]
        out += [f"  unexpected: {o.detail}" for o in self.unexpected[:10]]
        shed = collections.Counter(o.detail for o in self.outcomes if o.kind == "shed")
        out += [f"  shed {n}x: {why}" for why, n in shed.most_common(3)]
        return out


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of sorted values; 0 for none."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def make_request(rng: random.Random, model: str) -> tuple[str, dict[str, Any]]:
    """A random request of the mix: (path, JSON body)."""
    common = {
        "model": model,
        "max_tokens": rng.randint(1, 16),
        "temperature": rng.choice([0, 0.8, 1.0]),
        "seed": rng.randrange(1 << 30),
        "stream": rng.random() < 0.5,
    }
    if rng.random() < 0.7:
        body = common | {"prompt": rng.choice(PROMPTS), "n": rng.choice([1, 1, 2])}
        if rng.random() < 0.3:
            body["logprobs"] = rng.randint(0, 3)
            body["echo"] = rng.random() < 0.5
        if body["stream"] and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        return "/v1/completions", body
    messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
    return "/v1/chat/completions", common | {"messages": messages}


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The body as it arrives (chunked, Content-Length or until EOF)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while piece := await reader.read(65536):
            yield piece


def check_body(path: str, body: dict[str, Any], raw: bytes) -> str | None:
    """None if a whole response is complete and well formed."""
    try:
        payload = json.loads(raw)
    except ValueError:
        return f"not JSON: {raw[:200]!r}"
    per_prompt = body.get("n", 1)
    if not isinstance(payload, dict) or len(payload.get("choices", [])) != per_prompt:
        return f"{path}: expected {per_prompt} choices: {raw[:300]!r}"
    if not all(c.get("finish_reason") in ("stop", "length") for c in payload["choices"]):
        return f"{path}: a choice without finish_reason: {raw[:300]!r}"
    return None


def check_events(events: list[bytes]) -> str | None:
    """None if a stream is complete: JSON chunks, no error event, then [DONE]."""
    if not events or events[-1] != b"data: [DONE]":
        return f"the stream did not end with [DONE] (last: {events[-1][:200] if events else None!r})"
    for e in events[:-1]:
        if not e.startswith(b"data: "):
            return f"not a data event: {e[:200]!r}"
        chunk = json.loads(e[6:])
        if "error" in chunk:
            return f"an error event: {e[:300]!r}"
    return None


async def one_request(
    port: int,
    key: str | None,
    path: str,
    body: dict[str, Any],
    hang_up: bool,
    rng: random.Random,
    timeout: float,
) -> Outcome:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n"
        + (f"Authorization: Bearer {key}\r\n" if key else "")
        + "\r\n"
    )
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + data)
        await writer.drain()
        if hang_up and not body["stream"]:  # hang up while the server works on it
            await asyncio.sleep(rng.uniform(0, 0.3))
            return Outcome("disconnected", time.perf_counter() - start)
        status, headers = await asyncio.wait_for(read_head(reader), timeout)
        if status == 429:  # load shed: must say so in OpenAI's shape, and when to come back
            raw = b"".join([p async for p in body_pieces(reader, headers)])
            error = json.loads(raw).get("error", {})
            if error.get("type") != "server_overloaded" or "retry-after" not in headers:
                return Outcome(
                    "unexpected", detail=f"{path} 429 without the envelope or Retry-After: {raw[:300]!r}"
                )
            return Outcome("shed", time.perf_counter() - start, detail=error.get("message", ""))
        if status != 200:
            raw = b"".join([p async for p in body_pieces(reader, headers)])
            return Outcome("unexpected", detail=f"{path} {status}: {raw[:300]!r}")
        if not body["stream"]:
            raw = b"".join([p async for p in body_pieces(reader, headers)])
            problem = check_body(path, body, raw)
            return Outcome(
                "unexpected" if problem else "ok", time.perf_counter() - start, detail=problem or ""
            )
        buffer, events, first = b"", [], None
        async for piece in body_pieces(reader, headers):
            buffer += piece
            *done, buffer = buffer.split(b"\n\n")
            events += done
            if events and first is None:
                first = time.perf_counter() - start
                if hang_up:
                    return Outcome("disconnected", first, first)
        problem = check_events(events)
        return Outcome("unexpected" if problem else "ok", time.perf_counter() - start, first, problem or "")
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:  # noqa: UP041
        return Outcome("unexpected", detail=f"{path}: {type(e).__name__}: {e}")
    finally:
        writer.close()  # without reading further: for a hang-up, the server sees the connection go


async def drive(
    port: int,
    key: str | None,
    model: str,
    requests: int,
    clients: int,
    disconnect: float,
    seed: int,
    timeout: float,
    eos: int,
    on_progress: Callable[[int], None] | None = None,
    retry_shed: float | None = None,
) -> tuple[list[Outcome], float]:
    rng = random.Random(seed)
    plan = []
    for _ in range(requests):
        path, body = make_request(rng, model)
        hang_up = rng.random() < disconnect
        if hang_up:  # long enough that the hang-up comes mid-generation and must cancel it
            body |= {"max_tokens": rng.randint(64, 200), "logit_bias": {str(eos): -100}}
        plan.append((path, body, hang_up))
    outcomes: list[Outcome] = []
    queue = iter(plan)
    done = 0  # requests of the plan that have ended (refusals that are sent again not counted)

    async def client(i: int) -> None:
        nonlocal done
        client_rng = random.Random(seed * 1000 + i)
        for path, body, hang_up in queue:
            while True:
                outcome = await one_request(port, key, path, body, hang_up, client_rng, timeout)
                outcomes.append(outcome)
                if outcome.kind != "shed" or retry_shed is None:
                    break
                # Back off and send the same request again, as OpenAI's clients do on a 429 (sooner than
                # the server's Retry-After, to keep the pressure on).
                await asyncio.sleep(retry_shed * client_rng.uniform(0.5, 1.5))
            done += 1
            if on_progress is not None:
                on_progress(done)

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return outcomes, time.perf_counter() - start


def settle(server: ServerProcess, timeout: float = 30) -> dict[str, float]:
    """Polls /metrics until no slot is busy and nothing waits (cancelled requests free theirs at the next
    chunk); returns the last metrics."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = m.get("gpt2jax_engine_busy_slots", 0) == 0 and m.get("gpt2jax_engine_queue_length", 0) == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def run(
    server: ServerProcess,
    *,
    requests: int = 1000,
    clients: int = 64,
    disconnect: float = 0.1,
    warmup: int = 256,
    seed: int = 0,
    timeout: float = 120,
    retry_shed: float | None = None,
) -> LoadReport:
    """The load test against a started, healthy server. With `retry_shed` (seconds), a request refused
    with 429 is sent again after about that long, until it is served; each refusal is an outcome of its
    own, so every request of the plan ends in exactly one outcome other than "shed"."""
    model = json.loads(server.get("/v1/models")[1])["data"][0]["id"]
    eos = json.loads(server.get("/tokenize", body={"prompt": "<|endoftext|>"})[1])["tokens"][0]
    go = lambda n, s, progress=None: asyncio.run(
        drive(server.port, server.key, model, n, clients, disconnect, s, timeout, eos, progress, retry_shed)
    )
    go(warmup, seed + 1)  # first-use costs (allocations, caches) before the baseline
    before = settle(server)
    report = LoadReport(rss_before_kib=server.rss_kib())
    marks = {requests * q // 4 for q in (1, 2, 3)}

    def sample(done: int) -> None:  # resident memory at each quarter of the run
        if done in marks:
            report.rss_samples.append((done, server.rss_kib()))

    report.outcomes, report.seconds = go(requests, seed, sample)
    after = settle(server)
    time.sleep(1.0)  # let freed memory go back before reading RSS
    report.rss_after_kib = server.rss_kib()
    report.busy_slots = after.get("gpt2jax_engine_busy_slots", -1)
    report.queue_length = after.get("gpt2jax_engine_queue_length", -1)
    delta = lambda name: after.get(name, 0) - before.get(name, 0)
    report.engine_failed = delta("gpt2jax_engine_requests_failed_total")
    report.engine_finished = delta("gpt2jax_engine_requests_finished_total")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--disconnect", type=float, default=0.1, help="share of requests that hang up on purpose")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rss-growth", type=float, default=10.0, help="percent allowed (default 10)")
    p.add_argument("--log", default="load_test_server.log", help="the started server's log")
    args = p.parse_args(argv)
    from benchmarks.common import machine

    with ServerProcess({"API_KEYS": KEY}, log_path=args.log) as server:
        print(f"server pid {server.pid} at {server.url}; ready in {server.wait_healthy():.1f} s", flush=True)
        report = run(
            server, requests=args.requests, clients=args.clients, disconnect=args.disconnect, seed=args.seed
        )
        print(f"machine: {machine()}; {args.clients} clients, {args.requests} requests, seed {args.seed}")
        print("\n".join(report.lines()))
        ok = (
            not report.unexpected
            and report.busy_slots == 0
            and report.queue_length == 0
            and report.engine_failed == 0
            and report.rss_growth_pct <= args.max_rss_growth
        )
        print("load test: PASSED" if ok else "load test: FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
