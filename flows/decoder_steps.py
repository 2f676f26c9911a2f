"""The decoder path of the requantize flow: the same card for a causal language model, judged on
held-out text and generation instead of labels.

text_data -> (already decided?) -> reference -> build -> score -> time -> select -> record -> promote

It shares the run's state, its parent MLflow run, lock, content-addressed builds and registry
moves with the classifier path (flows/steps.py); what differs is the data (documents, not labelled
rows), the gate (perplexity, token agreement, KL and greedy answers against FP32), the speed (time
to first token and decode tokens/s) and the price (per request and per million generated tokens).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows import record
from flows.run_state import RunState, RunSummary
from flows.steps import (
    DECISION_MARKDOWN,
    _build_all,
    _fetch_production,
    build_one,
    move_promoted_alias,
    tag_decided,
)
from tasks import track
from tasks.build.decoder_reference import prepare_decoder_reference
from tasks.build.preflight import check_data_for
from tasks.config.settings import CandidateSpec
from tasks.core.errors import RequantError
from tasks.core.hashing import sha256_of
from tasks.core.locking import exclusive
from tasks.data.text import read_documents
from tasks.decide.decision import production_candidate
from tasks.decide.decoder_report import decoder_markdown, render_decoder_table
from tasks.decide.decoder_selection import select_decoder
from tasks.decide.mixed_search import search_kept_fp32
from tasks.decide.search import Budget
from tasks.evaluate.decoders import (
    DecoderCandidate,
    price_decoders,
    score_decoders,
    time_decoders,
)
from tasks.evaluate.served_decoders import decoder_contenders, serve_and_price_decoders
from tasks.measure.lm_sensitivity import rank_decoder_groups
from tasks.measure.sensitivity import cached_ranking
from tasks.models.hf_causal_lm import read_source_note
from tasks.recipes.base import config_hash, parse_config, runtime_versions
from tasks.serve.front import generation_files_of_mlflow_model

log = logging.getLogger("requant")

score_all = task(score_decoders, name="evaluate-decoders", cache_policy=NO_CACHE)
time_all = task(time_decoders, name="timing-decoders", cache_policy=NO_CACHE)
serve_and_price = task(serve_and_price_decoders, name="served-capacity-decoders", cache_policy=NO_CACHE)


def requantize_decoder(run: RunState) -> RunSummary:
    """Requantize a causal language model: the decoder path's steps, in the card's order."""
    if run.settings.cost.fleet:
        raise RequantError("cost.fleet is not supported for text-generation models yet: measure a decoder on one "
                           "host (empty cost.fleet) and run it where that profile stands")
    text_data(run)
    if earlier := already_decided(run):
        return earlier
    reference(run)
    build(run)
    score(run)
    search(run)
    timing(run)
    select(run)
    price_served(run)
    record_decision(run)
    promote(run)
    return run.summary()


def text_data(run: RunState) -> None:
    """Held-out text (hash-checked), the decision key and the run's lock."""
    settings, source = run.settings, run.source
    check_data_for(run.family, settings)  # a scheduled run never passed the CLI's preflight
    text = settings.text_data
    with run.clock.phase("data"):
        run.evaluation = read_documents(text.evaluation_txt, text.evaluation_sha256)
        run.calibration = read_documents(text.calibration_txt, text.calibration_sha256)
        run.text_hashes = {"evaluation": sha256_of(text.evaluation_txt), "calibration": sha256_of(text.calibration_txt)}
    run.key = decoder_key(source.digest, run.text_hashes, settings, run.host, run.profile.name)
    run.tracker.set_tags(run.parent_id, {
        "mlflow.runName": f"requantize-{source.name or Path(source.uri).name}-v{source.version or 'local'}",
        track.TAG_SOURCE_URI: source.uri, track.TAG_SOURCE_VERSION: str(source.version or ""),
        track.TAG_SOURCE_DIGEST: source.digest, track.TAG_DATA_VERSION: run.text_hashes["evaluation"][:16],
        "requant.task": "text-generation",
    })
    with run.clock.phase("setup"):
        run.held.enter_context(exclusive(run.project / ".requant", f"requantize-{source.name or source.digest[:16]}",
                                         timeout_s=settings.operations.lock_timeout_minutes * 60))
    run.tracker.log_params(run.parent_id, {
        "source_uri": source.uri, "task": "text-generation", "hardware_profile": run.profile.name,
        "usd_per_hour": run.profile.usd_per_hour, **record.flat("lm_bar", settings.lm_quality_bar.model_dump()),
        **record.flat("traffic", settings.cost.traffic.model_dump()),
        **record.flat("text_data", {k: v for k, v in text.model_dump(mode="json").items() if k != "source_urls"}),
        **record.flat("generation", {k: v for k, v in settings.generation.model_dump().items() if k != "prompts"}),
        "candidates": ",".join(c.name for c in settings.quantize.candidates),
    })


