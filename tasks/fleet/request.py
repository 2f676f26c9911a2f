"""What a fleet worker is asked to measure, written as one folder every worker can read.

The flow scores quality once, on its own host; speed and served capacity depend on the instance, so
each profile's worker gets the same request: the graphs of the candidates that passed (production
and FP32 always), the timing feeds, the texts to load-test with and the settings to measure by. The
worker writes its answer next to it (`results/PROFILE.json`). Paths are absolute: workers read the
flow's work folder, so on real instances that folder is shared storage mounted at the same path
(docs/operations.md, "Pricing on a fleet").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REQUEST_FILE = "request.json"
FEEDS_FILE = "feeds.npz"


@dataclass(frozen=True)
class RequestedCandidate:
    """One graph to time on the worker, and how to serve it (or why it cannot be served)."""

    name: str
    model_path: str
    passes_bar: bool  # a passing candidate may be the profile's winner; production and FP32 are timed either way
    is_production: bool = False
    is_baseline: bool = False
    served: dict[str, str] | None = None  # ServedFiles fields as strings
    unservable_because: str | None = None


@dataclass
class MeasurementRequest:
    """The whole request; `folder` is where it was read from (results go under it)."""

    run_id: str  # the requantize parent run that asked
    candidates: list[RequestedCandidate]
    evaluate: dict  # EvaluateSettings as a dict
    loadtest: dict
    serving: dict
    traffic: dict
    target_ms: float  # the p95 target of the served load test
    price_from: str  # serving.price_from: served, or batched (no load test)
    texts: list[str] = field(default_factory=list)
    folder: Path | None = None

    def result_path(self, profile: str) -> Path:
        """Where the worker of `profile` writes its measurement."""
        return self.folder / "results" / f"{profile}.json"


def write_request(folder: Path, request: MeasurementRequest, latency_feeds: list[dict[str, np.ndarray]],
                  throughput_feeds: list[dict[str, np.ndarray]]) -> Path:
    """Write the request and its timing feeds into `folder`; return the request file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results").mkdir(exist_ok=True)
    arrays = {f"{kind}/{i}/{name}": value for kind, feeds in (("latency", latency_feeds), ("throughput", throughput_feeds))
              for i, feed in enumerate(feeds) for name, value in feed.items()}
    np.savez(folder / FEEDS_FILE, **arrays)
    body = {k: v for k, v in asdict(request).items() if k != "folder"}
    path = folder / REQUEST_FILE
    path.write_text(json.dumps(body))
    request.folder = folder
    return path


def read_request(path: str | Path) -> tuple[MeasurementRequest, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """The request at `path` and its (latency, throughput) feeds.

    Raises:
        FileNotFoundError: the worker cannot see the flow's folder (not shared storage at the same path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"measurement request {path} is not visible on this worker: mount the flow's work "
                                "folder here at the same path (shared storage)")
    body = json.loads(path.read_text())
    body["candidates"] = [RequestedCandidate(**c) for c in body["candidates"]]
    request = MeasurementRequest(**body, folder=path.parent)
    feeds: dict[str, dict[int, dict[str, np.ndarray]]] = {"latency": {}, "throughput": {}}
    with np.load(path.parent / FEEDS_FILE) as stored:
        for key in stored.files:
            kind, i, name = key.split("/", 2)
            feeds[kind].setdefault(int(i), {})[name] = stored[key]
    return (request, [feeds["latency"][i] for i in sorted(feeds["latency"])],
            [feeds["throughput"][i] for i in sorted(feeds["throughput"])])
