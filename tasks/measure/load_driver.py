"""The load generator of `requant loadtest`, run as its own process: `python -m tasks.measure.load_driver SPEC OUT`.

An open-loop generator on asyncio (uvloop when importable) over raw keep-alive HTTP/1.1
connections: no Locust, no gevent. SPEC and OUT are JSON files (the plan in, the measured steps
out); the caller (tasks/measure/loadtest.py) bounds this process in time and stops it by its PID. A
process of its own keeps the generator's CPU apart from MLflow, Prefect and ONNX Runtime in the
caller, and lets it measure its own CPU share.

Open loop: request i of a step is due at t0 + i/rate whatever happened to the requests before it.
It takes an idle connection, or opens one while fewer than `max_connections` are open, or waits
for one; its latency runs from its due time, so time spent queued in the client counts (a server
that falls behind cannot hide it by slowing the client down: no coordinated omission).

The search: steps of a fixed offered rate, multiplied by `step_factor` until a step fails (the
ramp), then bisected between the highest rate that held and the lowest that failed (the refine
phase) until failed / held - 1 <= `resolution`. Bisection is geometric (the midpoint is
sqrt(held * failed)): the stop rule is a ratio, and a geometric midpoint halves the log-ratio at
each step. Worked through with the defaults (start 5/s, factor 1.5, resolution 10%) on a server
that holds 100 requests/s: the ramp holds 5 ... 86.5 and fails 129.7 (ratio 1.5); refine tries
105.9 (fails, ratio 1.22), 95.7 (holds, 1.107), 100.7 (fails, 1.052 <= 1.10): capacity lies
between 95.7 and 100.7 requests/s after 12 + 3 steps. Every step counts against `max_steps`,
and `max_requests` and `max_seconds` bound the whole test.

SPEC keys: url, server_pid (CPU of the server and its children is measured; null = not measured),
texts, texts_per_request, slo_ms, start_rps, step_factor, step_seconds, max_steps, max_requests,
max_seconds, max_connections (old name max_users accepted), max_error_rate, resolution (default
0.10), warmup_requests (default 20: sent one at a time before the first step, not counted: the
first requests pay the server's lazy initialisation).

OUT: {"steps": [step, ...], "stop_reason", "requests" (issued in steps), "seconds" (whole test,
warm-up included), "held_rps", "failed_rps", "resolved", "resolution", "generator_cpu_percent",
"warmup_requests", "warmup_failures"}; each step is described in `StepRecorder.step`.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

import psutil

# A step counts as sustained only if the server absorbed nearly all of the offered rate.
MIN_ACHIEVED_SHARE = 0.9
DEFAULT_RESOLUTION = 0.10
DEFAULT_WARMUP_REQUESTS = 20
# Distinct error strings kept per step, each with its count; the rest are counted together.
ERRORS_KEPT = 3
# The scheduler sleeps at least this long between wake-ups: the loop's timers are ~1 ms, and a shorter sleep
# returns at once and spins, burning the CPU the server shares with the generator. Requests due in between
# go out together at the next wake-up, their wait counted in their latency.
MIN_SLEEP_S = 0.001
# A warm-up request that takes longer than this is given up (the server is still loading, or stuck).
WARMUP_TIMEOUT_S = 30.0


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 the generator can read."""


