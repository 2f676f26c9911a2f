"""The steps of the requantize flow, in the order it runs them, each a function of the run's state.

open_run -> source_model -> data -> (already decided?) -> validate -> reference -> build -> measure
-> search -> bring_back -> escalate -> time -> select -> price_served -> confirm -> record -> promote

Each step reads what earlier steps put in `RunState` (flows/run_state.py) and adds its own; the
work is in tasks/, the MLflow calls in tasks.track; here a step only wires them, inside its phase of
the clock (setup, data, evaluate, quantize, search, qat, select, serve, track).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows import fleet_steps, record
from flows.run_state import PhaseClock, RunState, RunSummary
from tasks import track
from tasks.build.candidates import BuiltCandidate, build_candidate
from tasks.build.preflight import check_data_for
from tasks.build.reference import Reference, prepare_reference
from tasks.config.loading import load_settings, with_fleet
from tasks.config.search_space import expand_all
from tasks.config.settings import CandidateSpec, Settings
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
    log_screening,
    passes_quality,
    production_candidate,
    same_graph_as_production,
    screening_record,
    select_measured,
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
from tasks.evaluate.candidates import (
    MeasuredCandidate,
    compare_with_production,
    files_to_serve,
    mark_untimed_if_failing,
    score_candidate,
    time_candidates,
)
from tasks.evaluate.speed import SpeedScreen, bring_back_deferred, screen_speed
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
from tasks.recipes.base import (
    config_hash,
    parse_config,
    recipe_class,
    runtime_versions,
)
from tasks.serve import rollback
from tasks.serve.serving import ServingLimits
from tasks.track import Tracker
from tasks.train import qat

log = logging.getLogger("requant")
DECISION_MARKDOWN = "decision.md"  # the parent's description as a file: `requant report` renders it


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
build_one = task(build_candidate, name="quantize", cache_policy=NO_CACHE)
score = task(score_candidate, name="evaluate", cache_policy=NO_CACHE)
time_all = task(time_candidates, name="timing", cache_policy=NO_CACHE)
run_qat = task(qat.escalate, name="qat", cache_policy=NO_CACHE)
serve_and_price = task(reprice, name="served-capacity", cache_policy=NO_CACHE)


def open_run(params_path: str, model_uri: str | None, project_dir: str | None, force: bool,
             work_dir: str | None, fleet: list[str] | None = None) -> RunState:
    """Settings, project, tracker, host and its price profile: everything needed before the parent run opens."""
    clock, started = PhaseClock(), time.perf_counter()
    with clock.phase("setup"):
        settings = load_settings(params_path)
        if fleet is not None:
            settings = with_fleet(settings, fleet)
        project = Path(project_dir or Path(params_path).resolve().parent).resolve()
        tracker = Tracker(settings.registry)
        host = cpu_info()
        profile = settings.cost.host_profile(host["cpu_model"])
    return RunState(settings=settings, params_path=Path(params_path).resolve(), project=project,
                    work_dir=Path(work_dir) if work_dir else project / "models" / "work", model_uri=model_uri,
                    force=force, tracker=tracker, host=host, profile=profile, clock=clock, started=started)


def parent_run_tags(run: RunState) -> dict[str, str]:
    """The parent run's first tags: where it is measured and priced."""
    return {"requant.hardware_profile": run.profile.name, **{f"host.{k}": v for k, v in run.host.items()}}


def close_stale_runs(run: RunState) -> None:
    """Runs whose process died (a kill, a lost machine) are closed first; an interrupted promotion is
    either completed in the record or redone by this run."""
    for closed in run.tracker.reconcile_stale_runs():
        log.warning("closed stale run %s as %s: %s", closed["run_id"], closed["status"], closed["reason"])


def source_model(run: RunState) -> None:
    """Fetch the model to requantize and refuse unsafe or unusable ones (pickles, remote code, wrong head)."""
    settings = run.settings
    with run.clock.phase("setup"):
        run.source = run.tracker.fetch_source(run.model_uri or settings.model.source_uri, run.project / "models" / "source")
        run.family = open_model(run.source.folder, settings.model.family, settings.model.max_length,
                                settings.model.allow_pickle_weights)


