"""The flow's MLflow record: nested candidate runs, the sensitivity ranking, the Pareto view.

Thin helpers over the adapter (tasks.track) that know requant's domain objects.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd

from tasks import track
from tasks.build.reference import Reference
from tasks.config.settings import Settings
from tasks.data import version as data_version
from tasks.data.prepare import LABEL, TEXT
from tasks.data.validate import data_docs_site
from tasks.decide.cost_analysis import CostAnalysis
from tasks.decide.pareto import Point, failure_word, frontier_table, plot_frontier
from tasks.decide.report import candidate_markdown, short_names, verdict_word
from tasks.decide.selection import Decision
from tasks.evaluate.candidates import MeasuredCandidate
from tasks.measure.sensitivity import GroupSensitivity, plot_ranking
from tasks.track import Tracker


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
    points = [Point(m.built.name, m.cost.monthly_cost_usd, m.quality.accuracy, decision.verdicts[m.built.name].passed_bar,
                    failure_word(decision.verdicts[m.built.name].reason), m.built.is_production)
              for m in measured if m.cost and m.quality]
    if not points:
        return
    tracker.log_dict(parent_id, {"points": frontier_table(points, decision.winner)}, "pareto.json")
    floor = reference.quality.accuracy * (1 - settings.quality_bar.max_relative_accuracy_loss)
    if settings.quality_bar.min_accuracy is not None:
        floor = max(floor, settings.quality_bar.min_accuracy)
    tracker.client.log_artifact(parent_id, str(plot_frontier(points, decision.winner, floor, work_dir / "pareto.png")))


def log_candidates(tracker: Tracker, parent_id: str, measured: list[MeasuredCandidate], reference: Reference,
                   evaluation: pd.DataFrame, calibration: pd.DataFrame, data: data_version.DataVersion, key: str,
                   decision: Decision) -> dict[str, str]:
    """One nested run per candidate: a short name, its verdict and why (tags, metrics, description), its
    params, the same metric names (quality linked to the evaluation set), its model and inputs.

    Each run spans the candidate's own work (build start to last measurement), so its duration in
    the UI is true even though it is logged after the decision.
    """
    uris = {}
    names = short_names([m.built.name for m in measured])
    view = share_candidates_view(tracker, parent_id)
    tracker.set_tags(parent_id, {TAG_CANDIDATES_VIEW: view})
    for m in measured:
        b = m.built
        verdict = decision.verdicts.get(b.name)
        status = verdict_word(m, decision)
        run_id = tracker.candidate_run(parent_id, names[b.name], {
            track.TAG_RECIPE: b.recipe, track.TAG_CANDIDATE: b.name, track.TAG_CONFIG_HASH: b.config_hash,
            track.TAG_DATA_VERSION: data.version, "requant.precision": b.precision, "requant.parent_key": key,
            "requant.verdict": status, "requant.reason": verdict.reason if verdict else "",
            "requant.is_production": str(b.is_production).lower(),
            **({"requant.priced_from": m.served_price.describe()} if m.served_price else {}),
            **({track.TAG_FAILURE: m.error} if m.error else {}),
        }, start_time_ms=b.started_at_ms or None)
        tracker.describe_run(run_id, candidate_markdown(m, decision)
                             + f"\n\nAll candidates of this decision, cheapest first: [verdict, cost, accuracy]({view}).")
        # MLflow's compare view opens on the first three params that differ, sorted by name: precision,
        # recipe, then the recipe's knobs (recipe.*). The config hash is the tag requant.config_hash.
        tracker.log_params(run_id, {"precision": b.precision, "recipe": b.recipe, **flat("recipe", b.config)})
        metrics = {**m.metrics(reference), "passed_bar": float(bool(verdict and verdict.passed_bar)),
                   "is_winner": float(b.name == decision.winner)}
        # The decision's figures are logged first: MLflow's compare view plots the first metric that
        # every compared run has (in logged order), and cost, then accuracy, is what decided.
        ordered = _decision_first(metrics)
        cost = {k: v for k, v in ordered.items() if k == "monthly_cost_usd"}
        quality = {k: v for k, v in ordered.items() if k in QUALITY_METRICS}
        tracker.log_metrics(run_id, cost)
        tracker.log_metrics(run_id, quality, dataset=("evaluation", data.evaluation_md5[:36]))
        tracker.log_metrics(run_id, {k: v for k, v in ordered.items() if k not in cost and k not in quality})
        tracker.log_evaluation_input(run_id, evaluation[[TEXT, LABEL]],
                                     source=str(data.evaluation_path), name="evaluation", digest=data.evaluation_md5)
        tracker.log_evaluation_input(run_id, calibration[[TEXT, LABEL]], source=str(data.calibration_path),
                                     name="calibration", digest=data.calibration_md5, context="calibration")
        # Only a candidate that passes the bar can be promoted, so only it is logged as a model (a second
        # copy of each graph costs the run time and the store space; the others keep their metrics,
        # reason and graph sha256). The production copy is already registered: not logged again.
        if b.model_path and not m.error and not b.is_production and verdict and verdict.passed_bar:
            uris[b.name] = (tracker.log_serving_model(run_id, b.model_path, reference.serving, names[b.name])
                            if reference.serving else
                            tracker.log_onnx_model(run_id, b.model_path, len(reference.card.labels), names[b.name]))
        tracker.finish(run_id, failed=bool(m.error), end_time_ms=m.finished_at_ms or None)
    return uris


# The figures that decide, in the order a reviewer reads them; the other metrics follow.
DECISION_METRICS = ("monthly_cost_usd", "accuracy", "relative_accuracy_loss", "passed_bar", "is_winner")
# A parent-run tag: the link to the runs table of its candidates with the decision's columns.
TAG_CANDIDATES_VIEW = "requant.candidates_view"
# Those columns, as MLflow's runs table names them (type.`key`).
CANDIDATE_COLUMNS = ("tags.`requant.verdict`", "metrics.`monthly_cost_usd`", "metrics.`accuracy`",
                     "metrics.`relative_accuracy_loss`", "tags.`requant.reason`")
SHARED_VIEW_TAG = "mlflow.sharedViewState."


def _decision_first(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` with DECISION_METRICS first, in that order."""
    return {**{k: metrics[k] for k in DECISION_METRICS if k in metrics}, **metrics}


