"""After the decision: load-test a served version, roll a challenger out, roll production back.

Wiring only, as in flows/requantize.py: the measuring and the rules are in tasks/measure/loadtest.py,
tasks/serve/rollout.py and tasks/serve/rollback.py, every MLflow call in tasks.track. Each step is a recorded
MLflow run (or metrics on the version's own run, for a load test), and none of them moves
production unless its rule says so.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasks import track
from tasks.config.loading import load_settings
from tasks.config.settings import Settings
from tasks.core.errors import RequantError
from tasks.data.prepare import LABEL, TEXT
from tasks.evaluate.served_decoders import (
    SLOWEST_START_RPS,
    WARMUP_REQUESTS,
    generation_params,
)
from tasks.measure import loadtest as load
from tasks.serve.front import served_files_of_mlflow_model, served_front
from tasks.serve.rollback import current_user
from tasks.serve.rollout import (
    ShadowResult,
    TrafficSample,
    judge_rollout,
    read_traffic,
    replay,
)
from tasks.serve.serving import BadRequest
from tasks.track import Tracker


def _lock_dir(params_path: str) -> Path:
    # The same lock folder the flow uses (PROJECT/.requant), so an alias never moves under a promotion.
    return Path(params_path).resolve().parent / ".requant"


def _sample(settings: Settings, path: str | None, text_column: str | None, label_column: str | None,
            max_rows: int) -> TrafficSample:
    """The traffic sample: the CSV given, else the prepared evaluation set."""
    source = Path(path) if path else settings.data.output_dir / "evaluation.csv"
    texts = [text_column] if text_column else [TEXT, settings.data.text_column]
    labels = [label_column] if label_column else [LABEL, settings.data.label_column]
    return read_traffic(source, texts, labels, max_rows)


def _version(tracker: Tracker, which: str):
    """A serving-model version by number, or by alias name."""
    if which.isdigit():
        return tracker.serving_version(which)
    found = tracker.version_by_alias(which)
    if found is None:
        raise RequantError(f"{tracker.settings.serving_model_name}@{which} is not set: run `requant run` first, "
                           "or pass --version with an existing version number")
    return found


@dataclass
class LoadtestOutcome:
    """What `requant loadtest` measured and where it is recorded."""

    version: str
    run_id: str
    result: load.LoadtestResult
    comparison: load.CapacityComparison
    report: str


def loadtest_version(params_path: str, which: str = "production", sample: str | None = None, reprice: bool = False,
                     overrides: dict | None = None) -> LoadtestOutcome:
    """Serve a version, ramp the load until p95 misses the target, and record capacity vs the cost model.

    Args:
        params_path: params.yaml (sections loadtest, quality_bar, cost, registry).
        which: a version number, or an alias (production, challenger).
        sample: CSV of texts for the request bodies; default the prepared evaluation set.
        reprice: price the served capacity with tasks/measure/cost.py and record it on the version.
        overrides: loadtest settings to override (e.g. max_requests), for a shorter test.
    """
    settings = load_settings(params_path)
    knobs = settings.loadtest.model_copy(update=overrides or {})
    tracker = Tracker(settings.registry)
    version = _version(tracker, which)
    generates = version.tags.get("requant.task") == "text-generation"
    params = None
    if generates:  # a decoder: one prompt per request, each the traffic's output tokens exactly
        # A decoder's params have no `data` section to name the columns: a --sample CSV has a `text` column.
        texts = (_sample(settings, sample, TEXT, LABEL, max_rows=5000).texts if sample
                 else list(settings.generation.prompts))
        params = generation_params(settings.cost.traffic)
        knobs = _decoder_knobs(knobs, settings, tracker.version_run_metrics(version), overrides or {})
        target_ms = knobs.slo_p95_ms or settings.generation.slo_p95_ms
    else:
        texts = _sample(settings, sample, None, None, max_rows=5000).texts
        target_ms = load.slo_ms(knobs, settings.quality_bar)
    with tempfile.TemporaryDirectory(prefix="requant-loadtest-") as work, \
            _served(tracker, settings, knobs, str(version.version), Path(work)) as (url, pid):
        load.check_answers(url, texts, params)
        result = load.run_ramp(url, pid, texts, knobs, target_ms, Path(work) / "load", params,
                               SLOWEST_START_RPS if generates else None)
    profile = traffic = None
    if reprice:
        from tasks.measure.timing import cpu_info

        profile, traffic = settings.cost.host_profile(cpu_info()["cpu_model"]), settings.cost.traffic
    comparison = load.compare_with_cost_model(result, tracker.version_run_metrics(version), dict(version.tags),
                                              profile, traffic)
    report = load.render(result, comparison, str(version.version))
    if generates:
        tokens = settings.cost.traffic.output_tokens_per_request
        report += (f"\nserved output tokens/s: {result.capacity_rps * tokens:.1f} at the low end "
                   f"({tokens} tokens per request, cost.traffic.output_tokens_per_request)")
    # On the candidate run that logged the version, beside the throughput the flow priced it on.
    run_id = version.run_id
    if not run_id:
        with tracker.operation_run("loadtest", f"loadtest-v{version.version}", {}) as run_id:
            pass
    tracker.log_metrics(run_id, {**result.metrics(), **comparison.metrics()})
    tracker.log_dict(run_id, {"version": str(version.version), "result": result.as_dict(),
                              "assumed_sentences_per_s": comparison.assumed_sentences_per_s,
                              "served_cost": comparison.served_cost.as_dict() if comparison.served_cost else None,
                              "settings": knobs.model_dump()}, "loadtest.json")
    tags = {"requant.loadtest_capacity_rps": f"{result.capacity_rps:.2f}",
            "requant.loadtest_capacity_high_rps": f"{result.capacity_high_rps:.2f}" if result.capacity_high_rps else "",
            "requant.loadtest_slo_p95_ms": f"{target_ms:g}", "requant.loadtest_front": knobs.front}
    if comparison.served_cost:
        tags["requant.served_monthly_cost_usd"] = f"{comparison.served_cost.monthly_cost_usd:.2f}"
    tracker.set_version_tags(str(version.version), tags)
    return LoadtestOutcome(str(version.version), run_id, result, comparison, report)


def served_version_files(params_path: str, which: str, work: Path):
    """(the served files of a serving-model version downloaded from the registry, its number), for `requant serve-model`.

    Raises:
        RequantError: no such version or alias, or the version is not a requant text-in serving model.
    """
    settings = load_settings(params_path)
    tracker = Tracker(settings.registry)
    version = str(_version(tracker, which).version)
    try:
        return served_files_of_mlflow_model(tracker.download_version(version, work / "model")), version
    except BadRequest as exc:
        raise RequantError(f"version {version} cannot be served by requant's front ({exc}): serve it with "
                           "`mlflow models serve`") from exc


def _decoder_knobs(knobs, settings: Settings, run_metrics: dict[str, float], overrides: dict):
    """Load-test settings for a decoder: requests take seconds, so steps and the budget are as long as the flow's
    served measurement at least, warm-up shorter, and the ramp starts below the rate the decision priced the
    version on (not at loadtest.start_rps). Options given on the command line win."""
    priced = run_metrics.get("priced_requests_per_s")
    update = {"step_seconds": max(knobs.step_seconds, settings.generation.served_step_seconds),
              "max_seconds": max(knobs.max_seconds, settings.generation.served_max_seconds),
              "warmup_requests": min(knobs.warmup_requests, WARMUP_REQUESTS)}
    if priced:
        update["start_rps"] = max(SLOWEST_START_RPS, 0.8 * priced)
    return knobs.model_copy(update={**update, **overrides})


def _served(tracker: Tracker, settings, knobs, version: str, work: Path):
    """The version served as loadtest.front says: requant's front on its registry download, or `mlflow models serve`."""
    if knobs.front == "mlflow":
        return load.served_model(f"models:/{settings.registry.serving_model_name}/{version}", tracker.uri,
                                 knobs.server_workers, knobs.server_start_timeout_s)
    try:
        files = served_files_of_mlflow_model(tracker.download_version(version, work / "model"))
    except BadRequest as exc:
        raise RequantError(f"version {version} cannot be served by requant's front ({exc}); "
                           "set loadtest.front: mlflow") from exc
    return served_front(files, knobs.server_start_timeout_s)