def server_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of the server process and all its children (uvicorn workers)."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def encode_requests(host: str, port: int, texts: list[str], texts_per_request: int,
                    params: dict | None = None) -> list[bytes]:
    """Whole `POST /invocations` requests, headers and JSON body, ready to write: `texts_per_request` texts
    each, cycling through `texts` (as many distinct bodies as the texts fill, at least one), with
    `params` in every body when given (a generator's max_new_tokens and ignore_eos)."""
    if not texts:
        raise ValueError("no texts to send")
    bodies = []
    for i in range(max(1, len(texts) // texts_per_request)):
        content: dict = {"inputs": [texts[(i * texts_per_request + j) % len(texts)] for j in range(texts_per_request)]}
        if params:
            content["params"] = params
        body = json.dumps(content).encode()
        head = (f"POST /invocations HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("ascii")
        bodies.append(head + body)
    return bodies


class Connection:
    """One keep-alive HTTP/1.1 connection: write a request, read its answer, then the next."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.reusable = True
        self.used = False  # has answered a request: a failure on it before any byte may be a stale keep-alive

    @property
    def closed(self) -> bool:
        """The server closed it (EOF seen) or we did."""
        return self.reader.at_eof() or self.writer.is_closing()

    def close(self) -> None:
        self.reusable = False
        self.writer.close()

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send `request`, return (HTTP status, body). The body is read by Content-Length (or chunked, or up
        to EOF); a `Connection: close` answer leaves the connection unusable.

        Raises:
            ProtocolError: an answer that is not HTTP.
            OSError, asyncio.IncompleteReadError: the connection broke.
        """
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1."):
            raise ProtocolError(f"not an HTTP answer: {head[:40]!r}")
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0][9:12])
        except ValueError:
            raise ProtocolError(f"bad status line {lines[0][:60]!r}") from None
        length, chunked = None, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection" and b"close" in value.lower():
                self.reusable = False
        if head.startswith(b"HTTP/1.0"):
            self.reusable = False
        if chunked:
            body = await self._read_chunked()
        elif length is not None:
            body = await self.reader.readexactly(length) if length else b""
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:  # no length: the body runs to the end of the connection
            body = await self.reader.read()
            self.reusable = False
        self.used = True
        return status, body

    async def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await self.reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            parts.append((await self.reader.readexactly(size + 2))[:-2])


class ConnectionPool:
    """At most `limit` connections to (host, port): idle ones are reused last-in first-out (the warmest),
    new ones opened while under the cap, and otherwise a request waits for the next one freed."""

    def __init__(self, host: str, port: int, limit: int):
        self.host, self.port, self.limit = host, port, max(1, limit)
        self.idle: list[Connection] = []
        self.open = 0
        self.used: set[Connection] = set()  # the connections that carried a request since the last reset_used
        self.waiters: deque[asyncio.Future] = deque()

    def reset_used(self) -> None:
        self.used.clear()

    async def acquire(self) -> Connection:
        """An idle connection, a new one, or the next one released.

        Raises:
            OSError: a new connection could not be opened.
        """
        connection = await self._acquire()
        self.used.add(connection)
        return connection

    async def _acquire(self) -> Connection:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection
            self._drop(connection)
        if self.open >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed over just as we were cancelled: pass it on
                    if waiter.result() is not None:
                        self.release(waiter.result())
                    else:
                        self._free_slot()
                raise
            if handed is not None:
                return handed
            # None: a connection was dropped and its slot handed to us; fall through and open one.
        else:
            self.open += 1
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except BaseException:
            self._free_slot()
            raise
        return Connection(reader, writer)

    def release(self, connection: Connection) -> None:
        """Give back a connection after a request; a broken or closing one is dropped and its slot handed on."""
        if not connection.reusable or connection.closed:
            self._drop(connection)
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self.idle.append(connection)

    def discard(self, connection: Connection) -> None:
        """Close a connection that must not be reused (an error, or a request cut off mid-answer)."""
        self._drop(connection)

    def _drop(self, connection: Connection) -> None:
        connection.close()
        self._free_slot()

    def _free_slot(self) -> None:
        """One connection fewer is open: the first live waiter, if any, takes the slot to open its own."""
        self.open -= 1
        if self._hand_slot():
            self.open += 1

    def _hand_slot(self) -> bool:
        """Wake the first live waiter to open a connection itself (we hand it None); True if one was."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return True
        return False

    def close_all(self) -> None:
        for connection in self.idle:
            connection.close()
        self.open -= len(self.idle)
        self.idle.clear()


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of an ascending list; None when empty."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


class StepRecorder:
    """Outcomes of one step's requests, as they end."""

    def __init__(self):
        self.latencies_ms: list[float] = []  # every issued request: until its answer, its error or its cut-off
        self.schedule_lag_ms: list[float] = []  # due time to the moment the generator issued it
        self.answered = 0  # any HTTP status
        self.succeeded = 0  # 2xx
        self.failures = 0
        self.status_counts: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.other_errors = 0
        self.last_end = 0.0
        self.ok_latencies_ms: list[float] = []  # of the 2xx answers

    def answer(self, due: float, status: int, body: bytes) -> None:
        end = time.perf_counter()
        self.latencies_ms.append(1000.0 * (end - due))
        self.last_end = max(self.last_end, end)
        self.answered += 1
        self.status_counts[str(status)] = self.status_counts.get(str(status), 0) + 1
        if 200 <= status < 300:
            self.succeeded += 1
            self.ok_latencies_ms.append(self.latencies_ms[-1])
        else:
            text = body[:120].decode("utf-8", "replace").strip()
            self.fail(due, f"HTTP {status}: {text}" if text else f"HTTP {status}", ended=False)

    def fail(self, due: float, error: str, ended: bool = True) -> None:
        if ended:
            end = time.perf_counter()
            self.latencies_ms.append(1000.0 * (end - due))
            self.last_end = max(self.last_end, end)
        self.failures += 1
        error = error[:300]
        if error in self.errors or len(self.errors) < ERRORS_KEPT:
            self.errors[error] = self.errors.get(error, 0) + 1
        else:
            self.other_errors += 1

    def step(self, rate: float, t0: float, window_s: float, issued: int, connections: int,
             server_cpu_s: float | None, generator_cpu_s: float, capped: bool, phase: str) -> dict:
        """The step's record.

        Keys: offered_rps, users (connections that carried a request), seconds (from the first due time
        to the last answer, at least the issuing window), requests (answered, any status), failures
        (non-2xx answers, connection errors, requests cut off after the step), achieved_rps (2xx
        answers / (seconds less the median 2xx latency, at least the issuing window)), error_rate (failures / issued), p50_ms/p95_ms/p99_ms (over every issued
        request, from its due time; a failed or cut-off request counts with the time until it
        failed), schedule_lag_p95_ms (due time to issue: above a few ms the generator itself fell
        behind), server_cpu_percent and generator_cpu_percent (of one core), capped_by_request_budget,
        errors (the first 3 distinct errors as "Nx error"), issued, status_counts, phase
        ("ramp" or "refine"); failed_because is added by the search.
        """
        seconds = max(window_s, self.last_end - t0)
        # A server that keeps pace answers the last request about one typical latency after it was due, so its
        # answers span the issuing window shifted by that time: the served rate is taken over the span less the
        # median answer's latency, or a service whose requests take seconds (a decoder's) would look like one
        # falling behind. A server that does fall behind answers its last requests far later than the median.
        service_s = (percentile(sorted(self.ok_latencies_ms), 0.50) or 0.0) / 1000.0
        span = max(window_s, self.last_end - t0 - service_s)
        latencies = sorted(self.latencies_ms)
        errors = [f"{n}x {error}" for error, n in self.errors.items()]
        if self.other_errors:
            errors.append(f"{self.other_errors}x other errors")
        return {
            "phase": phase, "offered_rps": rate, "users": connections, "seconds": seconds,
            "requests": self.answered, "failures": self.failures, "issued": issued,
            "achieved_rps": self.succeeded / span if span > 0 else 0.0,
            "error_rate": self.failures / issued if issued else 1.0,
            "p50_ms": percentile(latencies, 0.50), "p95_ms": percentile(latencies, 0.95),
            "p99_ms": percentile(latencies, 0.99),
            "schedule_lag_p95_ms": percentile(sorted(self.schedule_lag_ms), 0.95),
            "server_cpu_percent": 100.0 * server_cpu_s / seconds if server_cpu_s is not None and seconds > 0 else None,
            "generator_cpu_percent": 100.0 * generator_cpu_s / seconds if seconds > 0 else 0.0,
            "capped_by_request_budget": capped, "errors": errors, "status_counts": self.status_counts,
        }


def describe(exc: BaseException) -> str:
    """An error as one line: its type and message."""
    if isinstance(exc, asyncio.IncompleteReadError):
        return f"connection closed by the server after {len(exc.partial)} bytes of the answer"
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")


async def send(pool: ConnectionPool, request: bytes, due: float, record: StepRecorder) -> None:
    """One request, recorded as an answer or a failure. A reused keep-alive connection that the server closed
    while idle fails before any byte comes back: then the request is sent once more on a fresh connection."""
    for attempt in (1, 2):
        connection = None
        try:
            connection = await pool.acquire()
            stale_possible = connection.used
            status, body = await connection.exchange(request)
        except asyncio.CancelledError:
            if connection is not None:
                pool.discard(connection)
            record.fail(due, "cut off: no answer when the step's wait for in-flight requests ended")
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError, ValueError) as exc:
            if connection is not None:
                pool.discard(connection)
                no_answer = isinstance(exc, (ConnectionResetError, BrokenPipeError)) or (
                    isinstance(exc, asyncio.IncompleteReadError) and not exc.partial)
                if attempt == 1 and stale_possible and no_answer:
                    continue
            record.fail(due, describe(exc))
            return
        pool.release(connection)
        record.answer(due, status, body)
        return


