"""The steps around selection that make a decision trustworthy: fail-closed checks, production measured
as a candidate, confirmation on held-out rows, and the decision record of each candidate.

Pure computation over measured candidates (no Prefect, no MLflow calls); the flow wires it.
"""

from __future__ import annotations

import logging

import numpy as np

from tasks import track
from tasks.build.candidates import BuiltCandidate
from tasks.build.reference import Reference
from tasks.config.settings import EvaluateSettings, QualityBar, Settings
from tasks.core.errors import RequantError
from tasks.core.hashing import sha256_of
from tasks.decide.selection import Candidate, Decision, judge, select
from tasks.decide.selection import Reference as QualityReference
from tasks.evaluate.candidates import MeasuredCandidate, confirm
from tasks.evaluate.speed import SpeedScreen
from tasks.measure.speed_screen import TEST as SPEED_TEST

log = logging.getLogger("requant")


def check_reference(reference: Reference) -> None:
    """Fail closed on a reference no loss can be judged against."""
    if not reference.quality.accuracy > 0:
        raise RequantError(
            f"the FP32 reference scores {reference.quality.accuracy:.2%} on the evaluation set: its labels do not match "
            "the model's classes (or the model is untrained); check data.label_column and the model version")


def production_candidate(production: track.ProductionVersion) -> BuiltCandidate:
    """The production version as a candidate, so it is measured in this run like any other."""
    tags = production.tags
    return BuiltCandidate(
        name=f"production-v{production.version}", recipe=tags.get(track.TAG_RECIPE, "unknown"),
        precision=tags.get("requant.precision", "production"), config={}, config_hash=tags.get(track.TAG_CONFIG_HASH, ""),
        model_path=production.model_path, built_by="registry", reused=True, is_production=True,
        model_sha256=tags.get(track.TAG_MODEL_SHA256) or sha256_of(production.model_path))


def confirm_winner(winner: MeasuredCandidate | None, decision: Decision, reference: Reference,
                    settings: Settings) -> dict | None:
    """Judge the winner again on the confirmation rows; a winner that fails there is not promoted.

    The winner was chosen as the best of many scores on the selection rows, so its score there is
    biased upwards; the confirmation rows took no part in choosing it.
    """
    if winner is None or reference.confirmation is None or not decision.promote:
        return None
    try:
        confirm(winner, reference, settings.quality_bar, settings.evaluate.intra_op_threads)
    except Exception as exc:  # non-finite logits on the held-out rows: fail closed
        decision.promote = False
        decision.summary = f"{winner.built.name} won on the selection rows but failed on the confirmation rows ({exc}); nothing promoted"
        return {"candidate": winner.built.name, "passed_bar": False, "reason": str(exc)}
    rows = reference.confirmation
    held_out = Candidate(
        name=winner.built.name, recipe=winner.built.recipe, accuracy=winner.confirmation.quality.accuracy,
        hard_slice_accuracy=winner.confirmation.quality.hard_slice_accuracy,
        latency_p95_ms=winner.speed.latency_p95_ms if winner.speed else 0.0,
        accuracy_loss_high=winner.confirmation.accuracy_loss.high if winner.confirmation.accuracy_loss else None,
        hard_slice_loss_high=winner.confirmation.hard_slice_loss.high if winner.confirmation.hard_slice_loss else None)
    verdict = judge(held_out, QualityReference(rows.quality.accuracy, rows.quality.hard_slice_accuracy), settings.quality_bar)
    result = {"candidate": winner.built.name, "rows": int(len(rows.y_true)), "passed_bar": verdict.passed_bar,
              "fp32_accuracy": rows.quality.accuracy, "fp32_hard_slice_accuracy": rows.quality.hard_slice_accuracy,
              **winner.confirmation.as_dict(), "relative_accuracy_loss": verdict.relative_accuracy_loss,
              "hard_slice_relative_loss": verdict.hard_slice_relative_loss, "reason": verdict.reason}
    if not verdict.passed_bar:
        decision.promote = False
        decision.summary = (f"{winner.built.name} won on the selection rows but does not confirm on {len(rows.y_true)} "
                            f"held-out rows ({verdict.reason}); nothing promoted")
    return result


