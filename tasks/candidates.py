"""Build one candidate from its recipe, prove it, and measure it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.benchmark import SpeedMetrics, file_size_mb, measure_speed
from tasks.cost import CostEstimate, monthly_cost
from tasks.errors import RequantError
from tasks.evaluation import QualityMetrics, onnx_session, predict_onnx, quality_metrics
from tasks.onnx_graph import prove_candidate
from tasks.quality_gate import LossInterval, paired_relative_loss
from tasks.recipes.base import config_hash, parse_config, recipe_class
from tasks.reference import Reference
from tasks.selection import Candidate
from tasks.settings import (
    CandidateSpec,
    EvaluateSettings,
    HardwareProfile,
    QualityBar,
    TrafficSettings,
)

PROOF_FILE = "proof.json"


@dataclass
class BuiltCandidate:
    """A candidate's ONNX file and the proof that it is what it claims, or why building failed."""

    name: str
    recipe: str
    precision: str
    config: dict
    config_hash: str
    model_path: Path | None = None
    lowered_nodes: int = 0
    size_ratio: float = 0.0
    build_seconds: float = 0.0
    reused: bool = False
    # Which host and process built it: with a Dask runner, a worker, not the flow's process.
    built_by: str = ""
    error: str | None = None


@dataclass
class MeasuredCandidate:
    """A built candidate with its quality, speed and cost."""

    built: BuiltCandidate
    quality: QualityMetrics | None = None
    speed: SpeedMetrics | None = None
    cost: CostEstimate | None = None
    predictions: list[int] = field(default_factory=list)
    accuracy_loss: LossInterval | None = None
    error: str | None = None

    def metrics(self, reference_accuracy: float) -> dict[str, float]:
        """The flat metric dict logged for every candidate under the same names."""
        out: dict[str, float] = {}
        if self.quality:
            out.update(self.quality.as_dict())
            out["relative_accuracy_loss"] = (reference_accuracy - self.quality.accuracy) / reference_accuracy
        if self.accuracy_loss:
            out["relative_accuracy_loss_low"] = self.accuracy_loss.low
            out["relative_accuracy_loss_high"] = self.accuracy_loss.high
        if self.speed:
            out.update(self.speed.as_dict())
        if self.cost:
            out["monthly_cost_usd"] = self.cost.monthly_cost_usd
            out["instances"] = self.cost.instances
            out["usd_per_million_requests"] = self.cost.usd_per_million_requests
        out["lowered_nodes"] = self.built.lowered_nodes
        out["size_ratio_vs_fp32"] = self.built.size_ratio
        out["build_seconds"] = self.built.build_seconds
        return out

    def for_selection(self) -> Candidate:
        """The numbers the pure selection function needs."""
        if self.error or not (self.quality and self.speed and self.cost):
            return Candidate(name=self.built.name, recipe=self.built.recipe, error=self.error or "not measured")
        return Candidate(
            name=self.built.name, recipe=self.built.recipe, accuracy=self.quality.accuracy,
            hard_slice_accuracy=self.quality.hard_slice_accuracy, latency_p95_ms=self.speed.latency_p95_ms,
            throughput_per_s=self.speed.throughput_per_s, throughput_low_per_s=self.speed.throughput_low_per_s,
            throughput_high_per_s=self.speed.throughput_high_per_s, monthly_cost_usd=self.cost.monthly_cost_usd,
            size_mb=self.speed.size_mb,
            accuracy_loss_high=self.accuracy_loss.high if self.accuracy_loss else None,
        )


def build_candidate(spec: CandidateSpec, reference: Reference, source_digest: str, work_dir: Path) -> BuiltCandidate:
    """Run the candidate's recipe into a content-addressed folder, then prove the result.

    A folder that already holds a proven model for the same (source, recipe, config) is reused:
    re-runs after a crash do not redo finished work. Failures are returned, not raised, so one
    broken recipe does not stop the others.
    """
    cls = recipe_class(spec.recipe)
    config = parse_config(spec.recipe, spec.config, spec.name)
    digest = config_hash(spec.recipe, config, source_digest)
    built = BuiltCandidate(spec.name, spec.recipe, cls.precision, config.model_dump(mode="json"), digest,
                           built_by=f"{socket.gethostname()}:{os.getpid()}")
    out_dir = work_dir / "candidates" / f"{spec.recipe}-{digest}"
    proof_path = out_dir / PROOF_FILE
    if proof_path.is_file() and (out_dir / "model.onnx").is_file():
        proof = json.loads(proof_path.read_text())
        built.model_path, built.lowered_nodes, built.size_ratio = out_dir / "model.onnx", proof["lowered_nodes"], proof["size_ratio"]
        built.reused = True
        return built
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    start = time.perf_counter()
    try:
        model_path = cls().run(reference.inputs, config, out_dir)
        proof = prove_candidate(model_path, file_size_mb(reference.inputs.fp32_model), reference.proof_feeds,
                                must_lower_precision=cls.lowers_precision)
    except Exception as exc:  # a recipe may fail in onnxruntime internals; record why and go on
        built.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        return built
    built.build_seconds = time.perf_counter() - start
    built.model_path, built.lowered_nodes, built.size_ratio = model_path, proof.lowered_nodes, proof.size_ratio
    # Written last: its presence means the folder holds a finished, proven candidate.
    proof_path.write_text(json.dumps(asdict(proof)))
    return built


def measure_candidate(built: BuiltCandidate, reference: Reference, evaluate: EvaluateSettings,
                      profile: HardwareProfile, traffic: TrafficSettings, bar: QualityBar) -> MeasuredCandidate:
    """Score quality on the whole evaluation set, then time it alone on this host, then price it.

    With `bar.gate == "interval"` the accuracy loss also gets its paired bootstrap interval.
    """
    measured = MeasuredCandidate(built)
    if built.error or built.model_path is None:
        measured.error = built.error or "not built"
        return measured
    try:
        session = onnx_session(built.model_path, evaluate.intra_op_threads)
        logits = predict_onnx(session, reference.eval_batches, len(reference.y_true))
        measured.quality = quality_metrics(logits, reference.y_true, reference.predictions, reference.hard_idx)
        measured.predictions = logits.argmax(axis=1).tolist()
        if bar.gate == "interval":
            measured.accuracy_loss = paired_relative_loss(
                reference.predictions == reference.y_true, logits.argmax(axis=1) == reference.y_true,
                bar.confidence, bar.bootstrap_samples)
        measured.speed = measure_speed(session, built.model_path, reference.latency_feeds, reference.throughput_feeds, evaluate)
        # Capacity is planned on the slowest measured repeat: a fleet sized on the median would fall
        # short whenever the host runs at the low end of its measured spread.
        measured.cost = monthly_cost(measured.speed.throughput_low_per_s, profile, traffic)
    except (RequantError, RuntimeError, ValueError, OSError) as exc:
        measured.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return measured
