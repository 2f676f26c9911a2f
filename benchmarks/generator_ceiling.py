"""The load generator's own ceiling: the request rate it holds against a server that answers at once.

Run on purpose (not a test):

    .venv/bin/python benchmarks/generator_ceiling.py [--slo-ms 100] [--step-seconds 3] [--start-rps 250]
        [--max-connections 256] [--max-seconds 150] [--resolution 0.10]

It serves a no-op ASGI app (reads the body, answers a fixed prediction) under uvicorn with uvloop
and httptools, one worker, on 127.0.0.1 and a free port, then runs `python -m tasks.measure.load_driver`
against it exactly as `requant loadtest` does (ramp x2, then bisection to --resolution). The rate
that held is the most any `requant loadtest` figure measured on this host can be: above it the
generator and the front, not the model, bound what is measured. It prints every step with the
server's and the generator's CPU (% of one core; the generator near 100% means the generator is
the bound, the server near 100% means uvicorn is), the interval and the host's CPU model. The
generator and the server share the host's cores: name the CPU, and say whether the host was busy,
next to any number quoted from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NO_OP_APP = '''
BODY = b'{"predictions": [{"label": "card_lost", "score": 1.0}]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:  # read the whole request body, as a model server would before answering
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
'''


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    """Serve the no-op app, run the driver against it, print the steps and the ceiling."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slo-ms", type=float, default=100.0)
    parser.add_argument("--step-seconds", type=float, default=3.0)
    parser.add_argument("--start-rps", type=float, default=250.0)
    parser.add_argument("--step-factor", type=float, default=2.0)
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--max-seconds", type=float, default=150.0)
    parser.add_argument("--resolution", type=float, default=0.10)
    args = parser.parse_args()

    from tasks.serve.processes import free_port
    from tests.servers import wait_until_answering

    with tempfile.TemporaryDirectory(prefix="generator-ceiling-") as work:
        work_dir = Path(work)
        (work_dir / "noop_app.py").write_text(NO_OP_APP)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(work_dir / "uvicorn.log", "w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "noop_app:app", "--app-dir", str(work_dir), "--host", "127.0.0.1",
                 "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--workers", "1",
                 "--no-access-log", "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until_answering(f"{url}/ping", server, work_dir / "uvicorn.log", timeout_s=30)
            spec = {"url": url, "server_pid": server.pid, "texts": ["I lost my card", "my top up failed"],
                    "texts_per_request": 1, "slo_ms": args.slo_ms, "start_rps": args.start_rps,
                    "step_factor": args.step_factor, "step_seconds": args.step_seconds, "max_steps": 20,
                    "max_requests": 10_000_000, "max_seconds": args.max_seconds,
                    "max_connections": args.max_connections, "max_error_rate": 0.01,
                    "resolution": args.resolution, "warmup_requests": 200}
            (work_dir / "spec.json").write_text(json.dumps(spec))
            subprocess.run([sys.executable, "-m", "tasks.measure.load_driver", str(work_dir / "spec.json"),
                            str(work_dir / "out.json")], cwd=ROOT, check=True, timeout=args.max_seconds + 60)
            out = json.loads((work_dir / "out.json").read_text())
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()

    print(f"host: {cpu_model()} ({os.cpu_count()} cores); load average at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"server: no-op ASGI app, uvicorn (uvloop, httptools), 1 worker; p95 target {args.slo_ms:.0f} ms, "
          f"{args.step_seconds:g} s steps")
    print(f"{'phase':<6} {'offered/s':>10} {'served/s':>9} {'conns':>5} {'p50 ms':>7} {'p95 ms':>7} {'lag95 ms':>8} "
          f"{'server %':>8} {'gen %':>6}  verdict")
    for s in out["steps"]:
        fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{s['phase']:<6} {s['offered_rps']:>10.1f} {s['achieved_rps']:>9.1f} {s['users']:>5} "
              f"{fmt(s['p50_ms']):>7} {fmt(s['p95_ms']):>7} {fmt(s['schedule_lag_p95_ms']):>8} "
              f"{fmt(s['server_cpu_percent'], '.0f'):>8} {fmt(s['generator_cpu_percent'], '.0f'):>6}  "
              f"{s['failed_because'] or 'held'}")
    print(f"stopped: {out['stop_reason']} ({out['requests']} requests in {out['seconds']:.0f} s)")
    held = [s for s in out["steps"] if not s["failed_because"]]
    best = max(held, key=lambda s: s["achieved_rps"]) if held else None
    if best:
        high = f"{out['failed_rps']:.0f}" if out["failed_rps"] else "(none failed)"
        print(f"generator ceiling: held {best['achieved_rps']:.0f} requests/s at p95 {best['p95_ms']:.1f} ms "
              f"(failed at {high}; resolved={out['resolved']}); at that step the generator used "
              f"{best['generator_cpu_percent']:.0f}% and the server {best['server_cpu_percent']:.0f}% of one core")
    print(f"generator CPU over the whole test: {out['generator_cpu_percent']:.0f}% of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
