"""The requantize flow: data -> source model -> candidates in parallel -> measure -> select -> promote.

This module only wires: the work is in `tasks/`, the MLflow calls in `tasks.track.tracker`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import record
from tasks.build.candidates import BuiltCandidate, build_candidate
from tasks.build.reference import Reference, prepare_reference
from tasks.config.loading import load_settings
from tasks.config.search_space import expand_all
from tasks.config.settings import CandidateSpec, Settings
from tasks.core import interrupts
from tasks.core.errors import RequantError
from tasks.core.locking import exclusive
from tasks.data import validate as validation
from tasks.data import version as data_version
from tasks.data.prepare import LABEL, TEXT
from tasks.decide.cost_analysis import analyse
from tasks.decide.cost_analysis import render_markdown as render_cost
from tasks.decide.decision import (
    candidate_record,
    check_reference,
    confirm_winner,
    for_selection,
    log_screening,
    passes_quality,
    production_candidate,
    same_graph_as_production,
    screening_record,
)
from tasks.decide.mixed_search import MixedSearchResult, search_kept_fp32
from tasks.decide.report import (
    candidate_rows,
    decision_markdown,
    render_decision,
    render_table,
    verdict_word,
)
from tasks.decide.search import Budget
from tasks.decide.selection import Reference as QualityReference
from tasks.decide.selection import select
from tasks.evaluate.candidates import (
    MeasuredCandidate,
    compare_with_production,
    score_candidate,
    time_candidates,
)
from tasks.evaluate.speed import bring_back_deferred, screen_speed
from tasks.measure.loadtest import slo_ms
from tasks.measure.result_cache import ResultCache
from tasks.measure.sensitivity import (
    GroupSensitivity,
    cached_ranking,
    rank_groups,
    spread_rows,
)
from tasks.measure.served_pricing import contenders, reprice
from tasks.measure.timing import cpu_info
from tasks.models.base import open_model
from tasks.recipes.base import config_hash, parse_config, recipe_class, runtime_versions
from tasks.serve import rollback
from tasks.serve.front import ServedFiles, files_of_mlflow_model
from tasks.serve.serving import ServingLimits
from tasks.track import tracker as tracking
from tasks.track.tracker import Tracker
from tasks.train import qat

log = logging.getLogger("requant")
DECISION_MARKDOWN = "decision.md"  # the parent's description as a file: `requant report` renders it


@dataclass
class RunSummary:
    """What a requantize run did, for the CLI, the benchmark script and tests."""

    outcome: str  # promoted | kept-production | no-candidate-passed | not-confirmed | already-decided
    decision_key: str
    parent_run_id: str | None = None
    winner: str | None = None
    promoted_version: str | None = None
    table: str = ""
    report: str = ""  # the table, then the decision and why each other candidate lost
    decision: dict = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    flow_run_id: str | None = None  # the Prefect flow run (its artifacts hold the decision table)


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


def decision_key(source_digest: str, data: data_version.DataVersion, settings: Settings, host: dict[str, str],
                 profile_name: str) -> str:
    """Identity of a decision: same source model, data, params, host and runtimes -> same key -> nothing changes.

    The host (CPU model, its ISA flags, the hardware profile it is priced as) and the runtime
    versions are part of it: speeds, and so prices and the winner, are only valid where they were measured.
    """
    knobs = {name: getattr(settings, name).model_dump(mode="json")
             for name in ("quantize", "evaluate", "cost", "quality_bar", "search", "qat")}
    knobs["max_length"] = settings.model.max_length
    knobs["serving"] = settings.serving.model_dump(mode="json")  # prices come from the served model
    knobs["served_load"] = {"slo_p95_ms": slo_ms(settings.loadtest, settings.quality_bar),
                            "texts_per_request": settings.loadtest.texts_per_request}
    knobs["serving_model"] = settings.registry.serving_model_name
    where = {"cpu_model": host.get("cpu_model"), "cpu_flags": host.get("cpu_flags"), "cpu_count": host.get("cpu_count"),
             "profile": profile_name, "runtime": runtime_versions()}
    payload = json.dumps({"source": source_digest, "data": data.version, "knobs": knobs, "where": where}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


# Tasks: thin Prefect edges over tasks/. Inputs hold numpy arrays and models, so Prefect must not
# try to hash them for caching; content-addressed folders give the reuse instead.
prepare_data = task(data_version.reproduce, name="prepare-data", cache_policy=NO_CACHE)
validate_data = task(validation.validate_prepared, name="validate-data", cache_policy=NO_CACHE)
build_reference = task(prepare_reference, name="fp32-reference", cache_policy=NO_CACHE)
build = task(build_candidate, name="quantize", cache_policy=NO_CACHE)
score = task(score_candidate, name="evaluate", cache_policy=NO_CACHE)
time_all = task(time_candidates, name="timing", cache_policy=NO_CACHE)
escalate = task(qat.escalate, name="qat", cache_policy=NO_CACHE)
serve_and_price = task(reprice, name="served-capacity", cache_policy=NO_CACHE)


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
    # phase is recorded and the run ends KILLED with the reason (tasks/core/interrupts.py).
    interrupts.install()
    clock, started = PhaseClock(), time.perf_counter()
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
                                                               **{f"host.{k}": v for k, v in host.items()}}) as parent_id, \
            (tracker.system_metrics(parent_id) if settings.operations.system_metrics else nullcontext()):
        # Runs whose process died (a kill, a lost machine) are closed first; an interrupted
        # promotion is either completed in the record or redone by this run.
        for closed in tracker.reconcile_stale_runs():
            log.warning("closed stale run %s as %s: %s", closed["run_id"], closed["status"], closed["reason"])
        with clock.phase("setup"):
            source = tracker.fetch_source(model_uri or settings.model.source_uri, project / "models" / "source")
            # Refuse unsafe or unusable models (pickles, remote code, wrong head) before any work.
            family = open_model(source.folder, settings.model.family, settings.model.max_length,
                                settings.model.allow_pickle_weights)
        with clock.phase("data"):
            # The data stage of the params file actually given (not always params.yaml's).
            data = prepare_data(project, settings.data.output_dir, Path(params_path).resolve())
            calibration = pd.read_csv(data.calibration_path, dtype=str, keep_default_na=False)
            evaluation = pd.read_csv(data.evaluation_path, dtype=str, keep_default_na=False)

        key = decision_key(source.digest, data, settings, host, profile.name)
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
            classes = family.class_names_for(pd.concat([calibration, evaluation])[LABEL])
            with record.data_docs(tracker, parent_id) as docs_dir:  # logged even when validation fails
                reports = validate_data(calibration, evaluation, classes, settings.data, docs_dir)
            tracker.log_dict(parent_id, {"reports": [r.as_dict() for r in reports]}, "data_validation.json")
            record.log_data_inputs(tracker, parent_id, data, calibration, evaluation)

        with clock.phase("evaluate"):
            # The FP32 graphs live in a folder of their own per source model: two models requantized
            # at once never overwrite each other's reference.
            reference = build_reference(source.folder, evaluation, calibration, work_dir / "sources" / source.digest[:16],
                                        settings.model, settings.evaluate, settings.quantize.calibration_batch_size)
            check_reference(reference)
            if reference.serving is not None:  # the served model batches and limits input as params.yaml says
                reference.serving = replace(reference.serving, limits=ServingLimits.from_dict(settings.serving.model_dump()))

        with clock.phase("quantize"):
            built = _build_all(settings, reference, source.digest, work_dir)

        with clock.phase("evaluate"):
            production, production_broken = _fetch_production(tracker, parent_id, work_dir)
            if production is not None:
                built.append(production_candidate(production))
            # Per-row predictions are reused across runs and between the grid and the search.
            scores = ResultCache.for_reference(work_dir / "results", reference, host, settings.evaluate.reuse_scores)
            # Short interleaved timing first: a candidate clearly slower than a rival is deferred, not scored.
            speed = screen_speed(built, reference, settings.evaluate, settings.quality_bar)
            measured = []
            for candidate in built:
                if candidate.name in speed.deferred:
                    measured.append(MeasuredCandidate(candidate, speed_screening=speed.deferred[candidate.name]))
                    continue
                log.info("evaluating %s on up to %d rows", candidate.name, len(reference.y_true))
                measured.append(score(candidate, reference, settings.evaluate, settings.quality_bar, scores))

        search_record = None
        if settings.search.enabled:
            with clock.phase("search"):
                # The sensitivity sweep runs only if the base config (k = 0) fails the bar.
                searched = _search_mixed(lambda: rank(reference, settings, source.digest, work_dir), reference,
                                         measured, settings, source.digest, work_dir, scores)
                search_record = searched.record
                known = {id(m) for m in measured}
                measured += [m for m in searched.measured if id(m) not in known]
                if searched.ranking is not None:
                    record.log_sensitivity(tracker, parent_id, searched.ranking, work_dir)

        with clock.phase("evaluate"):
            # A deferred candidate whose every faster rival fails the bar gets its full measurement after all.
            bring_back_deferred(measured, lambda b: score(b, reference, settings.evaluate, settings.quality_bar, scores),
                                lambda m: passes_quality(m, reference, settings.quality_bar))

        with clock.phase("qat"):
            # Quantization-aware fine-tuning, only when post-training quantization missed the bar (the
            # deferred candidates are back by now when that matters): its candidate is built, scored,
            # timed and selected like the others.
            escalation = escalate(measured, reference, family, calibration, evaluation, settings, source.digest, work_dir,
                                  progress=lambda p: log.info("qat step %d/%d: loss %.4f (%.0f s)", p.step,
                                                              p.total_steps, p.loss, p.seconds))
            measured += escalation.measured

        with clock.phase("evaluate"):
            log_screening(measured)
            compare_with_production(measured, reference, settings.quality_bar)
            for m in measured:  # a rough speed for the record, also for candidates never timed in full
                rates = speed.rates.get(m.built.name)
                m.screen_throughput_per_s = float(np.median(rates)) if rates else None
            # Every candidate that passes the bar on its scores (production always) is timed in the same
            # interleaved rounds; a failing one is not: its speed cannot change the decision.
            time_all(measured, reference, settings.evaluate, profile, settings.cost.traffic,
                     progress=lambda r, n: log.info("timing round %d/%d", r, n),
                     passes=lambda m: passes_quality(m, reference, settings.quality_bar))

        quality = QualityReference(reference.quality.accuracy, reference.quality.hard_slice_accuracy)

        def decide():
            return select([for_selection(m, reference.y_true) for m in measured], quality, settings.quality_bar)

        with clock.phase("select"):
            decision = decide()
        served = {}
        if settings.serving.price_from == "served":
            with clock.phase("serve"):
                # Served capacity of the winner, production and FP32; the rest through their ratio. The
                # winner on served prices can differ from the batched one: then it is served too (once).
                for _ in range(2):
                    to_test = contenders(measured, decision.winner)
                    if all(m.built.name in served for m in to_test):
                        break
                    serve_and_price(measured, to_test, lambda m: _served_files(m, reference, production),
                                    evaluation[TEXT].tolist(), settings.loadtest, settings.serving,
                                    slo_ms(settings.loadtest, settings.quality_bar), profile, settings.cost.traffic,
                                    work_dir / "served" / parent_id, served)
                    decision = decide()
                shutil.rmtree(work_dir / "served" / parent_id, ignore_errors=True)  # the load driver's scratch files
        with clock.phase("select"):
            winner = next((m for m in measured if m.built.name == decision.winner), None)
            confirmation = confirm_winner(winner, decision, reference, settings)
            same_graph_as_production(winner, decision, measured)
            # A winner that repeats a version someone rolled back is not promoted again.
            blocked = (rollback.blocking_rollback(key, winner.built.config_hash, tracker.rolled_back_versions())
                       if decision.promote else None)
            if blocked:
                decision.promote, decision.summary = False, rollback.kept_summary(blocked)
            outcome = ("promoted" if decision.promote else
                       "not-confirmed" if confirmation and not confirmation["passed_bar"] else
                       "kept-production" if decision.winner else "no-candidate-passed")
            if production_broken and not decision.promote:  # never "kept production" for a model that does not load
                raise RequantError(f"{production_broken}, and no candidate replaces it ({decision.summary}): move "
                                   "the production alias to a version that loads (requant rollback --to VERSION)")

        with clock.phase("track"):
            model_uris = record.log_candidates(tracker, parent_id, measured, reference, evaluation, calibration, data,
                                               key, decision)
            tracker.log_metrics(parent_id, {f"fp32_reference_{k}": v for k, v in reference.quality.as_dict().items()},
                                dataset=("evaluation", data.evaluation_md5[:36]))
            record.log_pareto(tracker, parent_id, measured, decision, settings, reference, work_dir)
            record.log_qat(tracker, parent_id, escalation, reference.card.labels, key)

        promoted_version = None
        if decision.promote:
            with clock.phase("select"):
                # Registered now, but the alias moves only after the decision is on record.
                promoted_version = tracker.register_winner(model_uris[winner.built.name], _version_tags(
                    winner, key, source, data, parent_id), project / ".requant",
                    broken={production_broken.version} if production_broken else set())

        analysis = analyse(measured, decision, profile, time.perf_counter() - started,
                           _priced_from(settings) if served else "batched in-process throughput")
        table = render_table(candidate_rows(measured, decision))
        alias = settings.registry.promotion_alias()  # production, or challenger with registry.rollout: challenger
        decided = {**decision.as_dict(), "outcome": outcome, "promoted_version": promoted_version,
                   "promoted_alias": alias if promoted_version else None,
                   "decision_key": key, "serving_model": settings.registry.serving_model_name,
                   "hardware_profile": profile.name, "host": host, "search": search_record, "flow_pid": os.getpid(),
                   "confirmation": confirmation, "hard_slice_intents": reference.hard_classes,
                   "cost_analysis": analysis.as_dict(), "qat": escalation.record(decision),
                   "pricing": {"price_from": settings.serving.price_from,
                               "served": {name: c.as_dict() for name, c in served.items()},
                               "candidates": {m.built.name: m.served_price.as_dict() for m in measured if m.served_price}},
                   "production_broken": str(production_broken) if production_broken else None,
                   "screening": screening_record(measured, settings.evaluate, speed),
                   "rows": {"selection": len(reference.y_true),
                            "confirmation": len(reference.confirmation.y_true) if reference.confirmation else 0},
                   "candidates": {m.built.name: candidate_record(m, reference) for m in measured}}
        report = "\n\n".join([table, render_decision(decision, measured, confirmation),
                               "cost analysis:\n" + render_cost(analysis),
                               f"quantization-aware fine-tuning: {decided['qat']['outcome']}"])
        # The decision record first, the alias last: a kill in between leaves a recorded decision
        # whose promotion the next run completes or redoes, never an alias without a decision.
        with clock.phase("track"):
            tracker.log_dict(parent_id, decided, tracking.DECISION_FILE)
            tracker.client.log_text(parent_id, report, "report.txt")
            summary_md = "\n\n".join([decision_markdown(decision, measured, outcome, render_cost(analysis), confirmation,
                                                        promoted_version, settings.registry.serving_model_name),
                                      qat.render_markdown(decided["qat"])])
            tracker.describe_run(parent_id, summary_md)
            tracker.client.log_text(parent_id, summary_md, DECISION_MARKDOWN)
            publish_decision(measured, decision, summary_md)
            if promoted_version:
                tracker.describe_version(promoted_version, record.version_markdown(tracker, parent_id, decision, analysis))
        tracker.set_tags(parent_id, {tracking.TAG_KEY: key, tracking.TAG_OUTCOME: outcome,
                                     "requant.winner": decision.winner or "",
                                     **({tracking.TAG_PROMOTED_VERSION: promoted_version, tracking.TAG_PROMOTED_ALIAS: alias,
                                         tracking.TAG_PROMOTION: "pending"} if promoted_version else {})})
        if promoted_version:
            with clock.phase("select"):
                tracker.move_alias(promoted_version, project / ".requant", alias=alias)
                tracker.set_tags(parent_id, {tracking.TAG_PROMOTION: "done"})
                log.info("alias %s@%s -> version %s", settings.registry.serving_model_name, alias, promoted_version)
                tracker.describe_serving_model(record.serving_model_markdown(tracker, parent_id, source, decision,
                                                                             promoted_version, settings, alias))
        tracker.log_metrics(parent_id, {f"phase_{k}_seconds": v for k, v in clock.seconds.items()})

    from prefect.runtime import flow_run

    return RunSummary(outcome=outcome, decision_key=key, parent_run_id=parent_id, winner=decision.winner,
                      promoted_version=promoted_version, table=table, report=report, decision=decided,
                      phases=clock.seconds, flow_run_id=str(flow_run.id) if flow_run.id else None)


def publish_decision(measured: list[MeasuredCandidate], decision, summary_markdown: str) -> None:
    """The decision as Prefect artifacts on this flow run: the candidate table and the summary."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = [{"candidate": name, "verdict": verdict_word(m, decision),
             "usd_per_month": m.cost.monthly_cost_usd if m.cost else None,
             "accuracy": round(m.quality.accuracy, 4) if m.quality else None,
             "batched_per_s": round(m.speed.throughput_per_s) if m.speed else None,
             "served_per_s": round(m.served_price.sentences_per_s) if m.served_price else None,
             "priced_from": m.served_price.basis if m.served_price else "batched", "reason": v.reason}
            for m in measured for name, v in [(m.built.name, decision.verdicts[m.built.name])]]
    create_table_artifact(rows, key="requant-candidates", description=f"requant: {decision.summary}")
    create_markdown_artifact(summary_markdown, key="requant-decision", description="requant decision, cost and candidates")