def data(run: RunState) -> None:
    """The DVC data stage of the params file actually given, read back; the decision key; the run's lock."""
    settings, source = run.settings, run.source
    check_data_for(run.family, settings)  # a scheduled run never passed the CLI's preflight
    with run.clock.phase("data"):
        run.data = prepare_data(run.project, settings.data.output_dir, run.params_path)
        run.calibration = pd.read_csv(run.data.calibration_path, dtype=str, keep_default_na=False)
        run.evaluation = pd.read_csv(run.data.evaluation_path, dtype=str, keep_default_na=False)
    run.key = decision_key(source.digest, run.data, settings, run.host, run.profile.name)
    run.tracker.set_tags(run.parent_id, {
        "mlflow.runName": f"requantize-{source.name or Path(source.uri).name}-v{source.version or 'local'}",
        track.TAG_SOURCE_URI: source.uri, track.TAG_SOURCE_VERSION: str(source.version or ""),
        track.TAG_SOURCE_DIGEST: source.digest, track.TAG_DATA_VERSION: run.data.version,
    })
    # At most one requantization per source model at a time (a nightly run and a triggered run
    # can collide): the second waits here, then finds the first one's decision and stops.
    with run.clock.phase("setup"):
        run.held.enter_context(exclusive(run.project / ".requant", f"requantize-{source.name or source.digest[:16]}",
                                         timeout_s=settings.operations.lock_timeout_minutes * 60))


def already_decided(run: RunState) -> RunSummary | None:
    """The earlier run's summary if this (model, data, params, host) was decided before (and not --force)."""
    previous = None if run.force else run.tracker.previous_decision(run.key)
    if not previous:
        return None
    log.info("already decided in run %s (%s); nothing changes", previous["run_id"], previous.get(track.TAG_OUTCOME))
    run.tracker.set_tags(run.parent_id, {track.TAG_OUTCOME: "already-decided", "requant.decided_in": previous["run_id"]})
    return RunSummary(outcome="already-decided", decision_key=run.key, parent_run_id=previous["run_id"],
                      phases=run.clock.seconds)


def validate(run: RunState) -> None:
    """Log the run's params, validate the data (Great Expectations, its docs logged even on failure), log the inputs."""
    settings = run.settings
    run.tracker.log_params(run.parent_id, {
        "source_uri": run.source.uri, "data_version": run.data.version, "calibration_md5": run.data.calibration_md5,
        "evaluation_md5": run.data.evaluation_md5, **_where_priced(settings, run.profile),
        **record.flat("bar", settings.quality_bar.model_dump()),
        **record.flat("traffic", settings.cost.traffic.model_dump()),
        **record.flat("evaluate", settings.evaluate.model_dump()),
        "candidates": ",".join(c.name for c in settings.quantize.candidates),
    })
    with run.clock.phase("data"):
        classes = run.family.class_names_for(pd.concat([run.calibration, run.evaluation])[LABEL])
        with record.data_docs(run.tracker, run.parent_id) as docs_dir:
            reports = validate_data(run.calibration, run.evaluation, classes, settings.data, docs_dir)
        run.tracker.log_dict(run.parent_id, {"reports": [r.as_dict() for r in reports]}, "data_validation.json")
        record.log_data_inputs(run.tracker, run.parent_id, run.data, run.calibration, run.evaluation)


def reference(run: RunState) -> None:
    """The FP32 reference: the graphs every recipe starts from and the predictions candidates are judged by."""
    settings = run.settings
    with run.clock.phase("evaluate"):
        # The FP32 graphs live in a folder of their own per source model: two models requantized
        # at once never overwrite each other's reference.
        run.reference = build_reference(run.source.folder, run.evaluation, run.calibration,
                                        run.work_dir / "sources" / run.source.digest[:16], settings.model,
                                        settings.evaluate, settings.quantize.calibration_batch_size)
        check_reference(run.reference)
        if run.reference.serving is not None:  # the served model batches and limits input as params.yaml says
            run.reference.serving = replace(run.reference.serving,
                                            limits=ServingLimits.from_dict(settings.serving.model_dump()))


def build(run: RunState) -> None:
    """Every configured candidate built in parallel and proven."""
    with run.clock.phase("quantize"):
        run.built = _build_all(run.settings, run.reference, run.source.digest, run.work_dir)