def candidates_view_state(parent_id: str) -> dict:
    """The runs-table view of one decision: its candidate runs, cheapest first, with verdict, monthly
    cost, accuracy, loss and reason as columns (the table shows none of them by default)."""
    # Candidate runs carry a verdict; the decision's other nested runs (QAT attempts) do not.
    return {"searchFilter": f"tags.mlflow.parentRunId = '{parent_id}' and tags.`requant.verdict` != ''",
            "orderByKey": "metrics.`monthly_cost_usd`", "orderByAsc": True,
            "selectedColumns": list(CANDIDATE_COLUMNS)}


def share_candidates_view(tracker: Tracker, parent_id: str) -> str:
    """Save the decision's candidates view in the experiment and return the link that opens it.

    MLflow's UI opens `#/experiments/<id>/runs?viewStateShareKey=<key>` with the view stored in the
    experiment tag `mlflow.sharedViewState.<key>` (what its own Share button writes); a UI that cannot
    read it opens the plain runs table.
    """
    import json

    experiment = tracker.client.get_run(parent_id).info.experiment_id
    key = f"requant-candidates-{parent_id}"
    tracker.client.set_experiment_tag(experiment, SHARED_VIEW_TAG + key, json.dumps(candidates_view_state(parent_id)))
    path = f"#/experiments/{experiment}/runs?viewStateShareKey={key}"
    return f"{tracker.uri.rstrip('/')}/{path}" if tracker.uri.startswith(("http://", "https://")) else path


# Metrics measured on the evaluation rows: linked to that data set in the UI.
QUALITY_METRICS = {"accuracy", "macro_f1", "agreement_with_fp32", "hard_slice_accuracy", "relative_accuracy_loss",
                   "relative_accuracy_loss_low", "relative_accuracy_loss_high", "hard_slice_relative_loss",
                   "hard_slice_relative_loss_low", "hard_slice_relative_loss_high", "confirmation_accuracy",
                   "confirmation_hard_slice_accuracy", "confirmation_relative_accuracy_loss_high",
                   "accuracy_gain_vs_production_low"}