def _build_all(settings: Settings, reference: Reference, source_digest: str, work_dir: Path) -> list[BuiltCandidate]:
    """Quantize candidates in parallel, at most quantize.max_parallel at once (memory-bound).

    A new build starts as soon as one finishes (no waiting for the slowest of a batch). Recipes that
    run the model over the calibration rows (static INT8) go last and one at a time: ONNX Runtime
    runs them on every core, and beside another build both take twice as long (static INT8 on the
    AMD host: 7.9 s alone, 14.6 s beside the others). Candidates come back in params.yaml's order.
    """
    specs = expand_all(settings.quantize.candidates)
    calibrating = {i for i, spec in enumerate(specs) if recipe_class(spec.recipe).uses_calibration}
    built: list[BuiltCandidate | None] = [None] * len(specs)
    for group, at_once in (([i for i in range(len(specs)) if i not in calibrating], settings.quantize.max_parallel),
                           (sorted(calibrating), 1)):
        for i, b in _build_window(specs, group, at_once, reference, source_digest, work_dir):
            built[i] = b
            if b.error:
                log.warning("candidate %s failed to build: %s", b.name, b.error)
            else:
                log.info("built %s in %.1f s%s", b.name, b.build_seconds, " (reused)" if b.reused else "")
    return built


def _build_window(specs: list[CandidateSpec], queue: list[int], at_once: int, reference: Reference,
                  source_digest: str, work_dir: Path):
    """Yield (index, built candidate) as builds finish, keeping at most `at_once` running."""
    from prefect.futures import as_completed

    queue, running = list(queue), {}
    while queue or running:
        while queue and len(running) < at_once:
            i = queue.pop(0)
            running[build.submit(specs[i], reference, source_digest, work_dir)] = i
        done = next(as_completed(list(running)))
        yield running.pop(done), done.result()