def already_decided(run: RunState) -> RunSummary | None:
    """The earlier run's summary if this (model, text, params, host) was decided before (and not --force)."""
    from flows.steps import already_decided as classifier_already_decided

    return classifier_already_decided(run)


def reference(run: RunState) -> None:
    """FP32 exported with its KV cache and checked against PyTorch; the windows, prompts and FP32's greedy answers."""
    settings = run.settings
    text, generation = settings.text_data, settings.generation
    run.family.check_context(text.context_length)
    if generation.use_chat_template:
        run.family.check_chat_template()
    with run.clock.phase("evaluate"):
        run.decoder_reference = prepare_decoder_reference(
            run.family, run.evaluation[: text.documents * 4], run.calibration[: text.calibration_documents * 4],
            run.work_dir / "sources" / run.source.digest[:16], text, generation, settings.model.onnx_opset,
            settings.evaluate.intra_op_threads, settings.cost.traffic.output_tokens_per_request)
        run.decoder_reference.evaluation = run.decoder_reference.evaluation[: text.documents]
        run.tracker.log_dict(run.parent_id, run.decoder_reference.export_check, "fp32_export_check.json")


def build(run: RunState) -> None:
    """Every configured recipe run on the decoder graph, built in parallel and proven."""
    with run.clock.phase("quantize"):
        run.built = _build_all(run.settings, run.decoder_reference, run.source.digest, run.work_dir)


def score(run: RunState) -> None:
    """Production fetched as served; every candidate judged against FP32 on the same windows and prompts."""
    settings = run.settings
    with run.clock.phase("evaluate"):
        run.production, run.production_broken = _fetch_production(run.tracker, run.parent_id, run.work_dir)
        if run.production is not None:
            run.built.append(production_candidate(run.production))
        run.decoders = score_all(run.built, run.decoder_reference, settings.lm_quality_bar,
                                 settings.generation.max_new_tokens, settings.evaluate.intra_op_threads,
                                 settings.quality_bar.confidence, settings.quality_bar.bootstrap_samples)


def search(run: RunState) -> None:
    """The mixed-precision search, when on: the fewest most-sensitive blocks kept in FP32 with
    search.decoder_recipe elsewhere that pass the generation gate (blocks ranked only if k = 0 fails)."""
    settings, reference = run.settings, run.decoder_reference
    if not settings.search.enabled:
        return
    recipe, base = settings.search.decoder_recipe, settings.search.decoder_base_config
    by_hash = {c.built.config_hash: c for c in run.decoders}

    def measure_spec(spec: CandidateSpec) -> DecoderCandidate:
        digest = config_hash(spec.recipe, parse_config(spec.recipe, spec.config, spec.name), run.source.digest,
                             reference.inputs.calibration_digest())
        if digest not in by_hash:
            log.info("search trial %s", spec.name)
            built = build_one(spec, reference, run.source.digest, run.work_dir)
            by_hash[digest] = score_decoders([built], reference, settings.lm_quality_bar,
                                             settings.generation.max_new_tokens, settings.evaluate.intra_op_threads,
                                             settings.quality_bar.confidence, settings.quality_bar.bootstrap_samples)[0]
        return by_hash[digest]

    def ranking() -> list:
        identity = [run.source.digest, recipe, base, reference.inputs.calibration_digest(), runtime_versions()]
        return cached_ranking(run.work_dir / "sensitivity", identity, lambda: rank_decoder_groups(
            reference.inputs, recipe, base, run.work_dir / "sensitivity" / "scratch", settings.evaluate.intra_op_threads,
            progress=lambda i, n: log.info("block sensitivity %d/%d", i, n)))

    with run.clock.phase("search"):
        searched = search_kept_fp32(
            ranking, base, measure_spec, passes=lambda c: c.passed,
            budget=Budget(max_trials=settings.search.max_trials, max_seconds=settings.search.max_minutes * 60),
            recipe=recipe, quality_of=lambda c: c.quality.token_agreement if c.quality else float("nan"),
            quality_name="token_agreement")
        log.info("search: %s; best k=%s", searched.record["stop_reason"], searched.record["best_k"])
        run.search_record = searched.record
        known = {id(c) for c in run.decoders}
        run.decoders += [c for c in searched.measured if id(c) not in known]
        if searched.ranking is not None:
            record.log_sensitivity(run.tracker, run.parent_id, searched.ranking, run.work_dir)


