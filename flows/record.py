"""The flow's MLflow record: nested candidate runs, the sensitivity ranking, the Pareto view.

Thin helpers over the adapter (tasks.tracking) that know requant's domain objects.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tasks import data_version, tracking
from tasks.candidates import MeasuredCandidate
from tasks.data_prep import LABEL, TEXT
from tasks.pareto import Point, frontier_table, plot_frontier
from tasks.reference import Reference
from tasks.selection import Decision
from tasks.sensitivity import GroupSensitivity, plot_ranking
from tasks.settings import Settings
from tasks.tracking import Tracker


def flat(prefix: str, values: dict) -> dict[str, object]:
    """{"a": 1} -> {"prefix.a": 1}, for MLflow params."""
    return {f"{prefix}.{k}": v for k, v in values.items()}


def log_sensitivity(tracker: Tracker, parent_id: str, ranking: list[GroupSensitivity], work_dir: Path) -> None:
    """The ranking as JSON and as a bar chart on the parent run."""
    tracker.log_dict(parent_id, {"ranking": [g.as_dict() for g in ranking]}, "sensitivity.json")
    plot = plot_ranking(ranking, work_dir / "sensitivity.png")
    tracker.client.log_artifact(parent_id, str(plot))


def log_pareto(tracker: Tracker, parent_id: str, measured: list[MeasuredCandidate], decision: Decision,
                settings: Settings, reference: Reference, work_dir: Path) -> None:
    """Cost against accuracy for every measured candidate: a table and a plot with the frontier."""
    points = [Point(m.built.name, m.cost.monthly_cost_usd, m.quality.accuracy, decision.verdicts[m.built.name].passed_bar)
              for m in measured if m.cost and m.quality]
    if not points:
        return
    tracker.log_dict(parent_id, {"points": frontier_table(points, decision.winner)}, "pareto.json")
    floor = reference.quality.accuracy * (1 - settings.quality_bar.max_relative_accuracy_loss)
    if settings.quality_bar.min_accuracy is not None:
        floor = max(floor, settings.quality_bar.min_accuracy)
    tracker.client.log_artifact(parent_id, str(plot_frontier(points, decision.winner, floor, work_dir / "pareto.png")))


def log_candidates(tracker: Tracker, parent_id: str, measured: list[MeasuredCandidate], reference: Reference,
                    evaluation: pd.DataFrame, data: data_version.DataVersion, key: str, decision: Decision) -> dict[str, str]:
    """One nested run per candidate: params, the same metric names, its verdict, the model, the evaluation input."""
    uris = {}
    for m in measured:
        b = m.built
        verdict = decision.verdicts.get(b.name)
        status = "winner" if b.name == decision.winner else ("pass" if verdict and verdict.passed_bar else "fail")
        run_id = tracker.candidate_run(parent_id, b.name, {
            tracking.TAG_RECIPE: b.recipe, tracking.TAG_CANDIDATE: b.name, tracking.TAG_CONFIG_HASH: b.config_hash,
            tracking.TAG_DATA_VERSION: data.version, "requant.precision": b.precision, "requant.parent_key": key,
            "requant.verdict": status, "requant.reason": verdict.reason if verdict else "",
            "requant.is_production": str(b.is_production).lower(),
            **({tracking.TAG_FAILURE: m.error} if m.error else {}),
        })
        tracker.log_params(run_id, {"recipe": b.recipe, "precision": b.precision, "config_hash": b.config_hash,
                                    **flat("config", b.config)})
        tracker.log_metrics(run_id, {**m.metrics(reference), "passed_bar": float(bool(verdict and verdict.passed_bar)),
                                     "is_winner": float(b.name == decision.winner)})
        tracker.log_evaluation_input(run_id, evaluation[[TEXT, LABEL]],
                                     source=str(data.evaluation_path), name="evaluation", digest=data.evaluation_md5)
        # The production copy is already registered; logging its graph again would only duplicate it.
        if b.model_path and not m.error and not b.is_production:
            uris[b.name] = (tracker.log_serving_model(run_id, b.model_path, reference.serving) if reference.serving
                            else tracker.log_onnx_model(run_id, b.model_path, len(reference.card.labels)))
        tracker.finish(run_id, failed=bool(m.error))
    return uris
