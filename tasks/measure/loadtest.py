"""Load test of a served model version: serve it, ramp the request rate, find the sustained capacity.

The version is served the way production would serve it, with `mlflow models serve` (its pyfunc:
texts in, label and score out) on 127.0.0.1 and a free port; the load comes from an open-loop
asyncio generator in a process of its own (tasks/measure/load_driver.py). Both processes are bounded
in time and stopped by their PIDs. The generator ramps the offered rate until a step misses the
p95 target or the error budget, then bisects between the last rate that held and the first that
failed until they are within loadtest.resolution: capacity is that interval, its low end (the
rate the best held step served) the figure priced. `compare_with_cost_model` sets it against the
throughput the flow priced the version on, and `reprice` prices the served figure with tasks/measure/cost.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.config.settings import (
    HardwareProfile,
    LoadtestSettings,
    QualityBar,
    TrafficSettings,
)
from tasks.core.errors import RequantError
from tasks.measure.cost import CostEstimate, monthly_cost
from tasks.serve.processes import HOST, free_port, stop_group, tail, wait_for_ping

DEFAULT_SLO_MS = 100.0
# Seconds the driver may run past its own time budget (start-up, warm-up of a slow server, the last step's
# wait for answers) before it is killed.
DRIVER_GRACE_S = 60.0
DEFAULT_RESOLUTION = 0.10
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_WARMUP_REQUESTS = 20


@dataclass(frozen=True)
class LoadtestResult:
    """What the ramp and its refinement measured.

    Capacity is an interval: served rate of the best step that held (`capacity_rps`, its low end)
    up to the lowest offered rate above it that failed (`capacity_high_rps`, None when no step
    failed). `resolved` says the two are within `resolution` of each other.
    """

    slo_p95_ms: float
    texts_per_request: int
    capacity_rps: float  # 0 when no step held the target
    p95_ms_at_capacity: float | None
    error_rate: float  # failed / sent over the whole test
    server_cpu_percent_at_capacity: float | None  # of one core, server process and its workers
    requests: int  # issued over the whole test (at most loadtest.max_requests)
    seconds: float
    stop_reason: str
    capacity_high_rps: float | None = None  # the lowest offered rate above the held ones that failed
    resolved: bool = False  # capacity_high_rps / highest held offered rate - 1 <= resolution
    resolution: float = DEFAULT_RESOLUTION
    generator_cpu_percent: float | None = None  # the load generator's own CPU over the test, of one core
    steps: list[dict] = field(default_factory=list)

    @property
    def limit_found(self) -> bool:
        """A step missed the target: the capacity is the limit. Otherwise a budget ended the ramp first and
        the capacity is only a lower bound (raise loadtest.max_steps, max_requests or max_seconds)."""
        return any(s.get("failed_because") for s in self.steps)

    @property
    def capacity_low_rps(self) -> float:
        """The interval's low end: requests/s served at the best step that held (= capacity_rps)."""
        return self.capacity_rps

    @property
    def capacity_sentences_per_s(self) -> float:
        """Texts classified per second at capacity."""
        return self.capacity_rps * self.texts_per_request

    def metrics(self) -> dict[str, float]:
        """The loadtest_* metrics logged on the version's run."""
        values = {"loadtest_slo_p95_ms": self.slo_p95_ms, "loadtest_capacity_rps": self.capacity_rps,
                  "loadtest_capacity_sentences_per_s": self.capacity_sentences_per_s,
                  "loadtest_p95_ms_at_capacity": self.p95_ms_at_capacity, "loadtest_error_rate": self.error_rate,
                  "loadtest_server_cpu_percent": self.server_cpu_percent_at_capacity,
                  "loadtest_requests": self.requests, "loadtest_seconds": self.seconds,
                  "loadtest_steps": len(self.steps), "loadtest_texts_per_request": self.texts_per_request,
                  "loadtest_limit_found": float(self.limit_found), "loadtest_capacity_low_rps": self.capacity_low_rps,
                  "loadtest_capacity_high_rps": self.capacity_high_rps, "loadtest_resolved": float(self.resolved),
                  "loadtest_generator_cpu_percent": self.generator_cpu_percent}
        return {k: float(v) for k, v in values.items() if v is not None}

    def as_dict(self) -> dict:
        """Plain dict (loadtest.json)."""
        return {**asdict(self), "capacity_low_rps": self.capacity_low_rps,
                "capacity_sentences_per_s": self.capacity_sentences_per_s, "limit_found": self.limit_found}


