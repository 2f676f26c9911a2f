"""Every price is a served price: measure served capacity for the models that matter, price everyone from it.

In-process batched throughput is what ONNX Runtime can do with 32 texts at a time; a service
answering one text per request holds what its front, its batching and the graph deliver together,
and that is what the bill pays for. The flow therefore serves the winner (as ranked on the batched
timing), production and the FP32 baseline exactly as they would be served (tasks/serve/front.py:
the served model with its batcher, on 127.0.0.1), finds the request rate each holds at the p95
target (tasks/measure/loadtest.py: an open-loop ramp refined to within `loadtest.resolution`), and prices
it. A candidate that is not load-tested is priced at its batched throughput times the
served/batched ratio of the load-tested model nearest to it in batched speed, and its record says
so. The batched figure stays on every candidate as a column.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tasks.config.settings import (
    HardwareProfile,
    LoadtestSettings,
    ServingSettings,
    TrafficSettings,
)
from tasks.measure.cost import CostEstimate, monthly_cost
from tasks.measure.loadtest import run_ramp
from tasks.recipes.base import is_baseline
from tasks.serve.front import ServedFiles, served_fronts

log = logging.getLogger("requant")

SERVED = "served"  # priced on its own served capacity
RATIO = "served-ratio"  # priced on its batched throughput x a load-tested model's served/batched ratio
BATCHED = "batched"  # priced on batched throughput (serving.price_from: batched, or no served figure at all)


@dataclass(frozen=True)
class ServedCapacity:
    """What one model held when served: requests/s at the p95 target, as an interval."""

    capacity_rps: float  # the best step that held (0: none did)
    capacity_high_rps: float | None  # the lowest rate that failed above it (None: no step failed)
    texts_per_request: int
    p95_ms: float | None
    resolved: bool  # the interval is within loadtest.resolution
    generator_cpu_percent: float | None  # the load generator's own CPU (% of one core) over the test
    server_cpu_percent: float | None
    steps: int
    seconds: float
    error: str | None = None  # why it could not be measured

    @property
    def sentences_per_s(self) -> float:
        """Texts answered per second at capacity."""
        return self.capacity_rps * self.texts_per_request

    @property
    def sentences_high_per_s(self) -> float | None:
        """Texts per second at the failing end of the interval."""
        return None if self.capacity_high_rps is None else self.capacity_high_rps * self.texts_per_request

    def as_dict(self) -> dict:
        """Plain dict for the decision record."""
        return {**asdict(self), "sentences_per_s": self.sentences_per_s}

    @classmethod
    def from_dict(cls, record: dict) -> "ServedCapacity":
        """Read back `as_dict` (a fleet worker's answer)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


@dataclass(frozen=True)
class ServedPrice:
    """Which figure a candidate's price comes from, and that figure."""

    basis: str  # SERVED | RATIO | BATCHED
    sentences_per_s: float  # the throughput priced
    batched_sentences_per_s: float  # the candidate's batched figure (throughput_low_per_s)
    ratio: float | None = None  # served / batched applied (RATIO) or measured (SERVED)
    ratio_from: str | None = None  # the load-tested candidate whose ratio was applied
    capacity: ServedCapacity | None = None  # its own served measurement (SERVED)

    def describe(self) -> str:
        """One line for reports: where the price comes from."""
        if self.basis == SERVED:
            c = self.capacity
            high = f"-{c.capacity_high_rps:.0f}" if c and c.capacity_high_rps else "+"
            return f"served: {c.capacity_rps:.0f}{high} requests/s at the p95 target (load test)"
        if self.basis == RATIO:
            failed = f"; its own load test failed: {self.capacity.error}" if self.capacity and self.capacity.error else ""
            return (f"served via ratio: batched {self.batched_sentences_per_s:.0f}/s x {self.ratio:.2f} "
                    f"(served/batched of {self.ratio_from}){failed}")
        return "batched in-process throughput (no served figure)"

    def as_dict(self) -> dict:
        """Plain dict for the decision record."""
        return {"basis": self.basis, "sentences_per_s": self.sentences_per_s,
                "batched_sentences_per_s": self.batched_sentences_per_s, "ratio": self.ratio,
                "ratio_from": self.ratio_from, "capacity": self.capacity.as_dict() if self.capacity else None,
                "describe": self.describe()}


def measure_capacity(url: str, pid: int, texts: list[str], loadtest: LoadtestSettings, serving: ServingSettings,
                     target_ms: float, expected_rps: float, work_dir: Path, params: dict | None = None,
                     slowest_start_rps: float = 1.0, warmup_requests: int | None = None) -> ServedCapacity:
    """Find the request rate the served model at `url` (server process `pid`) holds at `target_ms` (p95).

    The ramp starts at 0.8 x the expected rate (at least `slowest_start_rps`, which is also as low as
    it descends when every step fails; 0.5 at most), so it reaches the
    limit in a few steps of `serving.step_seconds` (from below, or from above by descending), then
    refines to `loadtest.resolution`. `params` go into every request (a generator's). Failures are
    returned in `error`, not raised: a model that cannot be measured is priced from what else is
    known, and the record says why.
    """
    knobs = loadtest.model_copy(update={"step_seconds": serving.step_seconds, "max_seconds": serving.max_seconds,
                                        "start_rps": max(slowest_start_rps, 0.8 * expected_rps), "step_factor": 1.5,
                                        "max_steps": max(loadtest.max_steps, 8),
                                        # bounded by time (serving.max_seconds), not by a request count
                                        "max_requests": 10**8,
                                        "warmup_requests": loadtest.warmup_requests if warmup_requests is None
                                        else warmup_requests})
    try:
        result = run_ramp(url, pid, texts, knobs, target_ms, work_dir, params, min(slowest_start_rps, 0.5))
    except Exception as exc:  # the generator failed: say why, price from the rest
        return unmeasured(loadtest, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return ServedCapacity(
        capacity_rps=result.capacity_rps, capacity_high_rps=result.capacity_high_rps,
        texts_per_request=result.texts_per_request, p95_ms=result.p95_ms_at_capacity, resolved=result.resolved,
        generator_cpu_percent=result.generator_cpu_percent, server_cpu_percent=result.server_cpu_percent_at_capacity,
        steps=len(result.steps), seconds=result.seconds,
        error=None if result.capacity_rps > 0 else f"no step held the p95 target ({result.stop_reason})")


def unmeasured(loadtest: LoadtestSettings, why: str) -> ServedCapacity:
    """A capacity that could not be measured, and why (never priced on; the record says so)."""
    return ServedCapacity(0.0, None, loadtest.texts_per_request, None, False, None, None, 0, 0.0, error=why[:300])


def price_all(batched: dict[str, float], served: dict[str, ServedCapacity], profile: HardwareProfile,
              traffic: TrafficSettings) -> dict[str, tuple[ServedPrice, CostEstimate]]:
    """Price every candidate with a batched figure: from its own served capacity where measured, else
    through the served/batched ratio of the load-tested candidate nearest in batched speed (log scale).

    Args:
        batched: candidate name -> batched throughput (texts/s, the low quantile the flow prices on).
        served: candidate name -> served capacity, for the load-tested ones.

    Example: FP32 batched 120/s served 100 texts/s (ratio 0.83), INT8 batched 330/s served 240/s
    (0.73); an untested INT8 variant at 300/s borrows INT8's 0.73 (nearer than FP32's): 219/s.
    """
    ratios = {name: capacity.sentences_per_s / batched[name] for name, capacity in served.items()
              if name in batched and batched[name] > 0 and capacity.sentences_per_s > 0}
    priced = {}
    for name, throughput in batched.items():
        if throughput <= 0:
            continue
        capacity = served.get(name)
        if name in ratios:
            high = capacity.sentences_high_per_s
            price = ServedPrice(SERVED, capacity.sentences_per_s, throughput, ratios[name], None, capacity)
            priced[name] = (price, monthly_cost(capacity.sentences_per_s, profile, traffic, high))
        elif ratios:
            nearest = min(ratios, key=lambda other: abs(math.log(batched[other] / throughput)))
            figure = throughput * ratios[nearest]
            price = ServedPrice(RATIO, figure, throughput, ratios[nearest], nearest, capacity)
            priced[name] = (price, monthly_cost(figure, profile, traffic))
        else:
            priced[name] = (ServedPrice(BATCHED, throughput, throughput), monthly_cost(throughput, profile, traffic))
    return priced


def log_capacity(name: str, capacity: ServedCapacity, target_ms: float) -> None:
    """One log line: what the model held when served, or why it was not measured."""
    if capacity.error:
        log.warning("served capacity of %s not measured: %s", name, capacity.error)
    else:
        log.info("served %s: %.0f-%s requests/s at p95 <= %.0f ms (%d steps, %.0f s; load generator %.0f%% of a core)",
                 name, capacity.capacity_rps, f"{capacity.capacity_high_rps:.0f}" if capacity.capacity_high_rps else "?",
                 target_ms, capacity.steps, capacity.seconds, capacity.generator_cpu_percent or 0)


def contenders(measured: list, winner: str | None) -> list:
    """The candidates whose served capacity is measured: the winner, production and the FP32 baseline
    (those timed in full; a candidate without a batched figure cannot be priced either way)."""
    chosen = [m for m in measured if m.speed is not None and not m.error
              and (m.built.name == winner or m.built.is_production or is_baseline(m.built))]
    return sorted(chosen, key=lambda m: (m.built.name != winner, not m.built.is_production))


def reprice(measured: list, to_test: list, files_of, texts: list[str], loadtest: LoadtestSettings,
            serving: ServingSettings, target_ms: float, profile: HardwareProfile, traffic: TrafficSettings,
            work_dir: Path, served: dict[str, ServedCapacity]) -> dict[str, ServedCapacity]:
    """Measure the served capacity of `to_test` (those not measured yet), then price every timed
    candidate from served figures (`price_all`), in place: `cost` becomes the served price, the
    batched one moves to `batched_cost`. Returns `served`, updated.

    Args:
        files_of: candidate -> its ServedFiles, or a str saying why it cannot be served.
    """
    timed = {m.built.name: m for m in measured if m.speed is not None and m.cost is not None and not m.error}
    batched = {name: m.speed.throughput_low_per_s for name, m in timed.items()}
    pending = [m for m in to_test if m.built.name not in served]
    measure_served([(m.built.name, files_of(m)) for m in pending], batched, texts, loadtest, serving, target_ms,
                   work_dir, served)
    for name, (price, cost) in price_all(batched, served, profile, traffic).items():
        m = timed[name]
        m.batched_cost = m.batched_cost or m.cost
        m.served_price, m.cost = price, cost
    return served


def measure_served(pending: list[tuple[str, ServedFiles | str]], batched: dict[str, float], texts: list[str],
                   loadtest: LoadtestSettings, serving: ServingSettings, target_ms: float, work_dir: Path,
                   served: dict[str, ServedCapacity], threads: int = 0) -> dict[str, ServedCapacity]:
    """Serve each (name, files) of `pending` and find its capacity, into `served` (returned).

    A str in place of files says why that model cannot be served; it is recorded as unmeasured.
    `batched` (name -> batched texts/s) sets where each ramp starts; `threads` are the served
    model's ONNX Runtime threads (0: one per core).
    """
    for name, why in pending:
        if isinstance(why, str):
            served[name] = unmeasured(loadtest, why)
            log_capacity(name, served[name], target_ms)
    servable = [(name, files) for name, files in pending if not isinstance(files, str)]
    # Their servers start together (start-up is most of a short measurement), then are loaded one at a time.
    with served_fronts([files for _, files in servable], loadtest.server_start_timeout_s, threads) as fronts:
        for (name, _), front in zip(servable, fronts):
            if isinstance(front, Exception):
                served[name] = unmeasured(loadtest, str(front))
            else:
                # Expected: its batched rate times the served/batched ratio already measured in this run
                # (the front's per-request cost is much the same for every graph), else the batched rate.
                ratios = [c.sentences_per_s / batched[other] for other, c in served.items()
                          if not c.error and batched.get(other)]
                ratio = sorted(ratios)[len(ratios) // 2] if ratios else 1.0
                expected = ratio * batched.get(name, 0.0) / loadtest.texts_per_request
                served[name] = measure_capacity(*front, texts, loadtest, serving, target_ms, expected,
                                                work_dir / f"served-{len(served)}")
            log_capacity(name, served[name], target_ms)
    return served