def same_graph_as_production(winner: MeasuredCandidate | None, decision: Decision,
                              measured: list[MeasuredCandidate]) -> None:
    """A winner whose graph is byte-identical to production's is production: nothing to promote."""
    production = next((m for m in measured if m.built.is_production), None)
    if decision.promote and winner and production and winner.built.model_sha256 == production.built.model_sha256:
        decision.promote = False
        decision.summary = (f"{winner.built.name} is the production model itself ({production.built.name}, "
                            "same graph sha256); kept production")


def candidate_record(m: MeasuredCandidate, reference: Reference) -> dict:
    """One candidate in decision.json: what it is, how it was built, every number measured."""
    return {"recipe": m.built.recipe, "config_hash": m.built.config_hash, "built_by": m.built.built_by,
            "config": m.built.config, "error": m.error, "is_production": m.built.is_production,
            "untimed_because": m.untimed_because,
            "model_sha256": m.built.model_sha256, "reused": m.built.reused, "rebuilt_because": m.built.rebuilt_because,
            "relative_accuracy_loss_interval": m.accuracy_loss.as_list() if m.accuracy_loss else None,
            "hard_slice_relative_loss_interval": m.hard_slice_loss.as_list() if m.hard_slice_loss else None,
            "accuracy_gain_vs_production_interval": (m.accuracy_gain_vs_production.as_list()
                                                     if m.accuracy_gain_vs_production else None),
            "price_note": m.cost.boundary_note() if m.cost else "",
            # Which figure the price comes from: served (its own load test), served-ratio, or batched.
            "priced_from": m.served_price.as_dict() if m.served_price else {"basis": "batched"} if m.cost else None,
            "batched_cost": m.batched_cost.as_dict() if m.batched_cost else None,
            # Per-round rates in round order: the paired speed comparison can be re-checked from the record.
            "throughput_rounds_per_s": list(m.speed.throughput_rounds) if m.speed else [],
            **m.metrics(reference)}


def select_measured(measured: list[MeasuredCandidate], reference: Reference, bar: QualityBar) -> Decision:
    """Selection (tasks/decide/selection.py) over measured candidates, against the FP32 reference."""
    quality = QualityReference(reference.quality.accuracy, reference.quality.hard_slice_accuracy)
    return select([for_selection(m, reference.y_true) for m in measured], quality, bar)


def for_selection(measured: MeasuredCandidate, y_true: np.ndarray | None = None) -> Candidate:
    """What the pure selection function sees of a measured candidate; with the selection rows' labels (`y_true`),
    also which rows it got right, so accuracies are compared beyond noise."""
    if measured.deferred:
        return Candidate(name=measured.built.name, recipe=measured.built.recipe, error=measured.speed_screening.reason,
                         is_production=measured.built.is_production)
    if measured.screened_out:
        return Candidate(name=measured.built.name, recipe=measured.built.recipe, error=measured.screening.reason,
                         is_production=measured.built.is_production)
    correct_rows = (tuple(bool(x) for x in np.asarray(measured.predictions) == y_true) if y_true is not None
                    and len(measured.predictions) == len(y_true) else ())
    if not measured.error and measured.quality and measured.speed is None and measured.untimed_because:
        # Scored and failing: its quality numbers give the verdict's reason; untimed, it cannot pass.
        return Candidate(
            name=measured.built.name, recipe=measured.built.recipe, accuracy=measured.quality.accuracy,
            hard_slice_accuracy=measured.quality.hard_slice_accuracy, correct_rows=correct_rows,
            accuracy_loss_high=measured.accuracy_loss.high if measured.accuracy_loss else None,
            hard_slice_loss_high=measured.hard_slice_loss.high if measured.hard_slice_loss else None,
            is_production=measured.built.is_production, untimed_because=measured.untimed_because)
    if measured.error or not (measured.quality and measured.speed and measured.cost):
        return Candidate(name=measured.built.name, recipe=measured.built.recipe, error=measured.error or "not measured",
                         is_production=measured.built.is_production)
    return Candidate(
        name=measured.built.name, recipe=measured.built.recipe, accuracy=measured.quality.accuracy,
        hard_slice_accuracy=measured.quality.hard_slice_accuracy, latency_p95_ms=measured.speed.latency_p95_ms,
        throughput_per_s=measured.speed.throughput_per_s, throughput_low_per_s=measured.speed.throughput_low_per_s,
        throughput_high_per_s=measured.speed.throughput_high_per_s, monthly_cost_usd=measured.cost.monthly_cost_usd,
        size_mb=measured.speed.size_mb, throughput_rounds=measured.speed.throughput_rounds, correct_rows=correct_rows,
        accuracy_loss_high=measured.accuracy_loss.high if measured.accuracy_loss else None,
        hard_slice_loss_high=measured.hard_slice_loss.high if measured.hard_slice_loss else None,
        is_production=measured.built.is_production,
        accuracy_gain_vs_production_low=(measured.accuracy_gain_vs_production.low
                                         if measured.accuracy_gain_vs_production else None),
    )


