"""The Locust side of `requant loadtest`, run as its own process: `python -m tasks.loadtest_driver SPEC OUT`.

Locust runs on gevent, which patches the standard library when imported; a process of its own
keeps that away from MLflow, Prefect and ONNX Runtime in the caller. SPEC and OUT are JSON files
(the plan in, the measured steps out); the caller (tasks/loadtest.py) bounds this process in time
and stops it by its PID.

Each step offers a fixed request rate for a fixed time: `users` simulated clients, each sending at
most rate/users requests per second (Locust's constant_throughput), so a server that keeps up sees
the offered rate and one that does not falls behind it. The ramp stops at the first step that
misses the p95 target, the error budget or the offered rate, or when a budget runs out.
"""

from __future__ import annotations

import json
import math
import sys
import time
from itertools import count
from pathlib import Path

import gevent
import psutil
from locust import FastHttpUser, constant_throughput, task
from locust.env import Environment

# A step counts as sustained only if the server absorbed nearly all of the offered rate.
MIN_ACHIEVED_SHARE = 0.9


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the server process and all its children (uvicorn workers)."""
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


def users_for(rate: float, slo_ms: float, max_users: int) -> int:
    """Clients needed to offer `rate` requests/s when each waits up to twice the p95 target for an answer."""
    return max(1, min(max_users, math.ceil(rate * 2 * slo_ms / 1000)))


def make_user(url: str, bodies: list[dict], budget: dict):
    """A Locust user class posting the request bodies in turn to /invocations.

    `budget["left"]` is the number of requests still allowed: a user that finds it spent sends
    nothing more, so the test never exceeds loadtest.max_requests.
    """
    turn = count()

    class ModelClient(FastHttpUser):
        host = url
        wait_time = constant_throughput(1.0)  # replaced per step

        @task
        def invoke(self):
            if budget["left"] <= 0:
                gevent.sleep(0.05)
                return
            budget["left"] -= 1  # greenlets switch only on I/O: no race between the check and this
            body = bodies[next(turn) % len(bodies)]
            self.client.post("/invocations", json=body, name="invocations")

    return ModelClient


def run_step(user_class, budget: dict, rate: float, users: int, seconds: float, requests_left: int,
             server_pid: int) -> dict:
    """Offer `rate` requests/s for `seconds` (or until `requests_left` are sent); return what was measured."""
    user_class.wait_time = constant_throughput(rate / users)
    budget["left"] = requests_left
    env = Environment(user_classes=[user_class], catch_exceptions=True)
    runner = env.create_local_runner()
    cpu_before, started = server_cpu_seconds(server_pid), time.monotonic()
    runner.start(users, spawn_rate=users)
    capped = False
    while time.monotonic() - started < seconds:
        gevent.sleep(0.1)
        if env.stats.total.num_requests >= requests_left:
            capped = True
            break
    runner.stop()
    elapsed = time.monotonic() - started
    cpu = server_cpu_seconds(server_pid) - cpu_before
    runner.quit()
    total = env.stats.total
    requests = total.num_requests
    return {
        "offered_rps": rate, "users": users, "seconds": elapsed, "requests": requests, "failures": total.num_failures,
        "achieved_rps": requests / elapsed if elapsed > 0 else 0.0,
        "error_rate": total.num_failures / requests if requests else 1.0,
        "p50_ms": total.get_response_time_percentile(0.5) if requests else None,
        "p95_ms": total.get_response_time_percentile(0.95) if requests else None,
        "p99_ms": total.get_response_time_percentile(0.99) if requests else None,
        "server_cpu_percent": 100.0 * cpu / elapsed if elapsed > 0 else 0.0,  # of one core
        "capped_by_request_budget": capped,
        "errors": [f"{e.occurrences}x {e.error}"[:300] for e in list(env.stats.errors.values())[:3]],
    }


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


def ramp(spec: dict) -> dict:
    """Run the stepped ramp the spec describes; return every step and why the ramp stopped."""
    texts, size = spec["texts"], spec["texts_per_request"]
    bodies = [{"inputs": [texts[(i * size + j) % len(texts)] for j in range(size)]} for i in range(max(1, len(texts) // size))]
    budget = {"left": spec["max_requests"]}
    user_class = make_user(spec["url"], bodies, budget)
    steps, began, sent, rate = [], time.monotonic(), 0, spec["start_rps"]
    stop_reason = f"reached max_steps ({spec['max_steps']})"
    for _ in range(spec["max_steps"]):
        left_s = spec["max_seconds"] - (time.monotonic() - began)
        left_requests = spec["max_requests"] - sent
        if left_s < 1 or left_requests < 1:
            stop_reason = "time budget spent" if left_s < 1 else "request budget spent"
            break
        users = users_for(rate, spec["slo_ms"], spec["max_users"])
        step = run_step(user_class, budget, rate, users, min(spec["step_seconds"], left_s), left_requests, spec["server_pid"])
        # Requests issued, answered or not (a request cut off by the end of a step was still sent).
        step["issued"] = left_requests - budget["left"]
        sent += step["issued"]
        step["failed_because"] = judge_step(step, spec["slo_ms"], spec["max_error_rate"])
        steps.append(step)
        if step["failed_because"]:
            stop_reason = f"step at {rate:.1f} requests/s failed: {step['failed_because']}"
            break
        if step["capped_by_request_budget"]:
            stop_reason = "request budget spent"
            break
        rate *= spec["step_factor"]
    return {"steps": steps, "stop_reason": stop_reason, "requests": sent, "seconds": time.monotonic() - began}


def main(argv: list[str]) -> int:
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    result = ramp(json.loads(spec_path.read_text()))
    out_path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
