"""Decoder prices from served capacity: the models that matter generate behind requant's front under load.

In-process timing (tasks/evaluate/decoders.py) says what the graph does with `concurrency`
sequences decoded together; a service answering one prompt per request holds what its front, its
batcher (batches form from the requests waiting, and a batch runs to its end before the next
starts) and the graph deliver together, and that is what the bill pays for. As for the
classifiers (tasks/measure/served_pricing.py), the in-process winner, production and FP32 are
served, each request one prompt that generates exactly `cost.traffic.output_tokens_per_request`
tokens (`ignore_eos`, so every request costs what the traffic says), and the request rate each
holds at `generation.slo_p95_ms` (p95 of the whole request) is found by the open-loop ramp. The
others are priced through the served/in-process ratio of the served candidate nearest in
in-process capacity, and their records say so.
"""

from __future__ import annotations

from pathlib import Path

from tasks.build.decoder_reference import DecoderReference
from tasks.config.settings import (
    GenerationSettings,
    HardwareProfile,
    LoadtestSettings,
    ServingSettings,
    TrafficSettings,
)
from tasks.evaluate.decoders import DecoderCandidate, usd_per_million_tokens
from tasks.measure.served_pricing import (
    ServedCapacity,
    log_capacity,
    measure_capacity,
    price_all,
    unmeasured,
)
from tasks.serve.front import ServedFiles, served_fronts

# A decoder request takes seconds: a few one-by-one requests warm the server (graph, allocator, cache).
WARMUP_REQUESTS = 2
# The slowest first step: a small model on a small host may hold well under one request a second.
SLOWEST_START_RPS = 0.05


def decoder_contenders(candidates: list[DecoderCandidate], winner: str | None) -> list[DecoderCandidate]:
    """The candidates served for their price: the winner, production and FP32 (each timed in process)."""
    chosen = [c for c in candidates if c.speed is not None and c.cost is not None and not c.error
              and (c.name == winner or c.built.is_production or c.built.recipe == "fp32")]
    return sorted(chosen, key=lambda c: (c.name != winner, not c.built.is_production))


def generation_params(traffic: TrafficSettings) -> dict:
    """What every load-test request asks: the traffic's output tokens, exactly (ignore_eos)."""
    return {"max_new_tokens": traffic.output_tokens_per_request, "ignore_eos": True}


def serve_and_price_decoders(candidates: list[DecoderCandidate], to_test: list[DecoderCandidate],
                             reference: DecoderReference, generation: GenerationSettings,
                             loadtest: LoadtestSettings, serving: ServingSettings, profile: HardwareProfile,
                             traffic: TrafficSettings, threads: int, work_dir: Path,
                             served: dict[str, ServedCapacity],
                             production_files: ServedFiles | None = None) -> dict[str, ServedCapacity]:
    """Measure the served capacity of `to_test` (those not measured yet), then price every timed candidate
    from served figures, in place: `cost` and `usd_per_million_tokens` become served prices, the
    in-process cost moves to `inprocess_cost`. Returns `served`, updated.

    A new candidate is served with the reference's tokenizer and generator card; production with its
    own (`production_files`, from its registry download: an earlier source version may tokenize differently).
    """
    pending = [c for c in to_test if c.name not in served]
    knobs = serving.model_copy(update={"step_seconds": generation.served_step_seconds,
                                       "max_seconds": generation.served_max_seconds})
    files = [production_files if c.built.is_production and production_files else
             ServedFiles(c.built.model_path, reference.tokenizer_dir, reference.card_path, kind="generator")
             for c in pending]
    params = generation_params(traffic)
    with served_fronts(files, loadtest.server_start_timeout_s, threads) as fronts:
        for c, front in zip(pending, fronts):
            if isinstance(front, Exception):
                served[c.name] = unmeasured(loadtest, str(front))
            else:
                # Expected: its in-process capacity times the served/in-process ratio already measured here.
                ratios = [s.sentences_per_s / o.inprocess_capacity_rps(traffic) for o in candidates
                          if (s := served.get(o.name)) and not s.error and o.speed]
                ratio = sorted(ratios)[len(ratios) // 2] if ratios else 1.0
                expected = ratio * c.inprocess_capacity_rps(traffic)
                served[c.name] = measure_capacity(*front, list(generation.prompts), loadtest, knobs,
                                                  generation.slo_p95_ms, expected, work_dir / f"served-{len(served)}",
                                                  params, SLOWEST_START_RPS, WARMUP_REQUESTS)
            log_capacity(c.name, served[c.name], generation.slo_p95_ms)
    timed = {c.name: c for c in candidates if c.speed is not None and c.cost is not None and not c.error}
    inprocess = {name: c.inprocess_capacity_rps(traffic) for name, c in timed.items()}
    for name, (price, cost) in price_all(inprocess, served, profile, traffic).items():
        c = timed[name]
        c.inprocess_cost = c.inprocess_cost or c.cost
        c.served_price, c.cost = price, cost
        c.usd_per_million_tokens = usd_per_million_tokens(price.sentences_per_s, profile, traffic)
    return served