def measure(run: RunState) -> None:
    """Production fetched as served; a short speed screen defers clearly slower candidates; the rest scored."""
    settings = run.settings
    with run.clock.phase("evaluate"):
        run.production, run.production_broken = _fetch_production(run.tracker, run.parent_id, run.work_dir)
        if run.production is not None:
            run.built.append(production_candidate(run.production))
        # Per-row predictions are reused across runs and between the grid and the search.
        run.scores = ResultCache.for_reference(run.work_dir / "results", run.reference, run.host,
                                               settings.evaluate.reuse_scores)
        # With a fleet, this host's speed ranks nothing: a graph slower here can be the fastest on another CPU.
        run.speed = (SpeedScreen(False, "cost.fleet is set: speed is measured on each profile's own machine")
                     if settings.cost.fleet else screen_speed(run.built, run.reference, settings.evaluate,
                                                              settings.quality_bar))
        for candidate in run.built:
            if candidate.name in run.speed.deferred:
                run.measured.append(MeasuredCandidate(candidate, speed_screening=run.speed.deferred[candidate.name]))
                continue
            log.info("evaluating %s on up to %d rows", candidate.name, len(run.reference.y_true))
            run.measured.append(score(candidate, run.reference, settings.evaluate, settings.quality_bar, run.scores))


def search(run: RunState) -> None:
    """The mixed-precision search, when on; its sensitivity sweep runs only if the base config fails the bar."""
    settings = run.settings
    if not settings.search.enabled:
        return
    with run.clock.phase("search"):
        searched = _search_mixed(lambda: rank(run.reference, settings, run.source.digest, run.work_dir), run.reference,
                                 run.measured, settings, run.source.digest, run.work_dir, run.scores)
        run.search_record = searched.record
        known = {id(m) for m in run.measured}
        run.measured += [m for m in searched.measured if id(m) not in known]
        if searched.ranking is not None:
            record.log_sensitivity(run.tracker, run.parent_id, searched.ranking, run.work_dir)


def bring_back(run: RunState) -> None:
    """A deferred candidate whose every faster rival fails the bar gets its full measurement after all."""
    settings = run.settings
    with run.clock.phase("evaluate"):
        bring_back_deferred(run.measured,
                            lambda b: score(b, run.reference, settings.evaluate, settings.quality_bar, run.scores),
                            lambda m: passes_quality(m, run.reference, settings.quality_bar))


def escalate(run: RunState) -> None:
    """Quantization-aware fine-tuning, only when post-training quantization missed the bar: its
    candidate is built, scored, timed and selected like the others."""
    with run.clock.phase("qat"):
        run.escalation = run_qat(run.measured, run.reference, run.family, run.calibration, run.evaluation, run.settings,
                                 run.source.digest, run.work_dir,
                                 progress=lambda p: log.info("qat step %d/%d: loss %.4f (%.0f s)", p.step,
                                                             p.total_steps, p.loss, p.seconds))
        run.measured += run.escalation.measured


def time_passing(run: RunState) -> None:
    """Every candidate that passes the bar on its scores (production always) timed in the same
    interleaved rounds; a failing one is not: its speed cannot change the decision."""
    settings = run.settings
    with run.clock.phase("evaluate"):
        log_screening(run.measured)
        compare_with_production(run.measured, run.reference, settings.quality_bar)
        # The same graph screened under another name (a search trial built while its grid twin was deferred)
        # has the same screening speed: every candidate of that graph logs it under the same name.
        screened = {m.built.config_hash: run.speed.rates[m.built.name] for m in run.measured
                    if run.speed.rates.get(m.built.name)}
        for m in run.measured:  # a rough speed for the record, also for candidates never timed in full
            rates = run.speed.rates.get(m.built.name) or screened.get(m.built.config_hash)
            m.screen_throughput_per_s = float(np.median(rates)) if rates else None
        if settings.cost.fleet:  # timed on each profile's own machine instead (flows/fleet_steps.py)
            for m in run.measured:
                if m.quality and not m.error:
                    mark_untimed_if_failing(m, lambda m: passes_quality(m, run.reference, settings.quality_bar))
            return
        time_all(run.measured, run.reference, settings.evaluate, run.profile, settings.cost.traffic,
                 progress=lambda r, n: log.info("timing round %d/%d", r, n),
                 passes=lambda m: passes_quality(m, run.reference, settings.quality_bar))