def log_qat(tracker: Tracker, parent_id: str, escalation, labels: list[str], key: str) -> None:
    """One nested run per quantization-aware fine-tuning attempt: its knobs, training curve (step
    metrics), stop reason, and the exact training rows (so anyone can check they exclude the evaluation rows)."""
    for attempt in escalation.attempts:
        run_id = tracker.candidate_run(parent_id, f"qat-attempt-{attempt.target}", {
            "requant.qat_attempt": "true", "requant.qat_target": attempt.target, "requant.parent_key": key,
            "requant.qat_stop_reason": attempt.stop_reason[:500], "requant.qat_reason": escalation.reason[:500],
            **({track.TAG_FAILURE: attempt.error} if attempt.error else {}),
        }, start_time_ms=attempt.started_at_ms or None)
        tracker.log_params(run_id, {"recipe": attempt.recipe, "scheme": attempt.scheme, **flat("config", attempt.config),
                                    **flat("qat", escalation.settings)})
        tracker.log_curve(run_id, "qat_train_loss", attempt.loss_curve, attempt.curve_steps)
        tracker.log_metrics(run_id, {"qat_steps": attempt.steps, "qat_train_seconds": attempt.train_seconds,
                                     "qat_seconds": attempt.seconds, "qat_training_rows": attempt.training_rows,
                                     "qat_training_rows_dropped": attempt.training_rows_dropped})
        if escalation.training is not None:
            tracker.client.log_text(run_id, escalation.training.frame(labels).to_csv(index=False), "qat_training_rows.csv")
        tracker.finish(run_id, failed=bool(attempt.error), end_time_ms=attempt.finished_at_ms or None)


def log_data_inputs(tracker: Tracker, parent_id: str, data: data_version.DataVersion, calibration: pd.DataFrame,
                    evaluation: pd.DataFrame) -> None:
    """The calibration and evaluation sets as logged inputs of the parent run (lineage to the DVC data)."""
    tracker.log_evaluation_input(parent_id, evaluation[[TEXT, LABEL]], source=str(data.evaluation_path),
                                 name="evaluation", digest=data.evaluation_md5)
    tracker.log_evaluation_input(parent_id, calibration[[TEXT, LABEL]], source=str(data.calibration_path),
                                 name="calibration", digest=data.calibration_md5, context="calibration")


@contextmanager
def data_docs(tracker: Tracker, parent_id: str) -> Iterator[Path]:
    """A fresh folder for Great Expectations; its Data Docs site is logged as `data_docs/` on the way out,
    also when validation failed (that is when a reader needs it most)."""
    folder = Path(tempfile.mkdtemp(prefix="requant-gx-"))
    try:
        yield folder
    finally:
        site = data_docs_site(folder)
        if site.is_dir():
            tracker.client.log_artifacts(parent_id, str(site), "data_docs")
        shutil.rmtree(folder, ignore_errors=True)


def version_markdown(tracker: Tracker, parent_id: str, decision: Decision, analysis: CostAnalysis) -> str:
    """A promoted version's description: why it was chosen, what it saves, a link to its decision."""
    savings = (f"${analysis.savings_vs_production_monthly_usd:,.2f}/month vs production"
               if analysis.savings_vs_production_monthly_usd is not None else
               f"${analysis.savings_vs_fp32_monthly_usd:,.2f}/month vs FP32"
               if analysis.savings_vs_fp32_monthly_usd is not None else "no baseline to compare")
    return (f"{decision.summary}\n\nSavings: {savings}.\n\n"
            f"Decision: [requantize run {parent_id}]({tracker.run_link(parent_id)}) (decision.json, report.txt).")


def serving_model_markdown(tracker: Tracker, parent_id: str, source, decision: Decision, version: str,
                           settings: Settings, alias: str | None = None) -> str:
    """The serving model's description: what it holds and the decision behind the alias just moved."""
    return (f"Quantized versions of `{source.uri}` chosen by requant: the cheapest configuration that meets the "
            f"quality bar on measured throughput.\n\n`@{alias or settings.registry.production_alias}` -> version {version}: "
            f"{decision.summary}\n\nDecision: [requantize run {parent_id}]({tracker.run_link(parent_id)}).")