def passes_quality(m: MeasuredCandidate, reference: Reference, bar: QualityBar) -> bool:
    """Whether a scored candidate meets the quality bar (latency is judged after timing, so not here).

    A candidate that failed, was screened out or deferred, or was not scored, does not pass.
    """
    if m.error or m.quality is None:
        return False
    quality = QualityReference(reference.quality.accuracy, reference.quality.hard_slice_accuracy)
    scored = Candidate(name=m.built.name, recipe=m.built.recipe, accuracy=m.quality.accuracy,
                       hard_slice_accuracy=m.quality.hard_slice_accuracy,
                       accuracy_loss_high=m.accuracy_loss.high if m.accuracy_loss else None,
                       hard_slice_loss_high=m.hard_slice_loss.high if m.hard_slice_loss else None)
    return judge(scored, quality, bar.model_copy(update={"max_p95_latency_ms": None})).passed_bar


def speed_screening_record(screen: SpeedScreen | None, measured: list[MeasuredCandidate],
                           evaluate: EvaluateSettings) -> dict:
    """decision.json "screening.speed": the test, its knobs, the per-round rates, each deferred candidate
    (against whom, the ratio bound) and whether it was brought back."""
    knobs = evaluate.speed_screening
    return {"enabled": bool(screen and screen.enabled), "skipped_because": screen.skipped_because if screen else "",
            "test": SPEED_TEST, "alpha": knobs.alpha, "margin": knobs.margin, "rounds": knobs.rounds,
            "batches_per_round": knobs.batches, "seconds": round(screen.seconds, 2) if screen else 0.0,
            "rates_per_round": screen.rates if screen else {},
            "deferred": {m.built.name: m.speed_screening.as_dict() for m in measured if m.speed_screening},
            "brought_back": [m.built.name for m in measured if m.speed_screening and m.speed_screening.brought_back]}


def screening_record(measured: list[MeasuredCandidate], evaluate: EvaluateSettings,
                     speed: SpeedScreen | None = None) -> dict:
    """decision.json "screening": the test and its error rate, each screened-out candidate with its reason,
    rows used and bound, the speed screen's deferrals, and how many full evaluations the run made
    against the number of candidates."""
    screened = {m.built.name: {"reason": m.screening.reason, "test": m.screening.test, "rows_used": m.screening.rows_used,
                               "rows_total": m.screening.rows_total, "bound": m.screening.bound,
                               "limit": m.screening.limit, "level": m.screening.level}
                for m in measured if m.screened_out}
    return {"enabled": evaluate.screening.enabled, "alpha": evaluate.screening.alpha,
            "first_rows": evaluate.screening.first_rows,
            "test": "Chernoff (KL) lower bound on the per-row loss vs FP32 over all selection rows, Bonferroni over "
                    "looks and tests (tasks/measure/screening.py)",
            "candidates": len(measured), "full_evaluations": sum(1 for m in measured if m.quality is not None),
            "timed_in_full": sum(1 for m in measured if m.speed is not None),
            "rows_scored": sum(m.rows_scored for m in measured),
            "scores_reused": sorted(m.built.name for m in measured if m.scores_reused),
            "screened_out": screened,
            "speed_screened_out": sorted(m.built.name for m in measured if m.deferred),
            "speed": speed_screening_record(speed, measured, evaluate)}


def log_screening(measured: list[MeasuredCandidate]) -> None:
    """One log line per screened-out candidate, and what scoring cost in rows."""
    for m in measured:
        if m.screened_out:
            log.info("%s: %s", m.built.name, m.screening.reason)
    log.info("scored %d rows with ONNX Runtime for %d candidates (%d reused stored scores, %d screened out, "
             "%d deferred by the speed screen)", sum(m.rows_scored for m in measured), len(measured),
             sum(m.scores_reused for m in measured), sum(m.screened_out for m in measured),
             sum(m.deferred for m in measured))