async def run_step(pool: ConnectionPool, requests: list[bytes], first_request: int, rate: float, seconds: float,
                   requests_left: int, drain_s: float, server_pid: int | None, phase: str) -> dict:
    """Offer `rate` requests/s for `seconds` (or until `requests_left` are issued), wait at most `drain_s` for the
    requests still in flight (then cut them off), and return what was measured."""
    planned = max(1, math.floor(rate * seconds))
    count = min(planned, requests_left)
    capped = count < planned
    window_s = count / rate
    record = StepRecorder()
    pool.reset_used()
    in_flight: set[asyncio.Task] = set()
    cpu_server, cpu_self = server_cpu_seconds(server_pid), time.process_time()
    t0 = time.perf_counter()
    issued = 0
    while issued < count:
        now = time.perf_counter()
        # Issue every request whose time has come (at high rates several per wake-up: the timer is ~1 ms).
        while issued < count and t0 + issued / rate <= now:
            due = t0 + issued / rate
            record.schedule_lag_ms.append(1000.0 * (now - due))
            task = asyncio.create_task(send(pool, requests[(first_request + issued) % len(requests)], due, record))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            issued += 1
        if issued < count:
            await asyncio.sleep(max(MIN_SLEEP_S, t0 + issued / rate - time.perf_counter()))
    if in_flight:
        remaining = max(0.0, t0 + window_s + drain_s - time.perf_counter())
        _, pending = await asyncio.wait(set(in_flight), timeout=remaining)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    for _ in range(issued - len(record.latencies_ms)):  # cancelled before it ran: it never got an answer either
        record.fail(t0 + window_s, "cut off before it was sent")
    cpu_self = time.process_time() - cpu_self
    cpu_server = server_cpu_seconds(server_pid) - cpu_server if server_pid is not None else None
    return record.step(rate, t0, window_s, issued, len(pool.used), cpu_server, cpu_self, capped, phase)