@dataclass
class RolloutOutcome:
    """What `requant rollout` compared and decided."""

    production_version: str
    challenger_version: str
    flipped: bool
    reason: str
    run_id: str
    result: ShadowResult


def _labels_of(model):
    """A pyfunc serving model as a texts -> labels function (a list of answers, or a DataFrame from
    versions logged before the served model took type hints)."""
    def labels(texts):
        answers = model.predict(pd.DataFrame({TEXT: list(texts)}))
        return answers["label"].tolist() if isinstance(answers, pd.DataFrame) else [a["label"] for a in answers]

    return labels


def rollout(params_path: str, sample: str | None = None, text_column: str | None = None,
            label_column: str | None = None) -> RolloutOutcome:
    """Replay a traffic sample through production and challenger; flip production if the challenger holds the bar.

    Raises:
        RequantError: no production or no challenger, both the same version, or a bad sample.
    """
    settings = load_settings(params_path)
    tracker = Tracker(settings.registry)
    name, registry = settings.registry.serving_model_name, settings.registry
    production, challenger = tracker.production(), tracker.challenger()
    if challenger is None:
        raise RequantError(f"{name}@{registry.challenger_alias} is not set: set registry.rollout: challenger in "
                           "params.yaml and run `requant run`")
    if production is None:
        return _first_production(tracker, str(challenger.version), params_path)
    if str(challenger.version) == str(production.version):
        raise RequantError(f"{name}@{registry.challenger_alias} and @{registry.production_alias} are both version "
                           f"{production.version}: there is nothing to roll out")
    if challenger.tags.get("requant.task") == "text-generation":
        raise RequantError(f"{name}@{registry.challenger_alias} is a text-generation model: a shadow rollout "
                           "compares labels, which generated text has none of; set registry.rollout: direct "
                           "for decoders (the flow's generation gate decides)")
    traffic = _sample(settings, sample, text_column, label_column, settings.rollout.max_rows)
    with tracker.operation_run("rollout", f"rollout-v{production.version}-vs-v{challenger.version}", {
            "requant.production_version": str(production.version),
            "requant.challenger_version": str(challenger.version)}) as run_id:
        tracker.log_params(run_id, {"sample": traffic.source, "rows": len(traffic.texts),
                                    "labelled": traffic.labels is not None, **settings.rollout.model_dump(),
                                    "max_relative_accuracy_loss": settings.quality_bar.max_relative_accuracy_loss})
        result = replay(_labels_of(tracker.load_served_model(str(production.version))),
                        _labels_of(tracker.load_served_model(str(challenger.version))), traffic,
                        settings.rollout.batch_size)
        verdict = judge_rollout(result, settings.rollout.min_agreement, settings.quality_bar.max_relative_accuracy_loss)
        tracker.log_metrics(run_id, result.metrics())
        tracker.log_dict(run_id, {"result": result.metrics(), "flip": verdict.flip, "reason": verdict.reason,
                                  "production_version": str(production.version),
                                  "challenger_version": str(challenger.version)}, "rollout.json")
        tracker.set_tags(run_id, {"requant.rollout_outcome": "flipped" if verdict.flip else "not-flipped",
                                  "requant.rollout_reason": verdict.reason})
        tracker.set_version_tags(str(challenger.version), {"requant.shadow_run": run_id,
                                                           "requant.shadow_agreement": f"{result.agreement:.4f}"})
        if verdict.flip:
            tracker.flip_to_challenger(str(challenger.version), run_id, _lock_dir(params_path))
    return RolloutOutcome(str(production.version), str(challenger.version), verdict.flip, verdict.reason, run_id, result)


