"""Speed and memory of one candidate, measured on this host.

Benchmarks run one candidate at a time with fixed thread counts and warm-up: concurrent sessions on
a 2-core machine measure each other, not the model (onnxruntime#10273). Candidates take turns in
interleaved rounds, so a disturbance of the host hits them all alike, and every number carries a
robust noise band (quantiles over rounds) so a decision never rests on a difference smaller than
the noise.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tasks.config.settings import EvaluateSettings
from tasks.core.errors import RequantError
from tasks.models.graph import file_size_mb

# CPU features that decide whether INT8 and FP16 kernels can be fast here.
_FLAGS_OF_INTEREST = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class SpeedMetrics:
    """Speed numbers logged under the same names for every candidate."""

    latency_p50_ms: float
    latency_p95_ms: float
    latency_p50_low_ms: float
    latency_p50_high_ms: float
    throughput_per_s: float
    throughput_low_per_s: float
    throughput_high_per_s: float
    peak_memory_mb: float
    size_mb: float
    # The full spread over rounds, for the record (the band above is the robust one).
    throughput_min_per_s: float = 0.0
    throughput_max_per_s: float = 0.0
    timing_rounds: int = 0
    # Each round's rate in round order: selection compares candidates round by round (paired).
    throughput_rounds: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, float]:
        """The scalar figures, for MLflow metrics and the decision record."""
        return {k: v for k, v in asdict(self).items() if k != "throughput_rounds"}


def cpu_info() -> dict[str, str]:
    """The CPU model, core count and the ISA flags that matter for quantized kernels."""
    model, flags = platform.processor() or "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return {
        "cpu_model": model,
        "cpu_count": str(os.cpu_count()),
        "cpu_flags": " ".join(f for f in _FLAGS_OF_INTEREST if f in flags) or "none of interest",
        "machine": platform.machine(),
    }


def _timed_run(session, feed: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(["logits"], feed)
    return time.perf_counter() - start


@dataclass
class TimingSamples:
    """Raw timings of one candidate, gathered over interleaved rounds."""

    latency_ms: list[list[float]]  # one block of batch-1 latencies per round
    throughput_per_s: list[float]  # one rate per round
    error: str | None = None  # the candidate failed during timing; it takes no further rounds
    seconds: float = 0.0  # wall time spent timing this candidate, warm-up included


def time_interleaved(sessions: dict[str, object], latency_feeds: list[dict[str, np.ndarray]],
                     throughput_feeds: list[dict[str, np.ndarray]], settings: EvaluateSettings,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, TimingSamples]:
    """Time every candidate in rounds: each round times each candidate once, in a rotating order.

    Timing candidates one after another lets one disturbance on a shared host (another process,
    a thermal or frequency change) land on one candidate and set its price. Interleaving spreads
    such a disturbance over all candidates and, with a robust quantile over rounds, one bad round
    no longer decides anything.

    Args:
        sessions: name -> open InferenceSession with settings.intra_op_threads threads.
        latency_feeds: single-text feeds, cycled through for the latency runs.
        throughput_feeds: serving-size batches; one throughput sample runs all of them.
        settings: warm-up, runs, batches and rounds.
        progress: called with (round done, rounds).
    """
    names = list(sessions)
    samples = {name: TimingSamples([], []) for name in names}
    per_round = max(1, settings.latency_runs // settings.timing_rounds)
    sentences = sum(len(f["input_ids"]) for f in throughput_feeds)
    def guarded(name: str, work: Callable[[], None]) -> None:
        # One candidate failing at run time (onnxruntime raises its own types) must not stop the others.
        start = time.perf_counter()
        try:
            work()
        except Exception as exc:
            samples[name].error = f"{type(exc).__name__} while timing: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        finally:
            samples[name].seconds += time.perf_counter() - start

    def warm(name: str) -> None:  # first-run allocations and kernel selection, untimed
        for i in range(settings.warmup_runs):
            _timed_run(sessions[name], latency_feeds[i % len(latency_feeds)])
        _timed_run(sessions[name], throughput_feeds[0])

    def one_round(name: str, r: int) -> None:
        session = sessions[name]
        _timed_run(session, latency_feeds[0])  # re-warm caches after the previous candidate
        latencies = [_timed_run(session, latency_feeds[(r * per_round + i) % len(latency_feeds)]) * 1e3
                     for i in range(per_round)]
        rate = sentences / sum(_timed_run(session, f) for f in throughput_feeds)
        samples[name].latency_ms.append(latencies)
        samples[name].throughput_per_s.append(rate)

    for name in names:
        guarded(name, lambda name=name: warm(name))
    for r in range(settings.timing_rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        if r % 2:
            order.reverse()  # no candidate always follows the same neighbour
        for name in order:
            if samples[name].error is None:
                guarded(name, lambda name=name: one_round(name, r))
        if progress:
            progress(r + 1, settings.timing_rounds)
    return samples


def summarize_speed(samples: TimingSamples, price_quantile: float, peak_memory: float, size_mb: float) -> SpeedMetrics:
    """Robust speed figures from interleaved samples: medians, and [q, 1-q] quantile bands.

    The throughput band's low end is what capacity is priced on (see tasks.measure.cost).
    """
    all_ms = np.concatenate(samples.latency_ms)
    round_p50 = [float(np.median(b)) for b in samples.latency_ms]
    rates = np.asarray(samples.throughput_per_s)
    return SpeedMetrics(
        latency_p50_ms=float(np.percentile(all_ms, 50)),
        latency_p95_ms=float(np.percentile(all_ms, 95)),
        latency_p50_low_ms=float(np.quantile(round_p50, price_quantile)),
        latency_p50_high_ms=float(np.quantile(round_p50, 1 - price_quantile)),
        throughput_per_s=float(np.median(rates)),
        throughput_low_per_s=float(np.quantile(rates, price_quantile)),
        throughput_high_per_s=float(np.quantile(rates, 1 - price_quantile)),
        peak_memory_mb=peak_memory,
        size_mb=size_mb,
        throughput_min_per_s=float(rates.min()),
        throughput_max_per_s=float(rates.max()),
        timing_rounds=int(len(rates)),
        throughput_rounds=tuple(float(r) for r in rates),
    )


def measure_speed(session, model_path: Path, latency_feeds: list[dict[str, np.ndarray]],
                  throughput_feeds: list[dict[str, np.ndarray]], settings: EvaluateSettings) -> SpeedMetrics:
    """Time one model alone (rounds of latency and throughput) and measure its memory.

    The flow times candidates together with `time_interleaved`; this is for a single model.
    """
    samples = time_interleaved({"model": session}, latency_feeds, throughput_feeds, settings)["model"]
    return summarize_speed(samples, settings.price_quantile,
                           peak_memory_mb(model_path, throughput_feeds[0], settings.intra_op_threads),
                           file_size_mb(model_path))


def peak_memory_mb(model_path: Path, feed: dict[str, np.ndarray], threads: int) -> float:
    """Memory (MB) the model itself takes at its peak: load it and serve one batch in a fresh process.

    A fresh process, because this one holds every other candidate; and the probe reports its own
    high-water mark (VmHWM) minus its resident memory before loading the model, so the figure is the
    model's, not the interpreter's or onnxruntime's (ru_maxrss would also inherit the parent's peak).

    Raises:
        RequantError: the probe could not load or run the model (its last error line is quoted).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        feed_path = Path(tmp) / "feed.npz"
        np.savez(feed_path, **feed)
        probe = subprocess.run(
            [sys.executable, "-m", "tasks.measure.memory", str(model_path), str(feed_path), str(threads)],
            capture_output=True, text=True,
        )
    if probe.returncode != 0:
        lines = [line for line in probe.stderr.splitlines() if line.strip()]
        raise RequantError(f"memory probe failed on {Path(model_path).name}: {lines[-1] if lines else probe.returncode}")
    return float(json.loads(probe.stdout.strip().splitlines()[-1])["model_peak_mb"])
