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

from tasks import data_version, validation
from tasks.benchmark import cpu_info
from tasks.candidates import BuiltCandidate, MeasuredCandidate, build_candidate, measure_candidate
from tasks.data_prep import LABEL
from tasks.locking import exclusive
from tasks.reference import Reference, prepare_reference
from tasks.report import candidate_rows, render_decision, render_table
from tasks.pareto import Point, frontier_table, plot_frontier
from tasks.recipes.base import config_hash, parse_config
from tasks.search import Budget, SmallestKeptPrefix, Trial, run_search
from tasks.search_space import expand_all
from tasks.selection import Decision, Reference as QualityReference, judge, select
from tasks.sensitivity import GroupSensitivity, plot_ranking, rank_groups
from tasks.settings import CandidateSpec, Settings, load_settings
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
                measured.append(measure(candidate, reference, settings.evaluate, profile, settings.cost.traffic,
                                        settings.quality_bar))

        search_record = None
        if settings.search.enabled:
            with clock.phase("search"):
                ranking = rank(reference, settings, source.digest, work_dir)
                search_record, trials = _search_mixed(ranking, reference, measured, settings, profile, source.digest,
                                                      work_dir)
                measured += trials
                _log_sensitivity(tracker, parent_id, ranking, work_dir)

        with clock.phase("select"):
            production = tracker.production()
            decision = select([m.for_selection() for m in measured],
                              QualityReference(reference.quality.accuracy, reference.quality.hard_slice_accuracy),
                              settings.quality_bar, production[1] if production else None)

        with clock.phase("track"):
            model_uris = _log_candidates(tracker, parent_id, measured, reference, evaluation, data, key)
            tracker.log_metrics(parent_id, {f"fp32_reference_{k}": v for k, v in reference.quality.as_dict().items()})
            _log_pareto(tracker, parent_id, measured, decision, settings, reference, work_dir)

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
                  "hardware_profile": profile.name, "host": host, "search": search_record, "flow_pid": os.getpid(),
                  "candidates": {m.built.name: {"recipe": m.built.recipe, "config_hash": m.built.config_hash,
                                                "built_by": m.built.built_by,
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
    """Rank weight groups of the optimized graph; cached per source model and settings (it is slow)."""
    search = settings.search
    base = parse_config("int8-dynamic", search.base_config, "search.base_config")
    graph = reference.inputs.optimized_model if base.graph == "optimized" else reference.inputs.fp32_model
    cache_key = hashlib.sha256(json.dumps([source_digest, base.model_dump(mode="json"), search.sensitivity_samples,
                                           settings.quantize.calibration_batch_size]).encode()).hexdigest()[:16]
    cache = work_dir / "sensitivity" / f"{cache_key}.json"
    if cache.is_file():
        return [GroupSensitivity(**g) for g in json.loads(cache.read_text())]
    feeds, rows = [], 0
    for feed in reference.inputs.calibration_feeds:
        if rows >= search.sensitivity_samples:
            break
        feeds.append(feed)
        rows += len(feed["input_ids"])
    ranking = rank_groups(graph, feeds, work_dir / "sensitivity" / "scratch", per_channel=base.per_channel,
                          threads=settings.evaluate.intra_op_threads,
                          progress=lambda i, n: log.info("sensitivity %d/%d", i, n) if i % 5 == 0 or i == n else None)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps([g.as_dict() for g in ranking]))
    return ranking


def _search_mixed(ranking: list[GroupSensitivity], reference: Reference, measured: list[MeasuredCandidate],
                  settings: Settings, profile, source_digest: str, work_dir: Path) -> tuple[dict, list[MeasuredCandidate]]:
    """Find the smallest k for which keeping the k most sensitive groups in FP32 passes the bar.

    Trials whose config was already measured (k = 0 is usually a grid candidate) are reused, not rebuilt.
    """
    search = settings.search
    quality = QualityReference(reference.quality.accuracy, reference.quality.hard_slice_accuracy)
    by_hash = {m.built.config_hash: m for m in measured}
    new: list[MeasuredCandidate] = []
    names: dict[int, str] = {}

    def evaluate(k: int) -> Trial[int]:
        config = {**search.base_config, "nodes_to_exclude": sorted(g.node for g in ranking[:k])}
        spec = CandidateSpec(name=f"search-keep-fp32-k{k}", recipe="int8-dynamic", config=config)
        digest = config_hash(spec.recipe, parse_config(spec.recipe, config, spec.name), source_digest)
        trial = by_hash.get(digest)
        if trial is None:
            log.info("search trial k=%d (%s kept in FP32)", k, ", ".join(g.group for g in ranking[:k]) or "nothing")
            trial = measure(build(spec, reference, source_digest, work_dir), reference, settings.evaluate, profile,
                            settings.cost.traffic, settings.quality_bar)
            by_hash[digest] = trial
            new.append(trial)
        names[k] = trial.built.name
        candidate = trial.for_selection()
        verdict = judge(candidate, quality, settings.quality_bar)
        return Trial(k, verdict.passed_bar, candidate.monthly_cost_usd if verdict.passed_bar else float("inf"),
                     candidate.accuracy)

    result = run_search(SmallestKeptPrefix(len(ranking)), evaluate,
                        Budget(max_trials=search.max_trials, max_seconds=search.max_minutes * 60))
    record = {
        "strategy": "smallest k most-sensitive groups kept in FP32 (k=0 first, then binary search)",
        "stop_reason": result.stop_reason,
        "best_k": result.best.proposal if result.best else None,
        "best_candidate": names[result.best.proposal] if result.best else None,
        "kept_fp32": [g.group for g in ranking[: result.best.proposal]] if result.best else None,
        "trials": [{"k": t.proposal, "candidate": names[t.proposal], "passed": t.passed, "accuracy": t.accuracy}
                   for t in result.trials],
    }
    log.info("search: %s; best k=%s", result.stop_reason, record["best_k"])
    return record, new


def _log_sensitivity(tracker: Tracker, parent_id: str, ranking: list[GroupSensitivity], work_dir: Path) -> None:
    tracker.log_dict(parent_id, {"ranking": [g.as_dict() for g in ranking]}, "sensitivity.json")
    plot = plot_ranking(ranking, work_dir / "sensitivity.png")
    tracker.client.log_artifact(parent_id, str(plot))


def _log_pareto(tracker: Tracker, parent_id: str, measured: list[MeasuredCandidate], decision: Decision,
                settings: Settings, reference: Reference, work_dir: Path) -> None:
    points = [Point(m.built.name, m.cost.monthly_cost_usd, m.quality.accuracy, decision.verdicts[m.built.name].passed_bar)
              for m in measured if m.cost and m.quality]
    if not points:
        return
    tracker.log_dict(parent_id, {"points": frontier_table(points, decision.winner)}, "pareto.json")
    floor = reference.quality.accuracy * (1 - settings.quality_bar.max_relative_accuracy_loss)
    tracker.client.log_artifact(parent_id, str(plot_frontier(points, decision.winner, floor, work_dir / "pareto.png")))


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