def _first_production(tracker: Tracker, challenger: str, params_path: str) -> RolloutOutcome:
    """No production yet: nothing to shadow against, so the challenger becomes the first production (recorded)."""
    reason = "no production version to compare with: the challenger becomes the first production"
    with tracker.operation_run("rollout", f"rollout-first-v{challenger}", {"requant.challenger_version": challenger}) as run_id:
        tracker.set_tags(run_id, {"requant.rollout_outcome": "flipped", "requant.rollout_reason": reason})
        tracker.flip_to_challenger(challenger, run_id, _lock_dir(params_path))
    empty = ShadowResult(0, 1.0, None, None, None, 0.0, 0.0, 0.0, 0.0, 0)
    return RolloutOutcome("none", challenger, True, reason, run_id, empty)


def rollback(params_path: str, reason: str, to_version: str | None = None) -> dict[str, str]:
    """Move production back to `to_version` (default: the version it replaced), recorded with who, when and why.

    Raises:
        RequantError: no reason, no production, no earlier version, or `to_version` unknown or already production.
    """
    if not reason or not reason.strip():
        raise RequantError("a rollback needs a reason: pass --reason \"what went wrong\"")
    settings = load_settings(params_path)
    tracker = Tracker(settings.registry)
    name = settings.registry.serving_model_name
    current = tracker.production()
    if current is None:
        raise RequantError(f"{name}@{settings.registry.production_alias} is not set: there is nothing to roll back")
    target = str(tracker.serving_version(to_version).version) if to_version else tracker.rollback_target(current)
    if target is None:
        raise RequantError(f"{name} has no earlier version to roll back to from version {current.version}: "
                           "pass --to VERSION")
    if target == str(current.version):
        raise RequantError(f"version {target} is already {name}@{settings.registry.production_alias}: pass another --to")
    user = current_user()
    run_id = tracker.record_rollback(str(current.version), target, reason.strip(), user, _lock_dir(params_path))
    return {"from": str(current.version), "to": target, "by": user, "run_id": run_id,
            "decision_key": current.tags.get(track.TAG_KEY, "")}
