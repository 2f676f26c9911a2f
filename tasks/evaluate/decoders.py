"""Decoder candidates evaluated: quality against FP32 on the same windows and prompts, speed of
prefill and decode with the KV cache, and the price of the generated tokens.

Quality. Every evaluation window runs through FP32 once and through every candidate; per document
the next-token log-likelihoods, top-1 agreement and KL(FP32 || candidate) are summed
(tasks/measure/lm_quality.py), and the gate takes the conservative end of each paired interval
over documents. Greedy answers to fixed prompts are compared with FP32's.

Speed. Candidates are timed in interleaved rounds (each round times every candidate once), so a
disturbance of the host hits all alike: time to first token (prefill of `generation.prompt_tokens`
tokens) at batch 1, and decode tokens/s at batch 1 and at `generation.concurrency` sequences.

Price. One instance serving `concurrency` requests at a time finishes a request every
TTFT + output_tokens / (decode tokens/s per sequence at that concurrency) seconds per slot; that
in-process capacity (requests/s) prices the traffic in instances (tasks/measure/cost.py), and the
dollars per million generated tokens follow from the instance's price and its tokens/s. With
`serving.price_from: served` the flow then replaces it with the served price
(tasks/evaluate/served_decoders.py) and keeps this one as `inprocess_cost`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from tasks.build.candidates import BuiltCandidate, one_line
from tasks.build.decoder_reference import DecoderReference
from tasks.config.settings import (
    GenerationSettings,
    HardwareProfile,
    LmQualityBar,
    TrafficSettings,
)
from tasks.measure.cost import CostEstimate, monthly_cost
from tasks.measure.lm_quality import (
    DocumentScores,
    GreedyAgreement,
    LmBar,
    LmQuality,
    greedy_agreement,
    judge_lm,
    score_window,
    summarise,
)
from tasks.measure.served_pricing import ServedPrice
from tasks.models.graph import onnx_session
from tasks.models.hf_causal_lm import window_feed

log = logging.getLogger("requant")


@dataclass
class DecoderSpeed:
    """Per-round timings of one decoder candidate and their robust summaries."""

    ttft_ms: list[float] = field(default_factory=list)  # prefill of the timing prompt, batch 1
    decode_tps_1: list[float] = field(default_factory=list)  # generated tokens/s, one sequence
    decode_tps_c: list[float] = field(default_factory=list)  # generated tokens/s, `concurrency` sequences together
    concurrency: int = 1

    def low(self, values: list[float], q: float = 0.25) -> float:
        """The robust low end of a speed (q25 over rounds): prices hold at the slow end of the noise."""
        return float(np.quantile(values, q)) if values else float("nan")

    def capacity_rps(self, output_tokens: int, q: float = 0.25) -> float:
        """Requests/s one instance completes at the configured concurrency."""
        ttft_s = float(np.quantile(self.ttft_ms, 1 - q)) / 1000  # the slow end of TTFT
        per_sequence = self.low(self.decode_tps_c, q) / self.concurrency
        return self.concurrency / (self.concurrency * ttft_s + output_tokens / per_sequence)

    def as_dict(self) -> dict[str, float]:
        """Flat figures for MLflow and the decision record."""
        return {"ttft_ms": float(np.median(self.ttft_ms)), "decode_tokens_per_s_batch1": float(np.median(self.decode_tps_1)),
                "decode_tokens_per_s_concurrent": float(np.median(self.decode_tps_c)),
                "decode_tokens_per_s_concurrent_low": self.low(self.decode_tps_c), "concurrency": self.concurrency,
                "timing_rounds": len(self.ttft_ms)}


@dataclass
class DecoderCandidate:
    """A built decoder candidate with its quality, speed and price, or why it has none."""

    built: BuiltCandidate
    quality: LmQuality | None = None
    greedy: GreedyAgreement | None = None
    passed: bool = False
    reason: str = ""
    speed: DecoderSpeed | None = None
    cost: CostEstimate | None = None  # the price ranked on: served where measured (served_price says how)
    usd_per_million_tokens: float | None = None
    error: str | None = None
    served_price: ServedPrice | None = None  # which figure `cost` comes from, once served prices are in
    inprocess_cost: CostEstimate | None = None  # the in-process price, kept beside the served one

    def inprocess_capacity_rps(self, traffic: TrafficSettings) -> float:
        """Requests/s one instance completes in process at the configured concurrency (the slow end of the noise)."""
        return self.speed.capacity_rps(traffic.output_tokens_per_request)

    @property
    def name(self) -> str:
        return self.built.name

    def metrics(self) -> dict[str, float]:
        """Every number of this candidate, flat, for its MLflow run."""
        out: dict[str, float] = {"size_ratio_vs_fp32": self.built.size_ratio, "build_seconds": self.built.build_seconds,
                                 "passed_bar": float(self.passed)}
        if self.quality:
            out.update(self.quality.as_dict())
        if self.greedy:
            out.update(self.greedy.as_dict())
        if self.speed:
            out.update(self.speed.as_dict())
        if self.cost:
            out.update({"monthly_cost_usd": self.cost.monthly_cost_usd, "instances": self.cost.instances})
        if self.usd_per_million_tokens is not None:
            out["usd_per_million_output_tokens"] = self.usd_per_million_tokens
        if self.inprocess_cost:
            out["inprocess_monthly_cost_usd"] = self.inprocess_cost.monthly_cost_usd
        if self.served_price:
            out["priced_requests_per_s"] = self.served_price.sentences_per_s
            out["inprocess_requests_per_s"] = self.served_price.batched_sentences_per_s
            if self.served_price.ratio is not None:
                out["served_to_inprocess_ratio"] = self.served_price.ratio
            if self.served_price.capacity and not self.served_price.capacity.error:
                out["served_capacity_rps"] = self.served_price.capacity.capacity_rps
                if self.served_price.capacity.p95_ms is not None:
                    out["served_p95_ms"] = self.served_price.capacity.p95_ms
        return out

    def record(self) -> dict:
        """This candidate in decision.json."""
        return {"recipe": self.built.recipe, "precision": self.built.precision, "config": self.built.config,
                "config_hash": self.built.config_hash, "is_production": self.built.is_production,
                "error": self.error, "passed_bar": self.passed, "reason": self.reason, "metrics": self.metrics(),
                # Which figure the price comes from: served (its own load test), served-ratio, or in process.
                "priced_from": (self.served_price.as_dict() if self.served_price
                                else {"basis": "in-process"} if self.cost else None)}


def lm_bar(bar: LmQualityBar) -> LmBar:
    """The gate's thresholds from params.yaml's lm_quality_bar."""
    return LmBar(max_relative_perplexity_increase=bar.max_relative_perplexity_increase,
                 min_token_agreement=bar.min_token_agreement, max_mean_kl=bar.max_mean_kl,
                 min_greedy_agreement=bar.min_greedy_agreement)


def score_decoders(built: list[BuiltCandidate], reference: DecoderReference, bar: LmQualityBar, max_new_tokens: int,
                   threads: int, confidence: float = 0.95, resamples: int = 2000) -> list[DecoderCandidate]:
    """Judge every built candidate against FP32 on the evaluation windows and the prompts.

    FP32 runs each window once; every candidate that opens runs it after, so only one window's
    logits per model are in memory (a vocabulary of 49,152 makes a window's logits large).
    """
    out = [DecoderCandidate(b, error=b.error) for b in built]
    sessions = {}
    for c in out:
        if c.error is None:
            try:
                sessions[c.name] = onnx_session(c.built.model_path, threads)
            except Exception as exc:  # onnxruntime's own types
                c.error = one_line(exc)
    fp32 = onnx_session(reference.inputs.fp32_model, threads)
    documents = {name: [] for name in sessions}
    for doc in reference.evaluation:
        totals = {name: None for name in sessions}
        for window in doc.windows:
            feed = window_feed(fp32, window)
            ref = fp32.run(["logits"], feed)[0][0]
            for name, session in sessions.items():
                # Each graph gets the inputs it declares (onnxruntime-genai's takes no position_ids).
                cand = session.run(["logits"], window_feed(session, window))[0][0]
                scored = score_window(ref, cand, np.asarray(window))
                totals[name] = scored if totals[name] is None else totals[name] + scored
        for name, total in totals.items():
            documents[name].append(DocumentScores.from_windows(doc.title, [total]))
    gate = lm_bar(bar)
    for c in out:
        if c.name not in sessions:
            c.reason = f"failed: {c.error}"
            continue
        c.quality = summarise(documents[c.name], confidence=confidence, resamples=resamples)
        c.greedy = greedy_agreement(reference.greedy_ids, _greedy(c, reference, max_new_tokens))
        verdict = judge_lm(c.quality, c.greedy, gate)
        c.passed, c.reason = verdict.passed, verdict.reason
        log.info("%s: %s", c.name, c.reason)
    return out


def _greedy(c: DecoderCandidate, reference: DecoderReference, max_new_tokens: int) -> list[list[int]]:
    from tasks.serve.generation import TextGenerator

    generator = TextGenerator(c.built.model_path, reference.tokenizer_dir, reference.card_path, threads=1)
    try:
        return [generator.generate_ids([ids], max_new_tokens)[0] for ids in reference.prompt_ids]
    finally:
        generator.close()


def time_decoders(candidates: list[DecoderCandidate], reference: DecoderReference, generation: GenerationSettings,
                  threads: int) -> None:
    """Time every passing candidate (production and FP32 too; failing ones with generation.time_failing)
    in interleaved rounds, in place."""
    from tasks.serve.generation import TextGenerator

    timed = [c for c in candidates if c.error is None and (c.passed or c.built.recipe == "fp32" or c.built.is_production
                                                           or generation.time_failing)]
    generators = {c.name: TextGenerator(c.built.model_path, reference.tokenizer_dir, reference.card_path,
                                        threads=threads) for c in timed}
    try:
        for c in timed:
            c.speed = DecoderSpeed(concurrency=generation.concurrency)
            _timed_round(generators[c.name], reference.timing_prompt, 2, 1)  # warm-up
        for r in range(generation.timing_rounds):
            order = timed[r % len(timed):] + timed[:r % len(timed)] if timed else []
            for c in order:
                ttft, tps1 = _timed_round(generators[c.name], reference.timing_prompt, generation.max_new_tokens, 1)
                _, tpsc = _timed_round(generators[c.name], reference.timing_prompt, generation.max_new_tokens,
                                       generation.concurrency)
                c.speed.ttft_ms.append(ttft * 1000)
                c.speed.decode_tps_1.append(tps1)
                c.speed.decode_tps_c.append(tpsc)
            log.info("decoder timing round %d/%d", r + 1, generation.timing_rounds)
    finally:
        for g in generators.values():
            g.close()


def _timed_round(generator, prompt: list[int], new_tokens: int, batch: int) -> tuple[float, float]:
    """(prefill seconds, generated tokens/s over the decode steps) for `batch` copies of the prompt."""
    timing = generator.generate_timed([prompt] * batch, new_tokens, eos_token_id=[]).timing  # never stops early
    return timing.prefill_s, timing.decode_tokens_per_s or float("nan")


def price_decoders(candidates: list[DecoderCandidate], profile: HardwareProfile, traffic: TrafficSettings) -> None:
    """$/month for the traffic and $ per million generated tokens, in place, for every timed candidate."""
    for c in candidates:
        if c.speed is None or not c.speed.ttft_ms:
            continue
        capacity = c.inprocess_capacity_rps(traffic)
        high = c.speed.capacity_rps(traffic.output_tokens_per_request, q=0.75)
        c.cost = monthly_cost(capacity, profile, traffic, high)
        c.usd_per_million_tokens = usd_per_million_tokens(capacity, profile, traffic)


def usd_per_million_tokens(requests_per_s: float, profile: HardwareProfile, traffic: TrafficSettings) -> float:
    """Dollars per million generated tokens on one instance that completes `requests_per_s` requests of
    the traffic's output tokens each."""
    tokens_per_s = requests_per_s * traffic.output_tokens_per_request
    return round(profile.usd_per_hour / (tokens_per_s * 3600) * 1e6, 6)


def as_dicts(candidates: list[DecoderCandidate]) -> dict[str, dict]:
    """The candidates for decision.json."""
    return {c.name: c.record() for c in candidates}