def select(run: RunState) -> None:
    """The cheapest candidate that meets the bar, with speeds compared beyond their noise; with cost.fleet,
    the cheapest (candidate, profile) pair, each profile measured by its own pool's worker."""
    if run.settings.cost.fleet:
        fleet_steps.price_on_fleet(run)
        return
    with run.clock.phase("select"):
        run.decision = _select(run)


def price_served(run: RunState) -> None:
    """Served capacity of the winner, production and FP32 (the rest through their served/batched
    ratio); a different winner on served prices is served too, once."""
    settings = run.settings
    if settings.serving.price_from != "served" or run.fleet is not None:  # a fleet's workers served their own
        return
    scratch = run.work_dir / "served" / run.parent_id  # the load driver's scratch files
    with run.clock.phase("serve"):
        for _ in range(2):
            to_test = contenders(run.measured, run.decision.winner)
            if all(m.built.name in run.served for m in to_test):
                break
            serve_and_price(run.measured, to_test, lambda m: files_to_serve(m, run.reference, run.production),
                            run.evaluation[TEXT].tolist(), settings.loadtest, settings.serving,
                            slo_ms(settings.loadtest, settings.quality_bar), run.profile, settings.cost.traffic,
                            scratch, run.served)
            run.decision = _select(run)
        shutil.rmtree(scratch, ignore_errors=True)


def confirm(run: RunState) -> None:
    """The winner confirmed on rows that took no part in choosing; a rolled-back repeat is not promoted;
    a broken production that nothing replaces fails the run."""
    decision, settings = run.decision, run.settings
    with run.clock.phase("select"):
        run.winner = next((m for m in run.measured if m.built.name == decision.winner), None)
        run.confirmation = confirm_winner(run.winner, decision, run.reference, settings)
        same_graph_as_production(run.winner, decision, run.measured)
        blocked = (rollback.blocking_rollback(run.key, run.winner.built.config_hash,
                                              run.tracker.rolled_back_versions()) if decision.promote else None)
        if blocked:
            decision.promote, decision.summary = False, rollback.kept_summary(blocked)
        run.outcome = ("promoted" if decision.promote else
                       "not-measured" if run.fleet is not None and not run.fleet["measured_any"] else
                       "not-confirmed" if run.confirmation and not run.confirmation["passed_bar"] else
                       "kept-production" if decision.winner else "no-candidate-passed")
        if run.fleet is not None and not decision.promote:
            fleet_steps.production_stays(run)
        if run.production_broken and not decision.promote:  # never "kept production" for a model that does not load
            raise RequantError(f"{run.production_broken}, and no candidate replaces it ({decision.summary}): move "
                               "the production alias to a version that loads (requant rollback --to VERSION)")


def record_candidates(run: RunState) -> None:
    """Every candidate as an MLflow run with its model; the Pareto front; the QAT attempt; the winner registered."""
    tracker, parent_id, reference = run.tracker, run.parent_id, run.reference
    with run.clock.phase("track"):
        run.model_uris = record.log_candidates(tracker, parent_id, run.measured, reference, run.evaluation,
                                               run.calibration, run.data, run.key, run.decision)
        tracker.log_metrics(parent_id, {f"fp32_reference_{k}": v for k, v in reference.quality.as_dict().items()},
                            dataset=("evaluation", run.data.evaluation_md5[:36]))
        record.log_pareto(tracker, parent_id, run.measured, run.decision, run.settings, reference, run.work_dir)
        record.log_qat(tracker, parent_id, run.escalation, reference.card.labels, run.key)
    if run.decision.promote:
        with run.clock.phase("select"):
            # Registered now, but the alias moves only after the decision is on record.
            run.promoted_version = tracker.register_winner(
                run.model_uris[run.winner.built.name],
                _version_tags(run.winner, run.key, run.source, run.data, parent_id, run.profile.name), run.project / ".requant",
                broken={run.production_broken.version} if run.production_broken else set())


