"""Evaluate built candidates: score them against FP32 (screened, cached), time them side by side,
price them, and confirm the winner on rows that took no part in choosing it."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tasks.build.candidates import BuiltCandidate, now_ms, one_line
from tasks.build.reference import EvaluationRows, Reference
from tasks.config.settings import (
    EvaluateSettings,
    HardwareProfile,
    QualityBar,
    TrafficSettings,
)
from tasks.measure.cost import CostEstimate, monthly_cost
from tasks.measure.quality_intervals import (
    LossInterval,
    paired_accuracy_gain,
    paired_relative_loss,
)
from tasks.measure.result_cache import ResultCache
from tasks.measure.scoring import QualityMetrics, predict_onnx, prediction_quality
from tasks.measure.screening import Bar as ScreenBar
from tasks.measure.screening import ScreeningOutcome, sequential_screen
from tasks.measure.served_pricing import ServedPrice
from tasks.measure.speed_screen import SpeedScreenOutcome
from tasks.measure.timing import (
    SpeedMetrics,
    peak_memory_mb,
    summarize_speed,
    time_interleaved,
)
from tasks.models.graph import file_size_mb, onnx_session
from tasks.recipes.base import is_baseline
from tasks.serve.front import ServedFiles, files_of_mlflow_model
from tasks.track import ProductionVersion

log = logging.getLogger("requant")


@dataclass
class QualityOnRows:
    """A candidate's quality on one set of rows, with paired loss intervals against FP32."""

    quality: QualityMetrics
    accuracy_loss: LossInterval | None = None
    hard_slice_loss: LossInterval | None = None

    def as_dict(self) -> dict:
        """Plain dict for the decision record."""
        out = {**self.quality.as_dict()}
        if self.accuracy_loss:
            out["relative_accuracy_loss_interval"] = self.accuracy_loss.as_list()
        if self.hard_slice_loss:
            out["hard_slice_relative_loss_interval"] = self.hard_slice_loss.as_list()
        return out


