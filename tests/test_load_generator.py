"""The open-loop load generator (tasks/measure/load_driver.py) against real HTTP servers of known capacity.

Each server is a small asyncio script on 127.0.0.1 that answers /invocations one request at a time
after a fixed service time (a blocking sleep: one worker, so `1 / service` requests/s at most),
with a chosen status, or after a stall on its first request. The driver runs as its own process, as
`requant loadtest` runs it. The host is small and shared, so the bounds are wide, but each would be
broken by a generator that ramps, bisects, times or counts wrongly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.servers import HOST, background, free_port, wait_until_answering

ROOT = Path(__file__).resolve().parents[1]

# One worker: the sleep blocks the event loop, so requests are served strictly one after another.
SERVER = r'''
import asyncio, sys, time

PORT, SERVICE_S, STATUS, STALL_S = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
HANG_UP = sys.argv[5] == "1"  # close each connection after its answer, unannounced (a keep-alive timeout)
served = 0

async def handle(reader, writer):
    global served
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if head.startswith(b"POST /invocations"):
                served += 1
                time.sleep(STALL_S if served == 1 and STALL_S else SERVICE_S)
                status = STATUS
            else:
                status = 200
            body = b'{"predictions": [{"label": "x", "score": 1.0}]}' if status == 200 else b"boom"
            writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (status, len(body), body))
            await writer.drain()
            if HANG_UP and head.startswith(b"POST"):
                writer.close()
                return
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", PORT, backlog=512)
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''

TEXTS = ["I lost my card", "my top up failed", "where is my refund?"]


@contextmanager
def model_server(tmp_path: Path, service_s: float = 0.0, status: int = 200, stall_s: float = 0.0,
                 hang_up: bool = False) -> Iterator[tuple[str, int]]:
    """The server above on a free port; yields (url, pid) and stops it by its PID."""
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    port = free_port()
    command = [sys.executable, str(script), str(port), str(service_s), str(status), str(stall_s), str(int(hang_up))]
    url = f"http://{HOST}:{port}"
    with background(command, tmp_path / "server.log", dict(os.environ)) as process:
        wait_until_answering(f"{url}/ping", process, tmp_path / "server.log", timeout_s=20)
        yield url, process.pid


def drive(tmp_path: Path, url: str, pid: int, **knobs) -> dict:
    """Run the driver as its own process on a spec (defaults below, `knobs` override); return its output."""
    spec = {"url": url, "server_pid": pid, "texts": TEXTS, "texts_per_request": 1, "slo_ms": 50.0, "start_rps": 30,
            "step_factor": 2, "step_seconds": 1.0, "max_steps": 8, "max_requests": 5000, "max_seconds": 30,
            "max_connections": 32, "max_error_rate": 0.01, "resolution": 0.2, "warmup_requests": 5, **knobs}
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "tasks.measure.load_driver", str(spec_path), str(out_path)], cwd=ROOT,
                   check=True, timeout=spec["max_seconds"] + 30)
    return json.loads(out_path.read_text())


def test_a_start_above_the_capacity_descends_until_a_step_holds_then_refines(tmp_path):
    # 10 ms per request (at most 100/s), first offered 1,000/s: the search comes down by step_factor
    # squared instead of stopping, then bisects between the rate that held and the lowest that failed.
    with model_server(tmp_path, service_s=0.010) as (url, pid):
        out = drive(tmp_path, url, pid, slo_ms=80, start_rps=1000, max_steps=10)
    phases = [s["phase"] for s in out["steps"]]
    assert phases[0] == "ramp" and out["steps"][0]["failed_because"]
    assert "descend" in phases and phases.index("descend") == 1
    held, failed = out["held_rps"], out["failed_rps"]
    assert held is not None and held <= 110 and failed is not None and held < failed
    # Descending steps each offer step_factor^2 less than the one before, until one holds.
    descents = [s["offered_rps"] for s in out["steps"] if s["phase"] in ("ramp", "descend")]
    assert all(b == pytest.approx(a / 4) for a, b in zip(descents, descents[1:]))


def test_driver_brackets_a_known_capacity_by_ramping_then_refining(tmp_path):
    # 10 ms per request, one at a time: at most 100 requests/s, less on a busy host. Above ~110/s a step cannot
    # hold: it serves under 0.9 of the offered rate, and its backlog pushes p95 past 80 ms within the second.
    with model_server(tmp_path, service_s=0.010) as (url, pid):
        out = drive(tmp_path, url, pid, slo_ms=80)
    steps = out["steps"]
    first_failed = next(i for i, s in enumerate(steps) if s["failed_because"])
    assert [s["phase"] for s in steps[:first_failed + 1]] == ["ramp"] * (first_failed + 1)
    assert all(s["phase"] == "refine" for s in steps[first_failed + 1:]) and len(steps) > first_failed + 1
    # A refine step offers a rate strictly inside the interval known when it started.
    for i in range(first_failed + 1, len(steps)):
        held = max(s["offered_rps"] for s in steps[:i] if not s["failed_because"])
        failed = min(s["offered_rps"] for s in steps[:i] if s["failed_because"] and s["offered_rps"] > held)
        assert held < steps[i]["offered_rps"] < failed
    held, failed = out["held_rps"], out["failed_rps"]
    assert held is not None and failed is not None and held < failed
    assert held <= 110  # the server cannot serve much above 100/s
    assert failed >= 40  # nor does it fail at a small share of it
    if out["resolved"]:
        assert failed / held - 1 <= 0.2 and out["stop_reason"].startswith("resolved")
    else:
        assert len(steps) == 8
    assert 0 < out["generator_cpu_percent"] < 200
    for s in steps:
        assert s["generator_cpu_percent"] > 0 and s["server_cpu_percent"] >= 0
        assert s["status_counts"].get("200", 0) == s["requests"] and s["issued"] >= s["requests"]
    assert out["requests"] == sum(s["issued"] for s in steps)


def test_driver_never_exceeds_the_request_and_step_budgets(tmp_path):
    with model_server(tmp_path) as (url, pid):
        by_requests = drive(tmp_path, url, pid, start_rps=50, max_requests=120, slo_ms=1000)
        by_steps = drive(tmp_path, url, pid, start_rps=5, step_factor=1.5, max_steps=2, slo_ms=1000)
    assert sum(s["issued"] for s in by_requests["steps"]) == by_requests["requests"] <= 120
    assert by_requests["stop_reason"] == "request budget spent" and by_requests["steps"][-1]["capped_by_request_budget"]
    assert len(by_steps["steps"]) == 2 and by_steps["stop_reason"] == "reached max_steps (2)"
    assert by_steps["held_rps"] == pytest.approx(7.5) and by_steps["failed_rps"] is None and not by_steps["resolved"]


def test_driver_fails_a_step_when_the_server_answers_500_and_records_the_error(tmp_path):
    with model_server(tmp_path, status=500) as (url, pid):
        out = drive(tmp_path, url, pid, start_rps=20, max_steps=2)
    step = out["steps"][0]
    assert step["failed_because"].startswith("error rate 100.0%")
    assert step["failures"] == step["issued"] == step["status_counts"]["500"] and step["achieved_rps"] == 0
    assert step["errors"] == [f"{step['issued']}x HTTP 500: boom"]
    # Every step fails, also the one that descends to 20 / 2^2 = 5 requests/s: no rate held.
    assert [s["offered_rps"] for s in out["steps"]] == [20, 5] and all(s["failed_because"] for s in out["steps"])
    assert out["held_rps"] is None and out["failed_rps"] == 5 and out["stop_reason"] == "reached max_steps (2)"


def test_driver_counts_refused_connections_as_failures(tmp_path):
    url = f"http://{HOST}:{free_port()}"  # nothing listens there
    out = drive(tmp_path, url, None, start_rps=10, max_steps=1)
    (step,) = out["steps"]
    assert step["requests"] == 0 and step["failures"] == step["issued"] == 10
    assert step["failed_because"] == "no request completed" and "ConnectionRefusedError" in step["errors"][0]


def test_driver_times_requests_from_their_due_time_when_the_server_stalls(tmp_path):
    # The first request stalls the server 1.5 s; one connection. The other 19 requests of the step, due
    # within its 1 s, wait for that connection: timed from when they were sent, they would look fast
    # (the server then answers at once), hiding the stall; timed from their due time, they are not.
    with model_server(tmp_path, stall_s=1.5) as (url, pid):
        out = drive(tmp_path, url, pid, start_rps=20, max_steps=1, max_connections=1, warmup_requests=0,
                    slo_ms=100)
    (step,) = out["steps"]
    assert step["issued"] == 20 and step["requests"] == 20 and step["failures"] == 0
    assert step["users"] == 1
    assert step["p50_ms"] > 0.4 * 1500 and step["p95_ms"] > 0.8 * 1500
    assert step["failed_because"].startswith("p95")


def test_driver_cuts_off_requests_still_unanswered_after_the_step_and_counts_them_as_failures(tmp_path):
    # The server stalls 4 s on its first request; the step waits at most 2 * 50 ms + 0.5 s after its 0.5 s.
    with model_server(tmp_path, stall_s=4.0) as (url, pid):
        out = drive(tmp_path, url, pid, start_rps=10, step_seconds=0.5, slo_ms=50, warmup_requests=0, max_steps=1)
    (step,) = out["steps"]
    assert step["issued"] == 5 and step["requests"] == 0 and step["failures"] == 5
    assert step["errors"][0].startswith("5x cut off") and step["failed_because"] == "no request completed"
    assert 1.0 <= step["seconds"] < 2.0 and step["p50_ms"] >= 500


def test_driver_sends_again_on_a_fresh_connection_when_the_server_closed_a_kept_alive_one(tmp_path):
    with model_server(tmp_path, hang_up=True) as (url, pid):
        out = drive(tmp_path, url, pid, start_rps=40, max_steps=1, slo_ms=500)
    (step,) = out["steps"]
    assert step["failures"] == 0 and step["requests"] == step["issued"] == 40 and not step["failed_because"]