def record_decision(run: RunState) -> None:
    """decision.json, the report, the run's and version's descriptions, the Prefect artifacts, then the
    run's tags: the decision record first, the alias last (a kill in between leaves a recorded decision
    whose promotion the next run completes or redoes, never an alias without a decision)."""
    settings, decision, measured, tracker = run.settings, run.decision, run.measured, run.tracker
    analysis = analyse(measured, decision, run.profile, time.perf_counter() - run.started,
                       _priced_from(settings, run) if run.served else "batched in-process throughput")
    run.table = render_table(candidate_rows(measured, decision))
    alias = settings.registry.promotion_alias()  # production, or challenger with registry.rollout: challenger
    run.decided = {**decision.as_dict(), "outcome": run.outcome, "promoted_version": run.promoted_version,
                   "promoted_alias": alias if run.promoted_version else None,
                   "decision_key": run.key, "serving_model": settings.registry.serving_model_name,
                   "hardware_profile": run.profile.name, "host": run.host, "search": run.search_record,
                   "fleet": run.fleet,
                   "flow_pid": os.getpid(), "confirmation": run.confirmation,
                   "hard_slice_intents": run.reference.hard_classes,
                   "cost_analysis": analysis.as_dict(), "qat": run.escalation.record(decision),
                   "pricing": {"price_from": settings.serving.price_from,
                               "served": {name: c.as_dict() for name, c in run.served.items()},
                               "candidates": {m.built.name: m.served_price.as_dict() for m in measured if m.served_price}},
                   "production_broken": str(run.production_broken) if run.production_broken else None,
                   "screening": screening_record(measured, settings.evaluate, run.speed),
                   "rows": {"selection": len(run.reference.y_true),
                            "confirmation": len(run.reference.confirmation.y_true) if run.reference.confirmation else 0},
                   "candidates": {m.built.name: candidate_record(m, run.reference) for m in measured}}
    # With a fleet, the fleet's part holds every profile's table, the chosen one's included.
    run.report = "\n\n".join([*([run.fleet_report] if run.fleet else [run.table]),
                               render_decision(decision, measured, run.confirmation),
                               "cost analysis:\n" + render_cost(analysis),
                               f"quantization-aware fine-tuning: {run.decided['qat']['outcome']}"])
    with run.clock.phase("track"):
        tracker.log_dict(run.parent_id, run.decided, track.DECISION_FILE)
        tracker.client.log_text(run.parent_id, run.report, "report.txt")
        summary_md = "\n\n".join([*([f"**Instance type:** {run.fleet['choice']['move']}"] if run.fleet else []),
                                   decision_markdown(decision, measured, run.outcome, render_cost(analysis),
                                                     run.confirmation, run.promoted_version,
                                                     settings.registry.serving_model_name),
                                   qat.render_markdown(run.decided["qat"])])
        tracker.describe_run(run.parent_id, summary_md)
        tracker.client.log_text(run.parent_id, summary_md, DECISION_MARKDOWN)
        publish_decision(measured, decision, summary_md, run.fleet_rows)
        if run.promoted_version:
            tracker.describe_version(run.promoted_version,
                                     record.version_markdown(tracker, run.parent_id, decision, analysis))
    tag_decided(run, decision.winner, alias)


def promote(run: RunState) -> None:
    """Move the alias (production, or challenger) to the registered winner, read it back, describe the model."""
    move_promoted_alias(run, lambda alias: run.tracker.describe_serving_model(record.serving_model_markdown(
        run.tracker, run.parent_id, run.source, run.decision, run.promoted_version, run.settings, alias)))


def tag_decided(run: RunState, winner: str | None, alias: str) -> None:
    """The parent run's decision tags (both paths); a promotion is "pending" until the alias has moved."""
    run.tracker.set_tags(run.parent_id, {track.TAG_KEY: run.key, track.TAG_OUTCOME: run.outcome,
                                         "requant.winner": winner or "",
                                         **({track.TAG_PROMOTED_VERSION: run.promoted_version,
                                             track.TAG_PROMOTED_ALIAS: alias,
                                             track.TAG_PROMOTION: "pending"} if run.promoted_version else {})})