def timing(run: RunState) -> None:
    """Passing candidates, FP32 and production timed in interleaved rounds, then priced."""
    settings = run.settings
    with run.clock.phase("evaluate"):
        time_all(run.decoders, run.decoder_reference, settings.generation, settings.evaluate.intra_op_threads)
        price_decoders(run.decoders, run.profile, settings.cost.traffic)


def select(run: RunState) -> None:
    """The cheapest candidate that passes the generation gate, speeds compared beyond their noise."""
    with run.clock.phase("select"):
        run.decoder_decision = select_decoder(run.decoders, run.settings.cost.traffic.output_tokens_per_request,
                                              run.settings.quality_bar.speed_noise_margin)
        decision = run.decoder_decision
        run.outcome = ("promoted" if decision.promote else "kept-production" if decision.winner
                       else "no-candidate-passed")
        if run.production_broken and not decision.promote:
            raise RequantError(f"{run.production_broken}, and no candidate replaces it ({decision.summary}): move "
                               "the production alias to a version that loads (requant rollback --to VERSION)")


def price_served(run: RunState) -> None:
    """Served capacity of the winner, production and FP32 (each request the traffic's output tokens), the
    rest through their served/in-process ratio; a different winner on served prices is served too, once."""
    settings = run.settings
    if settings.serving.price_from != "served" or run.decoder_decision.winner is None:
        return
    scratch = run.work_dir / "served" / run.parent_id  # the load driver's scratch files
    with run.clock.phase("serve"):
        for _ in range(2):
            to_test = decoder_contenders(run.decoders, run.decoder_decision.winner)
            if all(c.name in run.served for c in to_test):
                break
            serve_and_price(run.decoders, to_test, run.decoder_reference, settings.generation, settings.loadtest,
                            settings.serving, run.profile, settings.cost.traffic, settings.evaluate.intra_op_threads,
                            scratch, run.served, _production_files(run))
            select(run)
        shutil.rmtree(scratch, ignore_errors=True)


def _production_files(run: RunState):
    """Production's own graph, tokenizer and generator card, as downloaded from the registry (None: no production)."""
    model_dir = getattr(run.production, "model_dir", None)
    return generation_files_of_mlflow_model(model_dir) if model_dir else None


