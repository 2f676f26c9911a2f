"""The fleet step of the requantize flow (cost.fleet): after quality is scored once here, each
profile's worker times and load-tests the contenders on its own machine, each profile decides on its
own figures, and the cheapest (candidate, profile) pair becomes the run's decision.

price_on_fleet replaces select and price_served; confirm, record and promote then work on the
chosen profile's figures as on a single host's.
"""

from __future__ import annotations

import logging
import shutil

from flows.fleet import measure_fleet
from flows.run_state import RunState
from tasks import track
from tasks.data.prepare import TEXT
from tasks.decide.decision import passes_quality, select_measured
from tasks.evaluate.candidates import MeasuredCandidate, files_to_serve
from tasks.fleet.choice import ProfileOutcome, choose_pair, decide_on_profile, priced_on
from tasks.fleet.report import fleet_metrics, fleet_rows, render_fleet
from tasks.fleet.request import (
    FEEDS_FILE,
    MeasurementRequest,
    RequestedCandidate,
    write_request,
)
from tasks.measure.loadtest import slo_ms
from tasks.recipes.base import is_baseline

log = logging.getLogger("requant")


def price_on_fleet(run: RunState) -> None:
    """Measure on every profile of cost.fleet, decide per profile, choose the cheapest pair (see tasks/fleet/choice.py)."""
    settings = run.settings
    profiles = settings.cost.fleet_profiles()
    folder = run.work_dir / "fleet" / run.parent_id
    with run.clock.phase("fleet"):
        sent = [m for m in run.measured if _to_measure(m)]
        request = MeasurementRequest(
            run_id=run.parent_id,
            candidates=[_requested(m, files_to_serve(m, run.reference, run.production), run) for m in sent],
            evaluate=settings.evaluate.model_dump(mode="json"), loadtest=settings.loadtest.model_dump(mode="json"),
            serving=settings.serving.model_dump(mode="json"), traffic=settings.cost.traffic.model_dump(mode="json"),
            target_ms=slo_ms(settings.loadtest, settings.quality_bar), price_from=settings.serving.price_from,
            texts=run.evaluation[TEXT].tolist())
        path = write_request(folder, request, run.reference.latency_feeds, run.reference.throughput_feeds)
        log.info("fleet: %d candidates to measure on %s", len(sent), ", ".join(p.name for p in profiles))
        answers = measure_fleet(profiles, path, request.result_path, settings.cost.fleet_timeout_minutes * 60,
                                settings.cost.fleet_parallel)
        (folder / FEEDS_FILE).unlink(missing_ok=True)  # the answers and the request stay, as the record
    with run.clock.phase("select"):
        outcomes = []
        for profile in profiles:
            answer = answers[profile.name]
            outcome = ProfileOutcome(profile, answer.not_measured_because, answer.measurement,
                                     wall_seconds=answer.wall_seconds)
            if outcome.measured:
                outcome.candidates = priced_on(run.measured, answer.measurement, profile, settings.cost.traffic)
                decide_on_profile(outcome, run.reference, settings.quality_bar)
            outcomes.append(outcome)
        incumbent = run.production.tags.get(track.TAG_INSTANCE_TYPE) if run.production else None
        choice = choose_pair(outcomes, incumbent)
        log.info("fleet: %s; %s", choice.summary, choice.move)
        chosen = next((o for o in outcomes if choice.pair and o.profile.name == choice.pair.profile), None)
        if chosen is not None:
            run.measured, run.decision, run.profile = chosen.candidates, chosen.decision, chosen.profile
            run.served = chosen.measurement.served
        else:  # nothing to rank: every candidate is unmeasured here, and nothing is promoted
            run.decision = select_measured(run.measured, run.reference, settings.quality_bar)
            run.decision.summary = f"no instance type chosen: {choice.summary}"
        for m in run.measured:
            m.fleet_metrics = fleet_metrics(m.built.name, outcomes)
        run.fleet = {"profiles": [o.as_dict() for o in outcomes], "choice": choice.as_dict(),
                     "request": str(path), "measured_any": any(o.measured for o in outcomes)}
        run.fleet_outcomes, run.fleet_choice = outcomes, choice
        run.fleet_report = render_fleet(outcomes, choice)
        run.fleet_rows = fleet_rows(outcomes)
    run.tracker.set_tags(run.parent_id, {
        "requant.hardware_profile": run.profile.name if chosen else "", "requant.fleet_move": choice.move,
        **{f"fleet.{o.profile.name}.{key}": value for o in outcomes if o.measured
           for key, value in o.measurement.host.items() if key in HOST_TAGS},
        **{f"fleet.{o.profile.name}.not_measured": (o.not_measured_because or "")[:5000]
           for o in outcomes if not o.measured}})
    shutil.rmtree(folder / "scratch", ignore_errors=True)


HOST_TAGS = ("cpu_model", "cpu_flags", "cpu_count", "cores_available", "onnxruntime")


def _to_measure(m: MeasuredCandidate) -> bool:
    """Scored, and not marked untimed for failing the bar (time_passing; production and FP32 never are)."""
    return not (m.error or m.quality is None or m.deferred or m.screened_out or m.untimed_because)


def _requested(m: MeasuredCandidate, files, run: RunState) -> RequestedCandidate:
    passes = passes_quality(m, run.reference, run.settings.quality_bar)
    common = {"name": m.built.name, "model_path": str(m.built.model_path), "passes_bar": passes,
              "is_production": m.built.is_production, "is_baseline": is_baseline(m.built)}
    if isinstance(files, str):
        return RequestedCandidate(**common, unservable_because=files)
    return RequestedCandidate(**common, served={"onnx_model": str(files.onnx_model), "tokenizer": str(files.tokenizer),
                                                "card": str(files.card), "kind": files.kind})


def production_stays(run: RunState) -> None:
    """The chosen pair's candidate is not promoted (not confirmed, rolled back, or production itself):
    production keeps serving, so where it goes is production's own cheapest pair, not the winner's."""
    production = next((m.built.name for m in run.measured if m.built.is_production), None)
    if run.fleet is None or production is None:
        return
    choice = choose_pair(run.fleet_outcomes, run.fleet_choice.incumbent, candidate=production)
    run.fleet["choice"]["production"] = choice.as_dict()
    run.fleet["choice"]["move"] = choice.move
    run.fleet_choice.production_move = choice.move
    run.fleet_report = render_fleet(run.fleet_outcomes, run.fleet_choice)
    run.tracker.set_tags(run.parent_id, {"requant.fleet_move": choice.move})
    log.info("fleet: nothing replaces production: %s (%s)", choice.move, choice.summary)
