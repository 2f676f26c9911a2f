"""Speed and memory of one candidate, measured on this host.

Benchmarks run one candidate at a time with fixed thread counts, warm-up and repeats: concurrent
sessions on a 2-core machine measure each other, not the model (onnxruntime#10273). Every
number carries a noise band (the spread over repeats) so a decision never rests on a difference
smaller than the noise.
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

import numpy as np

from tasks.settings import EvaluateSettings

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

    def as_dict(self) -> dict[str, float]:
        """Plain dict for MLflow and the decision record."""
        return asdict(self)


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


def file_size_mb(model_path: Path) -> float:
    """Size of the model file plus any external-data files beside it, in MB (1e6 bytes)."""
    model_path = Path(model_path)
    total = model_path.stat().st_size
    total += sum(p.stat().st_size for p in model_path.parent.glob(model_path.name + ".data"))
    return total / 1e6


def _timed_run(session, feed: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(["logits"], feed)
    return time.perf_counter() - start


def measure_speed(session, model_path: Path, latency_feeds: list[dict[str, np.ndarray]],
                  throughput_feeds: list[dict[str, np.ndarray]], settings: EvaluateSettings) -> SpeedMetrics:
    """Time batch-1 latency and batched throughput; measure peak memory in a fresh process.

    Args:
        session: an open InferenceSession with settings.intra_op_threads threads.
        model_path: the candidate's ONNX file (for size and the memory probe).
        latency_feeds: single-text feeds, cycled through for the latency runs.
        throughput_feeds: serving-size batches; one repeat runs all of them.
        settings: runs, repeats and warm-up.
    """
    for i in range(settings.warmup_runs):
        _timed_run(session, latency_feeds[i % len(latency_feeds)])
    per_block = settings.latency_runs // settings.latency_repeats
    blocks = [
        [_timed_run(session, latency_feeds[(b * per_block + i) % len(latency_feeds)]) * 1e3 for i in range(per_block)]
        for b in range(settings.latency_repeats)
    ]
    all_ms = np.concatenate(blocks)
    block_p50 = [float(np.median(b)) for b in blocks]

    for feed in throughput_feeds[:2]:
        _timed_run(session, feed)
    sentences = sum(len(f["input_ids"]) for f in throughput_feeds)
    rates = [sentences / sum(_timed_run(session, f) for f in throughput_feeds) for _ in range(settings.throughput_repeats)]

    return SpeedMetrics(
        latency_p50_ms=float(np.percentile(all_ms, 50)),
        latency_p95_ms=float(np.percentile(all_ms, 95)),
        latency_p50_low_ms=min(block_p50),
        latency_p50_high_ms=max(block_p50),
        throughput_per_s=float(np.median(rates)),
        throughput_low_per_s=float(min(rates)),
        throughput_high_per_s=float(max(rates)),
        peak_memory_mb=peak_memory_mb(model_path, throughput_feeds[0], settings.intra_op_threads),
        size_mb=file_size_mb(model_path),
    )


def peak_memory_mb(model_path: Path, feed: dict[str, np.ndarray], threads: int) -> float:
    """Peak resident memory (MB) of a fresh process that loads the model and serves one batch.

    A separate process, because this one's high-water mark already holds every other candidate.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        feed_path = Path(tmp) / "feed.npz"
        np.savez(feed_path, **feed)
        probe = subprocess.run(
            [sys.executable, "-m", "tasks.memory_probe", str(model_path), str(feed_path), str(threads)],
            capture_output=True, text=True, check=True,
        )
    return float(json.loads(probe.stdout.strip().splitlines()[-1])["peak_rss_mb"])