def move_promoted_alias(run: RunState, describe: Callable[[str], None] | None = None) -> None:
    """Move the alias to the registered winner, if any, and mark the promotion done (then `describe(alias)`);
    log the run's phase times either way (both paths)."""
    settings, tracker = run.settings, run.tracker
    if run.promoted_version:
        alias = settings.registry.promotion_alias()
        with run.clock.phase("select"):
            tracker.move_alias(run.promoted_version, run.project / ".requant", alias=alias)
            tracker.set_tags(run.parent_id, {track.TAG_PROMOTION: "done"})
            log.info("alias %s@%s -> version %s", settings.registry.serving_model_name, alias, run.promoted_version)
            if describe is not None:
                describe(alias)
    tracker.log_metrics(run.parent_id, {f"phase_{k}_seconds": v for k, v in run.clock.seconds.items()})


def _select(run: RunState):
    return select_measured(run.measured, run.reference, run.settings.quality_bar)


def publish_decision(measured: list[MeasuredCandidate], decision, summary_markdown: str,
                     fleet_rows: list[dict] | None = None) -> None:
    """The decision as Prefect artifacts on this flow run: the candidate table, the summary and, with a
    fleet, one row per (profile, candidate)."""
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
    if fleet_rows:
        create_table_artifact(fleet_rows, key="requant-fleet", description="requant: every candidate on every instance type")


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
            running[build_one.submit(specs[i], reference, source_digest, work_dir)] = i
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
            by_hash[digest] = score(build_one(spec, reference, source_digest, work_dir), reference, settings.evaluate,
                                    settings.quality_bar, scores)
        return by_hash[digest]

    result = search_kept_fp32(
        rank_groups_lazily, settings.search.base_config, measure_spec,
        passes=lambda m: passes_quality(m, reference, settings.quality_bar),
        budget=Budget(max_trials=settings.search.max_trials, max_seconds=settings.search.max_minutes * 60))
    log.info("search: %s; best k=%s", result.record["stop_reason"], result.record["best_k"])
    return result


def _where_priced(settings: Settings, profile) -> dict[str, str | float]:
    """The parent run's params on pricing: the fleet's profiles, or the one profile this host stands for."""
    if settings.cost.fleet:
        return {"fleet": ",".join(settings.cost.fleet)}
    return {"hardware_profile": profile.name, "usd_per_hour": profile.usd_per_hour}


def _priced_from(settings: Settings, run: RunState) -> str:
    where = f"on {run.profile.name}'s own worker (cost.fleet)" if run.fleet else "on this host"
    return (f"served capacity: requests/s at p95 <= {slo_ms(settings.loadtest, settings.quality_bar):.0f} ms, "
            f"{settings.loadtest.texts_per_request} text(s) per request, through the served model {where} "
            "(winner, production and FP32 load-tested; the others through the served/batched ratio of the nearest)")


def _fetch_production(tracker: Tracker, parent_id: str, work_dir: Path):
    """(production version, None), or (None, the ProductionBroken error) when the version behind the alias is broken.

    A broken production is said in one line, recorded on the run (tag requant.production_broken) and
    not measured: the run then promotes a winner if one passes, and fails loudly otherwise.
    """
    try:
        return tracker.fetch_production(work_dir / "production"), None
    except track.ProductionBroken as exc:
        log.error("%s; it is not kept: a passing winner replaces it", exc)
        tracker.set_tags(parent_id, {track.TAG_PRODUCTION_BROKEN: str(exc)[:5000]})
        return None, exc


def _version_tags(winner: MeasuredCandidate, key: str, source, data, parent_id: str, instance_type: str) -> dict[str, str]:
    return {
        track.TAG_INSTANCE_TYPE: instance_type,
        track.TAG_MODEL_SHA256: winner.built.model_sha256, track.TAG_PARENT_RUN: parent_id,
        "requant.precision": winner.built.precision,
        track.TAG_KEY: key, track.TAG_SOURCE_URI: source.uri, track.TAG_SOURCE_VERSION: str(source.version or ""),
        track.TAG_SOURCE_DIGEST: source.digest, track.TAG_RECIPE: winner.built.recipe,
        track.TAG_CANDIDATE: winner.built.name, track.TAG_CONFIG_HASH: winner.built.config_hash,
        track.TAG_DATA_VERSION: data.version, track.TAG_ACCURACY: f"{winner.quality.accuracy:.6f}",
        track.TAG_MONTHLY_COST: f"{winner.cost.monthly_cost_usd:.2f}",
        "requant.priced_from": winner.served_price.describe() if winner.served_price else "batched in-process throughput",
    }