@dataclass
class MeasuredCandidate:
    """A built candidate with its quality, speed and cost."""

    built: BuiltCandidate
    quality: QualityMetrics | None = None
    speed: SpeedMetrics | None = None
    cost: CostEstimate | None = None
    predictions: list[int] = field(default_factory=list)
    accuracy_loss: LossInterval | None = None
    hard_slice_loss: LossInterval | None = None
    # The same gate on rows that took no part in choosing (filled for the winner).
    confirmation: QualityOnRows | None = None
    accuracy_gain_vs_production: LossInterval | None = None
    error: str | None = None
    score_seconds: float = 0.0
    timing_seconds: float = 0.0  # its share of the interleaved timing rounds, memory probe included
    finished_at_ms: int = 0  # when its last measurement ended (its MLflow run ends then)
    # Set when screening stopped scoring it early: it clearly fails the bar (never timed or confirmed).
    screening: ScreeningOutcome | None = None
    # Set when the speed screen found it clearly slower than a rival (tasks/measure/speed_screen.py): deferred
    # candidates are neither scored nor timed unless brought back (`brought_back` on the outcome).
    speed_screening: SpeedScreenOutcome | None = None
    rows_scored: int = 0  # selection rows run through ONNX Runtime in this run (0: every score was reused)
    scores_reused: bool = False  # some waves' predictions came from work_dir/results
    # Why it was scored but not timed (it fails the quality bar, so its speed cannot change the decision).
    untimed_because: str | None = None
    # Median throughput in the speed screen's short rounds: a rough speed for candidates never timed in full.
    screen_throughput_per_s: float | None = None
    # Where its price comes from (tasks/measure/served_pricing.py): its own served capacity, a load-tested
    # model's served/batched ratio, or batched throughput; `batched_cost` keeps the batched price.
    served_price: ServedPrice | None = None
    batched_cost: CostEstimate | None = None
    # With cost.fleet: its figures on every measured profile (fleet.PROFILE.*), so MLflow compares them.
    fleet_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def screened_out(self) -> bool:
        """Whether screening stopped it: it clearly fails the bar on a sample of the rows."""
        return self.screening is not None and self.screening.screened_out

    @property
    def deferred(self) -> bool:
        """Whether the speed screen deferred it and it was not brought back (so it was never scored or timed)."""
        return (self.speed_screening is not None and self.speed_screening.deferred
                and not self.speed_screening.brought_back)

    def metrics(self, reference: Reference) -> dict[str, float]:
        """The flat metric dict logged for every candidate under the same names."""
        out: dict[str, float] = {}
        if self.quality:
            out.update(self.quality.as_dict())
            out["relative_accuracy_loss"] = _relative(reference.quality.accuracy, self.quality.accuracy)
            out["hard_slice_relative_loss"] = _relative(reference.quality.hard_slice_accuracy,
                                                        self.quality.hard_slice_accuracy)
        if self.accuracy_loss:
            out["relative_accuracy_loss_low"] = self.accuracy_loss.low
            out["relative_accuracy_loss_high"] = self.accuracy_loss.high
        if self.hard_slice_loss:
            out["hard_slice_relative_loss_low"] = self.hard_slice_loss.low
            out["hard_slice_relative_loss_high"] = self.hard_slice_loss.high
        if self.confirmation:
            out["confirmation_accuracy"] = self.confirmation.quality.accuracy
            out["confirmation_hard_slice_accuracy"] = self.confirmation.quality.hard_slice_accuracy
            if self.confirmation.accuracy_loss:
                out["confirmation_relative_accuracy_loss_high"] = self.confirmation.accuracy_loss.high
        if self.accuracy_gain_vs_production:
            out["accuracy_gain_vs_production_low"] = self.accuracy_gain_vs_production.low
        if self.speed:
            out.update(self.speed.as_dict())
        if self.served_price and self.served_price.ratio is not None:
            # The same names for every candidate priced from served figures, load-tested or through a ratio
            # (a run where nothing could be load-tested prices everyone on batched figures, and logs none).
            out["priced_sentences_per_s"] = self.served_price.sentences_per_s
            out["served_to_batched_ratio"] = self.served_price.ratio
            out["served_load_tested"] = float(self.served_price.basis == "served")
        if self.batched_cost:
            out["batched_monthly_cost_usd"] = self.batched_cost.monthly_cost_usd
        if self.cost:
            out["monthly_cost_usd"] = self.cost.monthly_cost_usd
            out["instances"] = self.cost.instances
            out["usd_per_million_requests"] = self.cost.usd_per_million_requests
            out["near_instance_boundary"] = float(self.cost.near_instance_boundary)
        out["lowered_nodes"] = self.built.lowered_nodes
        out["size_ratio_vs_fp32"] = self.built.size_ratio
        out["build_seconds"] = self.built.build_seconds
        out["score_seconds"] = self.score_seconds
        out["rows_scored"] = self.rows_scored
        out["timing_seconds"] = self.timing_seconds
        if self.screen_throughput_per_s is not None:
            out["screen_throughput_per_s"] = self.screen_throughput_per_s
        out.update(self.fleet_metrics)
        return out


def _relative(reference: float, value: float) -> float:
    return (reference - value) / reference if reference > 0 else float("nan")


def score_on_rows(model_path: Path, rows: EvaluationRows, bar: QualityBar, threads: int) -> tuple[QualityOnRows, np.ndarray]:
    """Score a model on one set of rows against FP32, with paired intervals; return it and the predictions.

    Raises:
        ValueError: the model's logits are not finite on some rows (fail closed).
    """
    session = onnx_session(model_path, threads)
    logits = predict_onnx(session, rows.batches, len(rows.y_true))
    bad = int((~np.isfinite(logits)).any(axis=1).sum())
    if bad:
        raise ValueError(f"logits are NaN/inf on {bad} of {len(rows.y_true)} evaluation rows")
    predictions = logits.argmax(axis=1)
    return quality_on_rows(predictions, rows, bar), predictions


def quality_on_rows(predictions: np.ndarray, rows: EvaluationRows, bar: QualityBar) -> QualityOnRows:
    """Quality of predicted classes on one set of rows, with the paired loss intervals the gate judges."""
    result = QualityOnRows(prediction_quality(predictions, rows.y_true, rows.predictions, rows.hard_idx))
    if bar.gate == "interval":
        reference_correct, correct = rows.predictions == rows.y_true, predictions == rows.y_true
        result.accuracy_loss = paired_relative_loss(reference_correct, correct, bar.confidence, bar.bootstrap_samples)
        if len(rows.hard_idx):
            result.hard_slice_loss = paired_relative_loss(reference_correct[rows.hard_idx], correct[rows.hard_idx],
                                                          bar.confidence, bar.bootstrap_samples)
    return result


