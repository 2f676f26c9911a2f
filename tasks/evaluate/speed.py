"""The speed screen of a run: built candidates timed in short interleaved rounds before any scoring,
those clearly slower than a rival deferred, and brought back when every rival that beat them fails.

The statistics (the paired bound, which candidates to defer or bring back) are tasks/measure/speed_screen.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from tasks.build.candidates import BuiltCandidate
from tasks.build.reference import Reference
from tasks.config.settings import EvaluateSettings, QualityBar
from tasks.evaluate.candidates import MeasuredCandidate
from tasks.measure.speed_screen import SpeedScreenOutcome, defer_slower, to_bring_back
from tasks.measure.timing import time_interleaved
from tasks.models.graph import onnx_session

log = logging.getLogger("requant")


def bring_back_deferred(measured: list[MeasuredCandidate], score: Callable[[BuiltCandidate], MeasuredCandidate],
                        passes: Callable[[MeasuredCandidate], bool]) -> list[str]:
    """Score, in place in `measured`, every deferred candidate whose faster rivals all fail the bar.

    Repeats until nothing more comes back (a brought-back rival may fail in turn). Returns the names
    brought back, in order.
    """
    brought: list[str] = []
    while True:
        passed = {m.built.name: passes(m) for m in measured if not m.deferred}
        names = to_bring_back({m.built.name: m.speed_screening for m in measured if m.deferred}, passed)
        if not names:
            return brought
        for i, m in enumerate(measured):
            if m.built.name in names:
                outcome = m.speed_screening
                outcome.brought_back = True
                outcome.brought_back_because = "every rival that beat it fails the bar: " + ", ".join(
                    b.rival for b in outcome.beaten_by)
                log.info("%s comes back: %s", m.built.name, outcome.brought_back_because)
                measured[i] = score(m.built)
                measured[i].speed_screening = outcome
                brought.append(m.built.name)


@dataclass
class SpeedScreen:
    """What the speed screen did in a run: per-round rates, the deferred candidates, its cost."""

    enabled: bool
    skipped_because: str = ""
    rates: dict[str, list[float]] = field(default_factory=dict)
    deferred: dict[str, SpeedScreenOutcome] = field(default_factory=dict)
    seconds: float = 0.0


def screen_speed(built: list[BuiltCandidate], reference: Reference, evaluate: EvaluateSettings,
                 bar: QualityBar) -> SpeedScreen:
    """Time every built candidate in short interleaved rounds and defer those clearly slower than a rival.

    Skipped (nothing deferred) when off, with fewer than two candidates, or when a p95 latency limit
    is set: the screen ranks by throughput, and a latency limit could fail a faster rival after timing.
    """
    settings = evaluate.speed_screening
    if not settings.enabled:
        return SpeedScreen(False, "evaluate.speed_screening.enabled is false")
    if bar.max_p95_latency_ms is not None:
        return SpeedScreen(False, "quality_bar.max_p95_latency_ms is set: the screen ranks by throughput only")
    ready = [b for b in built if not b.error and b.model_path is not None]
    if len(ready) < 2:
        return SpeedScreen(False, "fewer than two candidates to compare")
    start = time.perf_counter()
    sessions = {}
    for b in ready:
        try:
            sessions[b.name] = onnx_session(b.model_path, evaluate.intra_op_threads)
        except Exception as exc:  # onnxruntime's own types; scoring records the candidate's error
            log.warning("speed screen: cannot open %s (%s); it is not screened", b.name, exc)
    short = evaluate.model_copy(update={"timing_rounds": settings.rounds, "latency_runs": settings.rounds,
                                        "warmup_runs": settings.warmup_runs})
    samples = time_interleaved(sessions, reference.latency_feeds, reference.throughput_feeds[:settings.batches], short)
    rates = {name: s.throughput_per_s for name, s in samples.items() if s.error is None}
    # Production and the FP32 baseline are always measured in full: savings are priced against them.
    # (the baseline rule of tasks.recipes.base.is_baseline, inlined: candidates.py imports this module)
    protected = {b.name for b in ready if b.is_production or b.recipe == "fp32"}
    deferred = defer_slower(rates, settings.alpha, settings.margin, protected)
    for name, outcome in deferred.items():
        log.info("%s: %s", name, outcome.reason)
    return SpeedScreen(True, rates=rates, deferred=deferred, seconds=time.perf_counter() - start)
