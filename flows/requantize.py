"""The requantize flow: data -> source model -> candidates in parallel -> measure -> select -> promote.

This module only wires: the work is in `tasks/`, the MLflow calls in `tasks.tracking`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import record
from tasks import data_version, interrupts, tracking, validation
from tasks.benchmark import cpu_info
from tasks.candidates import (
    BuiltCandidate,
    MeasuredCandidate,
    build_candidate,
    measure_candidate,
)
from tasks.locking import exclusive
from tasks.mixed_search import MixedSearchResult, search_kept_fp32
from tasks.recipes.base import config_hash, parse_config
from tasks.reference import Reference, prepare_reference
from tasks.report import candidate_rows, render_decision, render_table
from tasks.search import Budget
from tasks.search_space import expand_all
from tasks.selection import Reference as QualityReference
from tasks.selection import judge, select
from tasks.sensitivity import GroupSensitivity, cached_ranking, first_rows, rank_groups
from tasks.settings import CandidateSpec, Settings, load_settings
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
    report: str = ""  # the table, then the decision and why each other candidate lost
    decision: dict = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)


class PhaseClock:
    """Wall time per phase, so later work can see where a run spends it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        interrupts.enter_phase(name)  # stops here if a signal came and its first raise was swallowed
        log.info("%s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def decision_key(source_digest: str, data: data_version.DataVersion, settings: Settings) -> str:
    """Identity of a decision: same source model, data and params -> same key -> nothing changes."""
    knobs = {name: getattr(settings, name).model_dump(mode="json")
             for name in ("quantize", "evaluate", "cost", "quality_bar", "search")}
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
    # Prefect installed its SIGTERM handler for this flow run: chain ours in front of it, so the
    # phase is recorded and the run ends KILLED with the reason (tasks/interrupts.py).
    interrupts.install()
    clock = PhaseClock()
    with clock.phase("setup"):
        settings = load_settings(params_path)
        project = Path(project_dir or Path(params_path).resolve().parent).resolve()
        work_dir = Path(work_dir) if work_dir else project / "models" / "work"
        tracker = Tracker(settings.registry)
        host = cpu_info()
        profile = settings.cost.host_profile(host["cpu_model"])

    # The parent run opens before anything can fail, so every failure is a FAILED run with its reason.
    # `held` is entered first so that its lock is released only after the run is marked FINISHED.
    with ExitStack() as held, tracker.parent_run("requantize", {"requant.hardware_profile": profile.name,
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
        # At most one requantization per source model at a time (a nightly run and a triggered run
        # can collide): the second waits here, then finds the first one's decision and stops.
        with clock.phase("setup"):
            held.enter_context(exclusive(project / ".requant", f"requantize-{source.name or source.digest[:16]}",
                                         timeout_s=settings.operations.lock_timeout_minutes * 60))
        previous = None if force else tracker.previous_decision(key)
        if previous:
            log.info("already decided in run %s (%s); nothing changes", previous["run_id"], previous.get(tracking.TAG_OUTCOME))
            tracker.set_tags(parent_id, {tracking.TAG_OUTCOME: "already-decided", "requant.decided_in": previous["run_id"]})
            return RunSummary(outcome="already-decided", decision_key=key, parent_run_id=previous["run_id"],
                              phases=clock.seconds)

        tracker.log_params(parent_id, {
            "source_uri": source.uri, "data_version": data.version, "calibration_md5": data.calibration_md5,
            "evaluation_md5": data.evaluation_md5, "hardware_profile": profile.name,
            "usd_per_hour": profile.usd_per_hour, **record.flat("bar", settings.quality_bar.model_dump()),
            **record.flat("traffic", settings.cost.traffic.model_dump()),
            **record.flat("evaluate", settings.evaluate.model_dump()),
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
                measured.append(measure(candidate, reference, settings.evaluate, profile, settings.cost.traffic,
                                        settings.quality_bar))

        search_record = None
        if settings.search.enabled:
            with clock.phase("search"):
                ranking = rank(reference, settings, source.digest, work_dir)
                searched = _search_mixed(ranking, reference, measured, settings, profile, source.digest, work_dir)
                search_record = searched.record
                known = {id(m) for m in measured}
                measured += [m for m in searched.measured if id(m) not in known]
                record.log_sensitivity(tracker, parent_id, ranking, work_dir)

        with clock.phase("select"):
            production = tracker.production()
            decision = select([m.for_selection() for m in measured],
                              QualityReference(reference.quality.accuracy, reference.quality.hard_slice_accuracy),
                              settings.quality_bar, production[1] if production else None)

        with clock.phase("track"):
            model_uris = record.log_candidates(tracker, parent_id, measured, reference, evaluation, data, key)
            tracker.log_metrics(parent_id, {f"fp32_reference_{k}": v for k, v in reference.quality.as_dict().items()})
            record.log_pareto(tracker, parent_id, measured, decision, settings, reference, work_dir)

        promoted_version = None
        with clock.phase("select"):
            if decision.promote:
                winner = next(m for m in measured if m.built.name == decision.winner)
                promoted_version = tracker.promote(model_uris[winner.built.name], _version_tags(
                    winner, key, source, data), project / ".requant")
            outcome = ("promoted" if decision.promote else
                       "kept-production" if decision.winner else "no-candidate-passed")

        table = render_table(candidate_rows(measured, decision))
        decided = {**decision.as_dict(), "outcome": outcome, "promoted_version": promoted_version,
                   "decision_key": key, "serving_model": settings.registry.serving_model_name,
                   "hardware_profile": profile.name, "host": host, "search": search_record, "flow_pid": os.getpid(),
                   "candidates": {m.built.name: {"recipe": m.built.recipe, "config_hash": m.built.config_hash,
                                                 "built_by": m.built.built_by, "config": m.built.config, "error": m.error,
                                                 **m.metrics(reference.quality.accuracy)} for m in measured}}
        tracker.log_dict(parent_id, decided, tracking.DECISION_FILE)
        tracker.log_metrics(parent_id, {f"phase_{k}_seconds": v for k, v in clock.seconds.items()})
        tracker.set_tags(parent_id, {tracking.TAG_KEY: key, tracking.TAG_OUTCOME: outcome,
                                     "requant.winner": decision.winner or ""})
        report = table + "\n\n" + render_decision(decision)
        tracker.client.log_text(parent_id, report, "report.txt")

    return RunSummary(outcome=outcome, decision_key=key, parent_run_id=parent_id, winner=decision.winner,
                      promoted_version=promoted_version, table=table, report=report, decision=decided,
                      phases=clock.seconds)


def _build_all(settings: Settings, reference: Reference, source_digest: str, work_dir: Path) -> list[BuiltCandidate]:
    """Quantize candidates in parallel, at most quantize.max_parallel at once (memory-bound)."""
    specs, built = expand_all(settings.quantize.candidates), []
    step = settings.quantize.max_parallel
    for start in range(0, len(specs), step):
        futures = [build.submit(spec, reference, source_digest, work_dir) for spec in specs[start:start + step]]
        built += [f.result() for f in futures]
    for b in built:
        if b.error:
            log.warning("candidate %s failed to build: %s", b.name, b.error)
    return built


@task(name="sensitivity", cache_policy=NO_CACHE)
def rank(reference: Reference, settings: Settings, source_digest: str, work_dir: Path) -> list[GroupSensitivity]:
    """Rank weight groups by sensitivity; cached per source model and settings (it is slow)."""
    base = parse_config("int8-dynamic", settings.search.base_config, "search.base_config")
    graph = reference.inputs.optimized_model if base.graph == "optimized" else reference.inputs.fp32_model
    feeds = first_rows(reference.inputs.calibration_feeds, settings.search.sensitivity_samples)
    identity = [source_digest, base.model_dump(mode="json"), settings.search.sensitivity_samples,
                settings.quantize.calibration_batch_size]
    return cached_ranking(work_dir / "sensitivity", identity, lambda: rank_groups(
        graph, feeds, work_dir / "sensitivity" / "scratch", per_channel=base.per_channel,
        threads=settings.evaluate.intra_op_threads,
        progress=lambda i, n: log.info("sensitivity %d/%d", i, n) if i % 5 == 0 or i == n else None))


def _search_mixed(ranking: list[GroupSensitivity], reference: Reference, measured: list[MeasuredCandidate],
                  settings: Settings, profile, source_digest: str, work_dir: Path) -> MixedSearchResult:
    """Run the mixed-precision search; a trial whose config was already measured (k = 0 is usually
    a grid candidate) is reused, not rebuilt."""
    quality = QualityReference(reference.quality.accuracy, reference.quality.hard_slice_accuracy)
    by_hash = {m.built.config_hash: m for m in measured}

    def measure_spec(spec: CandidateSpec) -> MeasuredCandidate:
        digest = config_hash(spec.recipe, parse_config(spec.recipe, spec.config, spec.name), source_digest)
        if digest not in by_hash:
            log.info("search trial %s", spec.name)
            by_hash[digest] = measure(build(spec, reference, source_digest, work_dir), reference, settings.evaluate,
                                      profile, settings.cost.traffic, settings.quality_bar)
        return by_hash[digest]

    result = search_kept_fp32(
        ranking, settings.search.base_config, measure_spec,
        passes=lambda m: judge(m.for_selection(), quality, settings.quality_bar).passed_bar,
        budget=Budget(max_trials=settings.search.max_trials, max_seconds=settings.search.max_minutes * 60))
    log.info("search: %s; best k=%s", result.record["stop_reason"], result.record["best_k"])
    return result


def _version_tags(winner: MeasuredCandidate, key: str, source, data) -> dict[str, str]:
    return {
        tracking.TAG_KEY: key, tracking.TAG_SOURCE_URI: source.uri, tracking.TAG_SOURCE_VERSION: str(source.version or ""),
        tracking.TAG_SOURCE_DIGEST: source.digest, tracking.TAG_RECIPE: winner.built.recipe,
        tracking.TAG_CANDIDATE: winner.built.name, tracking.TAG_CONFIG_HASH: winner.built.config_hash,
        tracking.TAG_DATA_VERSION: data.version, tracking.TAG_ACCURACY: f"{winner.quality.accuracy:.6f}",
        tracking.TAG_MONTHLY_COST: f"{winner.cost.monthly_cost_usd:.2f}",
    }


if __name__ == "__main__":
    print(requantize().report)