@task(name="sensitivity", cache_policy=NO_CACHE)
def rank(reference: Reference, settings: Settings, source_digest: str, work_dir: Path) -> list[GroupSensitivity]:
    """Rank weight groups by sensitivity; cached per source model and settings (it is slow)."""
    base = parse_config("int8-dynamic", settings.search.base_config, "search.base_config")
    graph = reference.inputs.optimized_model if base.graph == "optimized" else reference.inputs.fp32_model
    feeds = spread_rows(reference.inputs.calibration_feeds, settings.search.sensitivity_samples)
    identity = [source_digest, base.model_dump(mode="json"), settings.search.sensitivity_samples,
                settings.quantize.calibration_batch_size, reference.inputs.calibration_digest(), runtime_versions()]
    return cached_ranking(work_dir / "sensitivity", identity, lambda: rank_groups(
        graph, feeds, work_dir / "sensitivity" / "scratch", per_channel=base.per_channel,
        threads=settings.evaluate.intra_op_threads,
        progress=lambda i, n: log.info("sensitivity %d/%d", i, n) if i % 5 == 0 or i == n else None))


def _search_mixed(rank_groups_lazily: Callable[[], list[GroupSensitivity]], reference: Reference,
                  measured: list[MeasuredCandidate], settings: Settings, source_digest: str, work_dir: Path,
                  scores: ResultCache) -> MixedSearchResult:
    """Run the mixed-precision search on quality alone; a trial whose config was already scored
    (k = 0 is usually a grid candidate) is reused, not rebuilt. Trials are timed later with the rest.
    A deferred grid candidate is not reused (it has no scores); its scores are, through `scores`."""
    by_hash = {m.built.config_hash: m for m in measured if not m.deferred}

    def measure_spec(spec: CandidateSpec) -> MeasuredCandidate:
        digest = config_hash(spec.recipe, parse_config(spec.recipe, spec.config, spec.name), source_digest,
                             reference.inputs.calibration_digest())
        if digest not in by_hash:
            log.info("search trial %s", spec.name)
            by_hash[digest] = score(build(spec, reference, source_digest, work_dir), reference, settings.evaluate,
                                    settings.quality_bar, scores)
        return by_hash[digest]

    result = search_kept_fp32(
        rank_groups_lazily, settings.search.base_config, measure_spec,
        passes=lambda m: passes_quality(m, reference, settings.quality_bar),
        budget=Budget(max_trials=settings.search.max_trials, max_seconds=settings.search.max_minutes * 60))
    log.info("search: %s; best k=%s", result.record["stop_reason"], result.record["best_k"])
    return result