def record_decision(run: RunState) -> None:
    """Candidate runs with their metrics and served models, decision.json, the report, the registered winner."""
    settings, tracker, parent_id, decision = run.settings, run.tracker, run.parent_id, run.decoder_decision
    reference = run.decoder_reference
    with run.clock.phase("track"):
        uris = {}
        for c in run.decoders:
            b = c.built
            run_id = tracker.candidate_run(parent_id, b.name, {
                track.TAG_RECIPE: b.recipe, track.TAG_CANDIDATE: b.name, track.TAG_CONFIG_HASH: b.config_hash,
                "requant.precision": b.precision, "requant.parent_key": run.key,
                "requant.verdict": "winner" if b.name == decision.winner else "pass" if c.passed else "fail",
                "requant.reason": decision.reasons.get(b.name, c.reason)[:5000],
                "requant.is_production": str(b.is_production).lower(),
                **({track.TAG_FAILURE: c.error} if c.error else {}),
            }, start_time_ms=b.started_at_ms or None)
            tracker.log_params(run_id, {"precision": b.precision, "recipe": b.recipe, **record.flat("recipe", b.config)})
            tracker.log_metrics(run_id, {**c.metrics(), "is_winner": float(b.name == decision.winner)})
            if c.passed and b.model_path and not b.is_production:
                uris[b.name] = tracker.log_generation_model(run_id, b.model_path, reference.tokenizer_dir,
                                                            reference.card_path, b.name)
            tracker.finish(run_id, failed=bool(c.error))
        run.model_uris = uris
        if decision.promote:
            winner = next(c for c in run.decoders if c.name == decision.winner)
            run.promoted_version = tracker.register_winner(uris[winner.name], _version_tags(run, winner),
                                                           run.project / ".requant",
                                                           broken={run.production_broken.version}
                                                           if run.production_broken else set())
        alias = settings.registry.promotion_alias()
        # Weights de-quantized from a 4-bit GGUF flatter INT4 block 32: the table says so.
        flattered = str(read_source_note(run.source.folder).get("weights_quantization", "")).startswith("Q4")
        run.table = render_decoder_table(run.decoders, decision, flattered)
        run.report = "\n\n".join([run.table, f"decision: {decision.summary}"] +
                                 [f"  {name}: {why}" for name, why in decision.reasons.items()])
        run.decided = {**decision.as_dict(), "task": "text-generation", "outcome": run.outcome,
                       "promoted_version": run.promoted_version, "promoted_alias": alias if run.promoted_version else None,
                       "decision_key": run.key, "serving_model": settings.registry.serving_model_name,
                       "hardware_profile": run.profile.name, "host": run.host, "text": run.text_hashes,
                       "fp32_export_check": reference.export_check,
                       "documents": len(reference.evaluation), "prompts": len(reference.prompt_ids),
                       "production_broken": str(run.production_broken) if run.production_broken else None,
                       "served": {name: capacity.as_dict() for name, capacity in run.served.items()},
                       "search": run.search_record,
                       "candidates": {c.name: c.record() for c in run.decoders}}
        tracker.log_dict(parent_id, run.decided, track.DECISION_FILE)
        tracker.client.log_text(parent_id, run.report, "report.txt")
        summary_md = decoder_markdown(run.decoders, decision, run.outcome, run.promoted_version,
                                      settings.registry.serving_model_name)
        tracker.describe_run(parent_id, summary_md)
        tracker.client.log_text(parent_id, summary_md, DECISION_MARKDOWN)  # `requant report` renders it
        tag_decided(run, decision.winner, alias)


def promote(run: RunState) -> None:
    """Move the alias to the registered winner (the decision is on record first)."""
    move_promoted_alias(run)


def decoder_key(source_digest: str, text_hashes: dict[str, str], settings, host: dict[str, str], profile: str) -> str:
    """Identity of a decoder decision: same model, text, knobs, host and runtimes -> same key."""
    knobs = {name: getattr(settings, name).model_dump(mode="json")
             for name in ("quantize", "text_data", "generation", "lm_quality_bar", "cost")}
    knobs["noise_margin"] = settings.quality_bar.speed_noise_margin
    knobs["serving_model"] = settings.registry.serving_model_name
    where = {"cpu_model": host.get("cpu_model"), "cpu_flags": host.get("cpu_flags"), "cpu_count": host.get("cpu_count"),
             "profile": profile, "runtime": runtime_versions()}
    payload = json.dumps({"source": source_digest, "text": text_hashes, "knobs": knobs, "where": where}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _version_tags(run: RunState, winner) -> dict[str, str]:
    b = winner.built
    return {track.TAG_MODEL_SHA256: b.model_sha256, track.TAG_PARENT_RUN: run.parent_id, "requant.precision": b.precision,
            track.TAG_KEY: run.key, track.TAG_SOURCE_URI: run.source.uri,
            track.TAG_SOURCE_VERSION: str(run.source.version or ""), track.TAG_SOURCE_DIGEST: run.source.digest,
            track.TAG_RECIPE: b.recipe, track.TAG_CANDIDATE: b.name, track.TAG_CONFIG_HASH: b.config_hash,
            track.TAG_DATA_VERSION: run.text_hashes["evaluation"][:16], "requant.task": "text-generation",
            "requant.token_agreement": f"{winner.quality.token_agreement:.6f}",
            "requant.perplexity": f"{winner.quality.candidate_perplexity:.6f}",
            track.TAG_MONTHLY_COST: f"{winner.cost.monthly_cost_usd:.2f}",
            "requant.usd_per_million_tokens": f"{winner.usd_per_million_tokens:.4f}"}