def score_candidate(built: BuiltCandidate, reference: Reference, evaluate: EvaluateSettings,
                    bar: QualityBar, scores: ResultCache | None = None) -> MeasuredCandidate:
    """Score quality on the selection rows, wave by wave, screening out a clear failure early.

    Waves already scored for this graph (same rows, host and runtimes) come from `scores` instead of
    ONNX Runtime. Screening (evaluate.screening, tasks/measure/screening.py) stops after a wave once the
    candidate clearly fails the bar; the production model is always scored in full. Failures become
    the candidate's error, never the run's.
    """
    measured = MeasuredCandidate(built)
    if not built.started_at_ms:
        built.started_at_ms = now_ms()
    if built.error or built.model_path is None:
        measured.error = built.error or "not built"
        measured.finished_at_ms = now_ms()
        return measured
    start = time.perf_counter()
    selection = EvaluationRows(reference.eval_batches, reference.y_true, reference.logits, reference.hard_idx,
                               reference.quality, np.arange(len(reference.y_true)))
    waves = reference.waves or [np.arange(len(reference.y_true))]
    ends = reference.wave_batch_ends or [len(reference.eval_batches)]
    key = scores.key(built.model_sha256) if scores is not None and built.model_sha256 else None
    done = scores.load(key, [len(w) for w in waves]) if key else {}
    new: dict[int, np.ndarray] = {}
    session = None

    def predict_wave(i: int) -> np.ndarray:
        nonlocal session
        if i in done:
            return done[i]
        session = session or onnx_session(built.model_path, evaluate.intra_op_threads)
        logits = predict_onnx(session, reference.eval_batches[ends[i - 1] if i else 0:ends[i]], len(reference.y_true))[waves[i]]
        bad = int((~np.isfinite(logits)).any(axis=1).sum())
        if bad:
            raise ValueError(f"logits are NaN/inf on {bad} of {len(waves[i])} evaluation rows")
        measured.rows_scored += len(waves[i])
        new[i] = logits.argmax(axis=1)
        return new[i]

    screening = evaluate.screening
    try:
        outcome, predictions = sequential_screen(
            predict_wave, waves, reference.predictions == reference.y_true, reference.y_true, reference.hard_idx,
            ScreenBar(bar.max_relative_accuracy_loss, bar.max_hard_slice_relative_loss, bar.min_accuracy),
            screening.alpha, enabled=screening.enabled and not built.is_production)
        if new and key:
            scores.store(key, {**done, **new}, built.model_sha256)
        measured.scores_reused = bool(done)
        if outcome.screened_out:
            measured.screening = outcome
            return measured
        scored = quality_on_rows(predictions, selection, bar)
    except Exception as exc:  # onnxruntime's own exception types do not derive from RuntimeError
        measured.error = one_line(exc)
        return measured
    finally:
        measured.score_seconds = time.perf_counter() - start
        measured.finished_at_ms = now_ms()
    measured.quality, measured.accuracy_loss, measured.hard_slice_loss = scored.quality, scored.accuracy_loss, scored.hard_slice_loss
    measured.predictions = predictions.tolist()
    return measured


def compare_with_production(measured: list[MeasuredCandidate], reference: Reference, bar: QualityBar) -> None:
    """Give every candidate its paired accuracy gain over the production model (same rows)."""
    production = next((m for m in measured if m.built.is_production and m.quality), None)
    if production is None:
        return
    production_correct = np.asarray(production.predictions) == reference.y_true
    for m in measured:
        if m is not production and m.quality and not m.error:
            m.accuracy_gain_vs_production = paired_accuracy_gain(
                np.asarray(m.predictions) == reference.y_true, production_correct, bar.confidence, bar.bootstrap_samples)


# Why a scored candidate that fails the bar is not timed (its MLflow run and decision.json say so).
UNTIMED_FAILING = "it fails the quality bar, so its speed cannot change the decision"


def mark_untimed_if_failing(m: MeasuredCandidate, passes: Callable[[MeasuredCandidate], bool]) -> bool:
    """Mark a scored candidate that fails the bar as not to be timed (production and FP32 are timed
    whatever their quality: savings are priced against them); return whether it was marked."""
    if m.built.is_production or is_baseline(m.built) or passes(m):
        return False
    m.untimed_because = UNTIMED_FAILING
    return True