def judge_step(step: dict, slo_ms: float, max_error_rate: float) -> str | None:
    """Why a step is not sustained, or None if it is."""
    if step["requests"] == 0:
        return "no request completed"
    if step["error_rate"] > max_error_rate:
        return f"error rate {step['error_rate']:.1%} above {max_error_rate:.1%}"
    if step["p95_ms"] > slo_ms:
        return f"p95 {step['p95_ms']:.0f} ms above the {slo_ms:.0f} ms target"
    if step["achieved_rps"] < MIN_ACHIEVED_SHARE * step["offered_rps"]:
        return f"served {step['achieved_rps']:.1f} of {step['offered_rps']:.1f} requests/s offered"
    return None


def interval(steps: list[dict]) -> tuple[float | None, float | None]:
    """(highest offered rate that held, lowest offered rate above it that failed); None where there is none."""
    held = max((s["offered_rps"] for s in steps if not s["failed_because"]), default=None)
    failed = min((s["offered_rps"] for s in steps if s["failed_because"] and (held is None or s["offered_rps"] > held)),
                 default=None)
    return held, failed


# The lowest rate the search descends to when every step so far failed.
MIN_RPS = 0.5
# The highest rate a step offers: well above what one generator process on these hosts can issue (about
# 8,000-16,000/s against a server that answers at once), so a start estimated from a huge batched
# throughput cannot ask for millions of requests in one step.
MAX_RPS = 20000.0


def next_rate(steps: list[dict], step_factor: float, resolution: float,
              min_rps: float = MIN_RPS) -> tuple[float, str] | str:
    """The next step's (rate, phase), or why the search is over (a string).

    Up by `step_factor` while steps hold; down by its square while every step failed (a start
    above the capacity finds it from above), not below `min_rps`; then bisection between the two bounds.
    """
    held, failed = interval(steps)
    if failed is None:
        if steps[-1]["offered_rps"] >= MAX_RPS:
            return f"held {MAX_RPS:.0f} requests/s, the most the generator offers"
        return min(steps[-1]["offered_rps"] * step_factor, MAX_RPS), "ramp"
    if held is None:
        lower = failed / step_factor ** 2
        if lower < min_rps:
            return (f"no step held, down to {failed:.1f} requests/s: {steps[-1]['failed_because']}")
        return lower, "descend"
    if failed / held - 1 <= resolution:
        return f"resolved: held {held:.1f}, failed {failed:.1f} requests/s (within {resolution:.0%})"
    return math.sqrt(held * failed), "refine"


