"""The requantize flow: data -> source model -> candidates in parallel -> measure -> select -> promote.

This module only wires: the work is in `tasks/`, the MLflow calls in `tasks.tracking`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks import data_version, validation
from tasks.benchmark import cpu_info
from tasks.candidates import BuiltCandidate, MeasuredCandidate, build_candidate, measure_candidate
from tasks.data_prep import LABEL
from tasks.reference import Reference, prepare_reference
from tasks.report import candidate_rows, render_decision, render_table
from tasks.selection import Decision, Reference as QualityReference, select
from tasks.settings import Settings, load_settings
from tasks import tracking
from tasks.tracking import Tracker

log = logging.getLogger("requant")


@dataclass
class RunSummary:
    """What a requantize run did, for the CLI, the benchmark script and tests."""

    outcome: str  # promoted | kept-production | no-candidate-passed | already-decided
    decision_key: str
    parent_run_id: str | None = None
    winner: str | None = None
    promoted_version: str | None = None
    table: str = ""
    decision: dict = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)


class PhaseClock:
    """Wall time per phase, so later work can see where a run spends it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        log.info("%s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def decision_key(source_digest: str, data: data_version.DataVersion, settings: Settings) -> str:
    """Identity of a decision: same source model, data and params -> same key -> nothing changes."""
    knobs = {name: getattr(settings, name).model_dump(mode="json")
             for name in ("quantize", "evaluate", "cost", "quality_bar")}
    knobs["max_length"] = settings.model.max_length
    knobs["serving_model"] = settings.registry.serving_model_name
    payload = json.dumps({"source": source_digest, "data": data.version, "knobs": knobs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


# Tasks: thin Prefect edges over tasks/. Inputs hold numpy arrays and models, so Prefect must not
# try to hash them for caching; content-addressed folders give the reuse instead.
prepare_data = task(data_version.reproduce, name="prepare-data", cache_policy=NO_CACHE)
validate_data = task(validation.validate_prepared, name="validate-data", cache_policy=NO_CACHE)
build_reference = task(prepare_reference, name="fp32-reference", cache_policy=NO_CACHE)
build = task(build_candidate, name="quantize", cache_policy=NO_CACHE)
measure = task(measure_candidate, name="evaluate", cache_policy=NO_CACHE)


@flow(name="requantize", log_prints=False)
def requantize(params_path: str = "params.yaml", model_uri: str | None = None, project_dir: str | None = None,
               force: bool = False, work_dir: str | None = None) -> RunSummary:
    """Requantize a model version at every configured precision and promote the cheapest that meets the bar.

    Args:
        params_path: params.yaml to read.
        model_uri: model to requantize (models:/NAME/VERSION, models:/NAME@ALIAS or a folder);
            default: model.source_uri from params.yaml.
        project_dir: the DVC project holding dvc.yaml; default: the folder of params_path.
        force: decide again even if this (model, data, params) was already decided.
        work_dir: where exported graphs and candidates are built (content-addressed, reused
            across runs); default: PROJECT/models/work.
    """
    clock = PhaseClock()
    with clock.phase("setup"):
        settings = load_settings(params_path)
        project = Path(project_dir or Path(params_path).resolve().parent).resolve()
        work_dir = Path(work_dir) if work_dir else project / "models" / "work"
        tracker = Tracker(settings.registry)
        host = cpu_info()
        profile = settings.cost.host_profile(host["cpu_model"])

    # The parent run opens before anything can fail, so every failure is a FAILED run with its reason.
    with tracker.parent_run("requantize", {"requant.hardware_profile": profile.name,
                                           **{f"host.{k}": v for k, v in host.items()}}) as parent_id:
        with clock.phase("setup"):
            source = tracker.fetch_source(model_uri or settings.model.source_uri, project / "models" / "source")
        with clock.phase("data"):
            data = prepare_data(project, settings.data.output_dir)
            calibration = pd.read_csv(data.calibration_path, dtype=str, keep_default_na=False)
            evaluation = pd.read_csv(data.evaluation_path, dtype=str, keep_default_na=False)

        key = decision_key(source.digest, data, settings)
        tracker.set_tags(parent_id, {
            "mlflow.runName": f"requantize-{source.name or Path(source.uri).name}-v{source.version or 'local'}",
            tracking.TAG_SOURCE_URI: source.uri, tracking.TAG_SOURCE_VERSION: str(source.version or ""),
            tracking.TAG_SOURCE_DIGEST: source.digest, tracking.TAG_DATA_VERSION: data.version,
        })
        previous = None if force else tracker.previous_decision(key)
        if previous:
            log.info("already decided in run %s (%s); nothing changes", previous["run_id"], previous.get(tracking.TAG_OUTCOME))
            tracker.set_tags(parent_id, {tracking.TAG_OUTCOME: "already-decided", "requant.decided_in": previous["run_id"]})
            return RunSummary(outcome="already-decided", decision_key=key, parent_run_id=previous["run_id"],
                              phases=clock.seconds)

        tracker.log_params(parent_id, {
            "source_uri": source.uri, "data_version": data.version, "calibration_md5": data.calibration_md5,
            "evaluation_md5": data.evaluation_md5, "hardware_profile": profile.name,
            "usd_per_hour": profile.usd_per_hour, **_flat("bar", settings.quality_bar.model_dump()),
            **_flat("traffic", settings.cost.traffic.model_dump()), **_flat("evaluate", settings.evaluate.model_dump()),
            "candidates": ",".join(c.name for c in settings.quantize.candidates),
        })
        with clock.phase("data"):
            from tasks.model_io import read_model_card

            reports = validate_data(calibration, evaluation, read_model_card(source.folder).labels, settings.data)
            tracker.log_dict(parent_id, {"reports": [r.as_dict() for r in reports]}, "data_validation.json")

        with clock.phase("evaluate"):
            reference = build_reference(source.folder, evaluation, calibration, work_dir, settings.model,
                                        settings.evaluate, settings.quantize.calibration_batch_size)

        with clock.phase("quantize"):
            built = _build_all(settings, reference, source.digest, work_dir)

        with clock.phase("evaluate"):
            # One at a time: concurrent benchmarks on 2 cores measure each other (onnxruntime#10273).
            measured = []
            for candidate in built:
                log.info("evaluating %s", candidate.name)
                measured.append(measure(candidate, reference, settings.evaluate, profile, settings.cost.traffic))

        with clock.phase("select"):
            production = tracker.production()
            decision = select([m.for_selection() for m in measured],
                              QualityReference(reference.quality.accuracy, reference.quality.hard_slice_accuracy),
                              settings.quality_bar, production[1] if production else None)

        with clock.phase("track"):
            model_uris = _log_candidates(tracker, parent_id, measured, reference, evaluation, data, key)
            tracker.log_metrics(parent_id, {f"fp32_reference_{k}": v for k, v in reference.quality.as_dict().items()})

        promoted_version = None
        with clock.phase("select"):
            if decision.promote:
                winner = next(m for m in measured if m.built.name == decision.winner)
                promoted_version = tracker.promote(model_uris[winner.built.name], _version_tags(
                    winner, key, source, data, decision), project / ".requant")
            outcome = ("promoted" if decision.promote else
                       "kept-production" if decision.winner else "no-candidate-passed")

        table = render_table(candidate_rows(measured, decision))
        record = {**decision.as_dict(), "outcome": outcome, "promoted_version": promoted_version,
                  "decision_key": key, "serving_model": settings.registry.serving_model_name,
                  "hardware_profile": profile.name, "host": host,
                  "candidates": {m.built.name: {"recipe": m.built.recipe, "config_hash": m.built.config_hash,
                                                "config": m.built.config, "error": m.error,
                                                **m.metrics(reference.quality.accuracy)} for m in measured}}
        tracker.log_dict(parent_id, record, tracking.DECISION_FILE)
        tracker.log_metrics(parent_id, {f"phase_{k}_seconds": v for k, v in clock.seconds.items()})
        tracker.set_tags(parent_id, {tracking.TAG_KEY: key, tracking.TAG_OUTCOME: outcome,
                                     "requant.winner": decision.winner or ""})
        tracker.client.log_text(parent_id, table + "\n\n" + render_decision(decision), "report.txt")

    return RunSummary(outcome=outcome, decision_key=key, parent_run_id=parent_id, winner=decision.winner,
                      promoted_version=promoted_version, table=table, decision=record, phases=clock.seconds)


def _build_all(settings: Settings, reference: Reference, source_digest: str, work_dir: Path) -> list[BuiltCandidate]:
    """Quantize candidates in parallel, at most quantize.max_parallel at once (memory-bound)."""
    specs, built = settings.quantize.candidates, []
    step = settings.quantize.max_parallel
    for start in range(0, len(specs), step):
        futures = [build.submit(spec, reference, source_digest, work_dir) for spec in specs[start:start + step]]
        built += [f.result() for f in futures]
    for b in built:
        if b.error:
            log.warning("candidate %s failed to build: %s", b.name, b.error)
    return built


def _log_candidates(tracker: Tracker, parent_id: str, measured: list[MeasuredCandidate], reference: Reference,
                    evaluation: pd.DataFrame, data: data_version.DataVersion, key: str) -> dict[str, str]:
    """One nested run per candidate: params, the same metric names, the model, the evaluation input."""
    uris = {}
    for m in measured:
        b = m.built
        run_id = tracker.candidate_run(parent_id, b.name, {
            tracking.TAG_RECIPE: b.recipe, tracking.TAG_CANDIDATE: b.name, tracking.TAG_CONFIG_HASH: b.config_hash,
            tracking.TAG_DATA_VERSION: data.version, "requant.precision": b.precision, "requant.parent_key": key,
            **({tracking.TAG_FAILURE: m.error} if m.error else {}),
        })
        tracker.log_params(run_id, {"recipe": b.recipe, "precision": b.precision, "config_hash": b.config_hash,
                                    **_flat("config", b.config)})
        tracker.log_metrics(run_id, m.metrics(reference.quality.accuracy))
        tracker.log_evaluation_input(run_id, evaluation[[LABEL]].assign(text=evaluation["text"]),
                                     source=str(data.evaluation_path), name="evaluation", digest=data.evaluation_md5)
        if b.model_path and not m.error:
            uris[b.name] = tracker.log_onnx_model(run_id, b.model_path, len(reference.card.labels))
        tracker.finish(run_id, failed=bool(m.error))
    return uris


def _version_tags(winner: MeasuredCandidate, key: str, source, data, decision: Decision) -> dict[str, str]:
    return {
        tracking.TAG_KEY: key, tracking.TAG_SOURCE_URI: source.uri, tracking.TAG_SOURCE_VERSION: str(source.version or ""),
        tracking.TAG_SOURCE_DIGEST: source.digest, tracking.TAG_RECIPE: winner.built.recipe,
        tracking.TAG_CANDIDATE: winner.built.name, tracking.TAG_CONFIG_HASH: winner.built.config_hash,
        tracking.TAG_DATA_VERSION: data.version, tracking.TAG_ACCURACY: f"{winner.quality.accuracy:.6f}",
        tracking.TAG_MONTHLY_COST: f"{winner.cost.monthly_cost_usd:.2f}",
    }


def _flat(prefix: str, values: dict) -> dict[str, object]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


if __name__ == "__main__":
    print(requantize().table)