def _priced_from(settings: Settings) -> str:
    return (f"served capacity: requests/s at p95 <= {slo_ms(settings.loadtest, settings.quality_bar):.0f} ms, "
            f"{settings.loadtest.texts_per_request} text(s) per request, through the served model on this host "
            "(winner, production and FP32 load-tested; the others through the served/batched ratio of the nearest)")


def _fetch_production(tracker: Tracker, parent_id: str, work_dir: Path):
    """(production version, None), or (None, the ProductionBroken error) when the version behind the alias is broken.

    A broken production is said in one line, recorded on the run (tag requant.production_broken) and
    not measured: the run then promotes a winner if one passes, and fails loudly otherwise.
    """
    try:
        return tracker.fetch_production(work_dir / "production"), None
    except tracking.ProductionBroken as exc:
        log.error("%s; it is not kept: a passing winner replaces it", exc)
        tracker.set_tags(parent_id, {tracking.TAG_PRODUCTION_BROKEN: str(exc)[:5000]})
        return None, exc


def _served_files(m: MeasuredCandidate, reference: Reference, production) -> ServedFiles | str:
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


def _version_tags(winner: MeasuredCandidate, key: str, source, data, parent_id: str) -> dict[str, str]:
    return {
        tracking.TAG_MODEL_SHA256: winner.built.model_sha256, tracking.TAG_PARENT_RUN: parent_id,
        "requant.precision": winner.built.precision,
        tracking.TAG_KEY: key, tracking.TAG_SOURCE_URI: source.uri, tracking.TAG_SOURCE_VERSION: str(source.version or ""),
        tracking.TAG_SOURCE_DIGEST: source.digest, tracking.TAG_RECIPE: winner.built.recipe,
        tracking.TAG_CANDIDATE: winner.built.name, tracking.TAG_CONFIG_HASH: winner.built.config_hash,
        tracking.TAG_DATA_VERSION: data.version, tracking.TAG_ACCURACY: f"{winner.quality.accuracy:.6f}",
        tracking.TAG_MONTHLY_COST: f"{winner.cost.monthly_cost_usd:.2f}",
        "requant.priced_from": winner.served_price.describe() if winner.served_price else "batched in-process throughput",
    }


if __name__ == "__main__":
    print(requantize().report)