async def warm_up(pool: ConnectionPool, requests: list[bytes], count: int, deadline: float) -> tuple[int, float | None]:
    """Send `count` requests one at a time (not measured), until `deadline`; return (how many failed,
    the median latency in ms of those answered: the idle server's latency)."""
    failures, latencies = 0, []
    for i in range(count):
        if time.perf_counter() >= deadline:
            break
        record = StepRecorder()
        try:
            await asyncio.wait_for(send(pool, requests[i % len(requests)], time.perf_counter(), record),
                                   timeout=min(WARMUP_TIMEOUT_S, max(0.1, deadline - time.perf_counter())))
        except asyncio.TimeoutError:
            failures += 1
            continue
        failures += record.failures
        if not record.failures:
            latencies += record.latencies_ms
    return failures, (sorted(latencies)[len(latencies) // 2] if latencies else None)


async def settle(pool: ConnectionPool, request: bytes, idle_ms: float | None, deadline: float) -> float:
    """After a step that failed, wait until the server answers one request about as fast as when idle.

    A server pushed past its capacity still holds a backlog of requests the last step gave up on;
    the next step would measure that backlog, not its own rate. Probes go one at a time until one
    is answered within max(3 x the idle latency, 20 ms), or until `deadline`. Returns the seconds spent.
    """
    began = time.perf_counter()
    quick_ms = max(3 * (idle_ms or 5.0), 20.0)
    while time.perf_counter() < deadline:
        record = StepRecorder()
        try:
            await asyncio.wait_for(send(pool, request, time.perf_counter(), record),
                                   timeout=max(0.05, deadline - time.perf_counter()))
        except asyncio.TimeoutError:
            break
        if not record.failures and record.latencies_ms and record.latencies_ms[0] <= quick_ms:
            break
        await asyncio.sleep(0.05)
    return time.perf_counter() - began


async def search(spec: dict) -> dict:
    """Run the ramp and the refinement the spec describes; return every step and how the search ended."""
    target = urlsplit(spec["url"])
    host, port = target.hostname, target.port or 80
    requests = encode_requests(host, port, spec["texts"], spec["texts_per_request"], spec.get("params"))
    pool = ConnectionPool(host, port, spec.get("max_connections") or spec.get("max_users") or 64)
    resolution = spec.get("resolution", DEFAULT_RESOLUTION)
    slo_ms, server_pid = spec["slo_ms"], spec.get("server_pid")
    # After its window a step waits this long at most for answers, so steps do not overlap.
    drain_cap_s = 2 * slo_ms / 1000 + 0.5
    began, cpu_began = time.perf_counter(), time.process_time()
    deadline = began + spec["max_seconds"]
    warmup = spec.get("warmup_requests", DEFAULT_WARMUP_REQUESTS)
    # Warm-up may take a quarter of the time budget at most: it is not what is measured.
    warmup_failures, idle_ms = await warm_up(pool, requests, warmup, began + spec["max_seconds"] / 4)
    steps: list[dict] = []
    sent, rate, phase = 0, min(spec["start_rps"], MAX_RPS), "ramp"
    stop_reason = f"reached max_steps ({spec['max_steps']})"
    while len(steps) < spec["max_steps"]:
        left_s, left_requests = deadline - time.perf_counter(), spec["max_requests"] - sent
        if left_s < 1 or left_requests < 1:
            stop_reason = "time budget spent" if left_s < 1 else "request budget spent"
            break
        step_s = min(spec["step_seconds"], left_s)
        # The wait for answers stays inside the time budget too (a little over, so a step has time to end).
        drain_s = min(drain_cap_s, max(0.5, left_s - step_s))
        step = await run_step(pool, requests, sent, rate, step_s, left_requests, drain_s, server_pid, phase)
        sent += step["issued"]
        step["failed_because"] = judge_step(step, slo_ms, spec["max_error_rate"])
        steps.append(step)
        if step["capped_by_request_budget"]:
            stop_reason = "request budget spent"
            break
        following = next_rate(steps, spec["step_factor"], resolution, spec.get("min_rps") or MIN_RPS)
        if isinstance(following, str):
            stop_reason = following
            break
        rate, phase = following
        if step["failed_because"]:  # the next step starts on an idle server, not on this one's backlog
            # A backlog drains in about the target's time (a decoder's requests take seconds): wait that long at most.
            settle_s = max(5.0, 2 * slo_ms / 1000)
            step["settle_seconds"] = await settle(pool, requests[0], idle_ms,
                                                  min(deadline - 1, time.perf_counter() + settle_s))
    pool.close_all()
    seconds = time.perf_counter() - began
    held, failed = interval(steps)
    return {"steps": steps, "stop_reason": stop_reason, "requests": sent, "seconds": seconds,
            "held_rps": held, "failed_rps": failed,
            "resolved": held is not None and failed is not None and failed / held - 1 <= resolution,
            "resolution": resolution,
            "generator_cpu_percent": 100.0 * (time.process_time() - cpu_began) / seconds if seconds > 0 else 0.0,
            "warmup_requests": warmup, "warmup_failures": warmup_failures, "idle_latency_ms": idle_ms}


def run(spec: dict) -> dict:
    """`search` on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(search(spec))
    return uvloop.run(search(spec))


def main(argv: list[str]) -> int:
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    result = run(json.loads(spec_path.read_text()))
    out_path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
