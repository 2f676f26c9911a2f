"""What a fleet worker does: time the requested graphs on this machine and load-test the ones that
matter, the same measurement the flow makes on its own host, with this machine's cores.

Quality is not measured here: it does not depend on the instance, and the flow scored it once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.build.candidates import one_line
from tasks.config.settings import EvaluateSettings, LoadtestSettings, ServingSettings
from tasks.fleet.request import MeasurementRequest, RequestedCandidate, read_request
from tasks.measure.served_pricing import ServedCapacity, measure_served
from tasks.measure.timing import (
    SpeedMetrics,
    cpu_info,
    peak_memory_mb,
    summarize_speed,
    time_interleaved,
)
from tasks.models.graph import file_size_mb, onnx_session
from tasks.recipes.base import runtime_versions
from tasks.serve.front import ServedFiles

log = logging.getLogger("requant")


@dataclass
class ProfileMeasurement:
    """One profile's answer: where it was measured, each graph's speed, the served capacities."""

    profile: str
    host: dict[str, str]
    speeds: dict[str, SpeedMetrics] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # candidate -> why it could not be timed here
    served: dict[str, ServedCapacity] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        """Plain dict, as the worker writes it (JSON)."""
        return {"profile": self.profile, "host": self.host, "errors": self.errors, "seconds": self.seconds,
                "speeds": {name: asdict(s) for name, s in self.speeds.items()},
                "served": {name: c.as_dict() for name, c in self.served.items()}}

    @classmethod
    def from_dict(cls, record: dict) -> "ProfileMeasurement":
        """Read back `as_dict`."""
        speeds = {name: SpeedMetrics(**{**s, "throughput_rounds": tuple(s["throughput_rounds"])})
                  for name, s in record["speeds"].items()}
        return cls(record["profile"], record["host"], speeds, record["errors"],
                   {name: ServedCapacity.from_dict(c) for name, c in record["served"].items()}, record["seconds"])


def cores_here() -> int:
    """The cores this process may run on (its CPU affinity: a worker started under taskset sees its share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def host_facts() -> dict[str, str]:
    """CPU model, ISA flags, cores usable here and the runtime versions: what the profile's prices stand on."""
    import onnxruntime

    return {**cpu_info(), "cores_available": str(cores_here()), "onnxruntime": onnxruntime.__version__,
            "runtime": ",".join(f"{k}={v}" for k, v in sorted(runtime_versions().items()))}


def measure_request(request_path: str | Path, profile: str) -> ProfileMeasurement:
    """Measure a fleet request on this machine and write the answer where the flow reads it.

    ONNX Runtime runs one thread per core this process may use, in timing and in the served model:
    an instance is priced on what its cores deliver.
    """
    start = time.perf_counter()
    request, latency_feeds, throughput_feeds = read_request(request_path)
    threads = cores_here()
    evaluate = EvaluateSettings(**request.evaluate).model_copy(update={"intra_op_threads": threads})
    result = ProfileMeasurement(profile, host_facts())
    log.info("measuring %d candidates as %s on %s (%d cores)", len(request.candidates), profile,
             result.host.get("cpu_model"), threads)
    sessions = {}
    for c in request.candidates:
        try:
            sessions[c.name] = onnx_session(Path(c.model_path), threads)
        except Exception as exc:  # onnxruntime's own types
            result.errors[c.name] = one_line(exc)
    samples = time_interleaved(sessions, latency_feeds, throughput_feeds, evaluate,
                               lambda r, n: log.info("timing round %d/%d", r, n))
    for c in request.candidates:
        timing = samples.get(c.name)
        if timing is None:
            continue
        if timing.error:
            result.errors[c.name] = timing.error
            continue
        memory = peak_memory_mb(Path(c.model_path), throughput_feeds[0], threads)
        result.speeds[c.name] = summarize_speed(timing, evaluate.price_quantile, memory, file_size_mb(Path(c.model_path)))
    if request.price_from == "served":
        batched = {name: s.throughput_low_per_s for name, s in result.speeds.items()}
        pending = [(c.name, _files(c)) for c in contenders(request, result.speeds)]
        measure_served(pending, batched, request.texts, LoadtestSettings(**request.loadtest),
                       ServingSettings(**request.serving), request.target_ms,
                       request.folder / "scratch" / profile, result.served, threads)
    result.seconds = time.perf_counter() - start
    path = request.result_path(profile)
    path.write_text(json.dumps(result.as_dict()))  # NaN (a failed memory probe) round-trips
    log.info("%s measured in %.0f s: %s", profile, result.seconds, path)
    return result


def contenders(request: MeasurementRequest, speeds: dict[str, SpeedMetrics]) -> list[RequestedCandidate]:
    """The models load-tested on a profile: the fastest passing candidate here (its likely winner),
    production and the FP32 baseline; the rest are priced through the served/batched ratio of the nearest."""
    timed = [c for c in request.candidates if c.name in speeds]
    passing = [c for c in timed if c.passes_bar and not c.is_production]
    fastest = max(passing, key=lambda c: speeds[c.name].throughput_per_s, default=None)
    return [c for c in timed if c is fastest or c.is_production or c.is_baseline]


def _files(c: RequestedCandidate) -> ServedFiles | str:
    if c.served is None:
        return c.unservable_because or "no served files"
    return ServedFiles(Path(c.served["onnx_model"]), Path(c.served["tokenizer"]), Path(c.served["card"]),
                       c.served.get("kind", "classifier"))