@dataclass(frozen=True)
class CapacityComparison:
    """The served capacity against the throughput the cost model assumed, and what each costs."""

    served_sentences_per_s: float
    assumed_sentences_per_s: float | None  # the candidate's priced throughput (throughput_low_per_s)
    assumed_monthly_cost_usd: float | None
    served_cost: CostEstimate | None  # None until repriced, or when nothing held the target

    @property
    def ratio(self) -> float | None:
        """Served / assumed capacity (below 1: the flow's estimate is optimistic for serving)."""
        if not self.assumed_sentences_per_s:
            return None
        return self.served_sentences_per_s / self.assumed_sentences_per_s

    def metrics(self) -> dict[str, float]:
        """The comparison as loadtest_* metrics."""
        values = {"loadtest_assumed_sentences_per_s": self.assumed_sentences_per_s,
                  "loadtest_capacity_ratio": self.ratio, "loadtest_assumed_monthly_cost_usd": self.assumed_monthly_cost_usd,
                  "loadtest_monthly_cost_usd": self.served_cost.monthly_cost_usd if self.served_cost else None,
                  "loadtest_instances": self.served_cost.instances if self.served_cost else None}
        return {k: float(v) for k, v in values.items() if v is not None}


def slo_ms(loadtest: LoadtestSettings, bar: QualityBar) -> float:
    """The p95 target: loadtest.slo_p95_ms, else quality_bar.max_p95_latency_ms, else 100 ms."""
    return loadtest.slo_p95_ms or bar.max_p95_latency_ms or DEFAULT_SLO_MS