def time_candidates(measured: list[MeasuredCandidate], reference: Reference, evaluate: EvaluateSettings,
                    profile: HardwareProfile, traffic: TrafficSettings,
                    progress: Callable[[int, int], None] | None = None, measure_memory: bool = True,
                    passes: Callable[[MeasuredCandidate], bool] | None = None) -> None:
    """Time every scored candidate in interleaved rounds, measure its memory, and price it.

    Candidates that failed earlier are skipped; a candidate that fails here gets the error, the
    others go on. With `passes` (the quality bar on scores), a candidate that fails it is not timed
    either: selection never looks at a failing candidate's speed, and timing is the run's largest
    cost per candidate. The production model is always timed (its price is what a promotion saves
    against). `measure_memory=False` skips the memory probe (benchmarks that only re-time).
    """
    sessions = {}
    for m in measured:
        if m.error or m.quality is None or (passes is not None and mark_untimed_if_failing(m, passes)):
            continue
        try:
            sessions[m.built.name] = onnx_session(m.built.model_path, evaluate.intra_op_threads)
        except Exception as exc:
            m.error = one_line(exc)
    if not sessions:
        return
    samples = time_interleaved(sessions, reference.latency_feeds, reference.throughput_feeds, evaluate, progress)
    timed = [m for m in measured if m.built.name in samples and samples[m.built.name].error is None]
    for m in measured:
        if m.built.name in samples and samples[m.built.name].error:
            m.error = samples[m.built.name].error
    # Memory probes run after the timing, several at once: each is its own process measuring its own
    # peak, so they do not disturb each other's figure (and no timing runs beside them).
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        probes = {m.built.name: pool.submit(_probe_memory, m.built.model_path, reference.throughput_feeds[0],
                                            evaluate.intra_op_threads, measure_memory) for m in timed}
    for m in timed:
        timing = samples[m.built.name]
        try:
            memory, probe_seconds = probes[m.built.name].result()
            m.timing_seconds = timing.seconds + probe_seconds
            m.finished_at_ms = now_ms()
            m.speed = summarize_speed(timing, evaluate.price_quantile, memory, file_size_mb(m.built.model_path))
            # Capacity is planned on a robust low quantile of the rounds: a fleet sized on the median
            # would fall short whenever the host runs at the slow end of its measured spread.
            m.cost = monthly_cost(m.speed.throughput_low_per_s, profile, traffic, m.speed.throughput_high_per_s)
        except Exception as exc:
            m.error = one_line(exc)


def _probe_memory(model_path: Path, feed: dict[str, np.ndarray], threads: int, measure: bool) -> tuple[float, float]:
    """(peak memory MB, seconds the probe took); NaN memory when not measured."""
    start = time.perf_counter()
    memory = peak_memory_mb(model_path, feed, threads) if measure else float("nan")
    return memory, time.perf_counter() - start


def confirm(measured: MeasuredCandidate, reference: Reference, bar: QualityBar, threads: int) -> None:
    """Score a candidate on the confirmation rows (never used to choose it); sets `measured.confirmation`.

    Raises:
        ValueError: non-finite logits on the confirmation rows.
    """
    if reference.confirmation is None or measured.built.model_path is None:
        return
    measured.confirmation, _ = score_on_rows(measured.built.model_path, reference.confirmation, bar, threads)


def files_to_serve(m: MeasuredCandidate, reference: Reference, production: ProductionVersion | None) -> ServedFiles | str:
    """The files a candidate is served from: production's as downloaded from the registry, a new
    candidate's graph with the reference's tokenizer and card; or why it cannot be served."""
    if m.built.is_production:
        if production is None or production.model_dir is None:
            return "production is a plain ONNX version, not a text-in serving model"
        return files_of_mlflow_model(production.model_dir)
    if reference.serving is None:
        return "this model family has no text-in serving model"
    # Beside the source model's tokenizer: each source model has its own labels (runs may overlap).
    card = reference.serving.write_card(reference.serving.tokenizer_dir.parent / "served-classifier.json")
    return ServedFiles(m.built.model_path, reference.serving.tokenizer_dir, card)