@contextmanager
def served_model(model_uri: str, tracking_uri: str, workers: int, start_timeout_s: float) -> Iterator[tuple[str, int]]:
    """Serve `model_uri` with `mlflow models serve` on 127.0.0.1 and a free port; yield (url, server pid).

    The server runs in its own process group (it starts uvicorn workers), stopped on the way out by
    its PID: SIGTERM to the group, SIGKILL after 10 s.

    Raises:
        RequantError: the server exited or did not answer /ping within `start_timeout_s` (its log's tail in the message).
    """
    port = free_port()
    url = f"http://{HOST}:{port}"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli) if mlflow_cli.exists() else "mlflow", "models", "serve", "-m", model_uri,
               "--env-manager", "local", "-h", HOST, "-p", str(port), "-w", str(workers)]
    # mlflow execs `uvicorn` by name: the venv's bin must be on PATH even when python was run by its full path.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": tracking_uri, "HF_HUB_OFFLINE": "1",
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    # Output goes to a file: a pipe nobody reads fills up and blocks the server.
    with tempfile.NamedTemporaryFile(prefix="requant-serve-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True)
    try:
        wait_for_ping(url, process, log_path, start_timeout_s)
        yield url, process.pid
    finally:
        stop_group(process)
        log_path.unlink(missing_ok=True)


def check_answers(url: str, texts: list[str], params: dict | None = None) -> None:
    """One request before the ramp: the server must answer texts with one prediction each.

    Raises:
        RequantError: it answers an error or a different number of predictions.
    """
    body = json.dumps({"inputs": texts[:2], **({"params": params} if params else {})}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = json.loads(answer.read())["predictions"]
    except (urllib.error.URLError, KeyError, ValueError) as exc:
        raise RequantError(f"the served model does not answer texts ({exc}): is it a requant serving model?") from exc
    if len(predictions) != len(texts[:2]):
        raise RequantError(f"the served model answered {len(predictions)} predictions for {len(texts[:2])} texts")


def run_ramp(url: str, server_pid: int, texts: list[str], settings: LoadtestSettings, target_ms: float,
             work_dir: Path, params: dict | None = None, min_rps: float | None = None) -> LoadtestResult:
    """Drive the ramp and its refinement against `url` with the load generator (a bounded child process); summarise it.

    `resolution`, `max_connections` and `warmup_requests` come from `settings` where it has them
    (older settings: max_users stands for max_connections). `params` go into every request body
    (a text generator's max_new_tokens and ignore_eos); `min_rps` is the lowest rate a ramp that
    fails from its first step descends to (the driver's MIN_RPS when None).

    Raises:
        RequantError: no texts, or the driver failed or overran its time budget (it is killed).
    """
    if not texts:
        raise RequantError("no texts to send: the evaluation set is empty; pass --sample CSV")
    spec = {"url": url, "server_pid": server_pid, "texts": texts, "texts_per_request": settings.texts_per_request,
            "slo_ms": target_ms, "start_rps": settings.start_rps, "step_factor": settings.step_factor,
            "step_seconds": settings.step_seconds, "max_steps": settings.max_steps,
            "max_requests": settings.max_requests, "max_seconds": settings.max_seconds,
            "max_connections": getattr(settings, "max_connections", None) or getattr(settings, "max_users", None)
            or DEFAULT_MAX_CONNECTIONS,
            "resolution": getattr(settings, "resolution", DEFAULT_RESOLUTION),
            "warmup_requests": getattr(settings, "warmup_requests", DEFAULT_WARMUP_REQUESTS),
            "max_error_rate": settings.max_error_rate, "params": params, "min_rps": min_rps}
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = work_dir / "spec.json", work_dir / "steps.json", work_dir / "driver.log"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "tasks.measure.load_driver", str(spec_path), str(out_path)],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        code = driver.wait(timeout=settings.max_seconds + DRIVER_GRACE_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        stop_group(driver)
    if code != 0 or not out_path.is_file():
        why = "overran its time budget and was stopped" if code is None else f"exited with {code}"
        raise RequantError(f"the load driver {why}: {tail(log_path)}")
    return summarise(json.loads(out_path.read_text()), target_ms, settings.texts_per_request)


def summarise(ramp: dict, target_ms: float, texts_per_request: int) -> LoadtestResult:
    """The capacity interval (best held step up to the lowest failed rate above it) and totals of a driver's run."""
    steps = ramp["steps"]
    held = [s for s in steps if not s.get("failed_because")]
    best = max(held, key=lambda s: s["achieved_rps"]) if held else None
    issued = sum(s.get("issued", s["requests"]) for s in steps)
    failed = sum(s["failures"] for s in steps)
    highest_held = max((s["offered_rps"] for s in held), default=None)
    high = ramp.get("failed_rps")
    if high is None:  # older output: the lowest failed rate above every held one
        high = min((s["offered_rps"] for s in steps if s.get("failed_because")
                    and (highest_held is None or s["offered_rps"] > highest_held)), default=None)
    resolution = ramp.get("resolution", DEFAULT_RESOLUTION)
    resolved = ramp.get("resolved")
    if resolved is None:
        resolved = highest_held is not None and high is not None and high / highest_held - 1 <= resolution
    return LoadtestResult(
        slo_p95_ms=target_ms, texts_per_request=texts_per_request,
        capacity_rps=best["achieved_rps"] if best else 0.0, p95_ms_at_capacity=best["p95_ms"] if best else None,
        error_rate=failed / issued if issued else 0.0,
        server_cpu_percent_at_capacity=best["server_cpu_percent"] if best else None,
        requests=ramp["requests"], seconds=ramp["seconds"], stop_reason=ramp["stop_reason"],
        capacity_high_rps=high, resolved=bool(resolved), resolution=resolution,
        generator_cpu_percent=ramp.get("generator_cpu_percent"), steps=steps)


def compare_with_cost_model(result: LoadtestResult, run_metrics: dict[str, float], version_tags: dict[str, str],
                            profile: HardwareProfile | None, traffic: TrafficSettings | None) -> CapacityComparison:
    """Served capacity vs the throughput the flow priced the version on (its run's priced_sentences_per_s:
    the served figure since prices are served prices; else, for versions decided before, its batched
    throughput_low_per_s or throughput_per_s), with the served figure priced when `profile` and `traffic` are given."""
    assumed = (run_metrics.get("priced_sentences_per_s") or run_metrics.get("priced_requests_per_s")  # a decoder's
               or run_metrics.get("throughput_low_per_s") or run_metrics.get("throughput_per_s"))
    assumed_cost = run_metrics.get("monthly_cost_usd")
    if assumed_cost is None and version_tags.get("requant.monthly_cost_usd"):
        assumed_cost = float(version_tags["requant.monthly_cost_usd"])
    served_cost = None
    if profile is not None and traffic is not None and result.capacity_sentences_per_s > 0:
        served_cost = monthly_cost(result.capacity_sentences_per_s, profile, traffic)
    return CapacityComparison(served_sentences_per_s=result.capacity_sentences_per_s, assumed_sentences_per_s=assumed,
                              assumed_monthly_cost_usd=assumed_cost, served_cost=served_cost)


def capacity_sentence(result: LoadtestResult) -> str:
    """The served capacity as an interval in words: between what held and what failed, or the one bound there is."""
    at = f"at p95 <= {result.slo_p95_ms:.0f} ms"
    within = f"{result.resolution:.0%}"
    if result.capacity_rps <= 0:
        below = f"below {result.capacity_high_rps:.1f} requests/s" if result.capacity_high_rps else "none"
        return f"served capacity: {below} {at}: no step held (lower loadtest.start_rps)"
    low = f"{result.capacity_rps:.1f}"
    sentences = f"{result.capacity_sentences_per_s:.1f} sentences/s at the low end"  # the figure priced
    if result.capacity_high_rps is None:  # no step failed: a budget ended the ramp first
        return (f"served capacity: at least {low} requests/s {at} = {sentences} (no step failed: raise "
                f"loadtest.max_steps, max_requests or max_seconds for the limit)")
    if result.resolved:
        how = f"resolved to within {within}"
    else:
        how = f"not resolved to within {within}: raise loadtest.max_steps, max_requests or max_seconds"
    return f"served capacity: between {low} and {result.capacity_high_rps:.1f} requests/s ({how}) {at}; {sentences}"


def render(result: LoadtestResult, comparison: CapacityComparison, version: str) -> str:
    """The steps as a table, the capacity interval and the generator's CPU, then capacity against the cost model."""
    lines = [(f"load test of version {version}: p95 target {result.slo_p95_ms:.0f} ms, "
              f"{result.texts_per_request} text(s) per request"),
             (f"{'phase':<7} {'offered/s':>10} {'served/s':>9} {'conns':>5} {'reqs':>6} {'err':>6} {'p50 ms':>7} "
              f"{'p95 ms':>7} {'cpu %':>6} {'gen %':>6}  verdict")]
    for s in result.steps:
        p50 = f"{s['p50_ms']:.0f}" if s.get("p50_ms") is not None else "-"
        p95 = f"{s['p95_ms']:.0f}" if s.get("p95_ms") is not None else "-"
        cpu = f"{s['server_cpu_percent']:.0f}" if s.get("server_cpu_percent") is not None else "-"
        gen = f"{s['generator_cpu_percent']:.0f}" if s.get("generator_cpu_percent") is not None else "-"
        lines.append(f"{s.get('phase', 'ramp'):<7} {s['offered_rps']:>10.1f} {s['achieved_rps']:>9.1f} {s['users']:>5} "
                     f"{s['requests']:>6} {s['error_rate']:>6.1%} {p50:>7} {p95:>7} {cpu:>6} {gen:>6}  "
                     f"{s.get('failed_because') or 'held'}")
    lines.append(f"stopped: {result.stop_reason} ({result.requests} requests in {result.seconds:.0f} s, "
                 f"{result.error_rate:.1%} failed)")
    lines.append(capacity_sentence(result))
    if result.generator_cpu_percent is not None:
        lines.append(f"load generator: {result.generator_cpu_percent:.0f}% of one core over the test (on this host "
                     f"beside the server: the CPU it takes is not the server's)")
    if comparison.assumed_sentences_per_s:
        lines.append(f"the decision priced it on: {comparison.assumed_sentences_per_s:.1f} sentences/s; "
                     f"served now / as priced = {comparison.ratio:.2f}")
    if comparison.assumed_monthly_cost_usd is not None:
        lines.append(f"$/month as decided: ${comparison.assumed_monthly_cost_usd:,.2f}")
        if comparison.served_cost and comparison.assumed_monthly_cost_usd:
            gap = comparison.served_cost.monthly_cost_usd / comparison.assumed_monthly_cost_usd - 1
            lines.append(f"repriced / decided: {gap:+.1%}")
    if comparison.served_cost:
        lines.append(f"$/month at the served capacity: ${comparison.served_cost.monthly_cost_usd:,.2f} "
                     f"({comparison.served_cost.instances} x {comparison.served_cost.profile})")
    return "\n".join(lines)
