"""Choosing among decoder candidates: the cheapest that passes the generation gate, with speeds
compared beyond their noise by the same rules as the classifiers (tasks/decide/selection.py).

Speed here is capacity: requests/s one instance completes at the configured concurrency, computed
per interleaved timing round from that round's time to first token and decode speed, so rounds
pair up across candidates. Once served prices are in (tasks/evaluate/served_decoders.py), each
candidate's rounds are scaled by its served/in-process ratio, so the ranking is on what serving
holds while the noise is still the rounds' noise. Two candidates that were both served are never
told apart on a gap their served capacity intervals do not show (a decoder's load steps hold few
requests, so those intervals are wide): where the intervals overlap, neither is slower.

Among passing candidates that no other is faster than beyond the noise, the one closest to FP32
wins (highest top-1 token agreement), then the smallest; production stays unless it fails the gate
or is slower beyond the noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from tasks.decide.selection import Candidate, slower_beyond_noise
from tasks.evaluate.decoders import DecoderCandidate
from tasks.measure.served_pricing import SERVED


@dataclass
class DecoderDecision:
    """The outcome of selection among decoder candidates, written into decision.json."""

    winner: str | None
    promote: bool
    summary: str
    reasons: dict[str, str] = field(default_factory=dict)
    production: str | None = None

    def as_dict(self) -> dict:
        """Plain dict, JSON-serialisable."""
        return asdict(self)


def capacity_rounds(c: DecoderCandidate, output_tokens: int) -> list[float]:
    """Requests/s per instance in each timing round (that round's TTFT and concurrent decode speed)."""
    s = c.speed
    per_sequence = [tps / s.concurrency for tps in s.decode_tps_c]
    return [s.concurrency / (s.concurrency * ttft / 1000 + output_tokens / tps)
            for ttft, tps in zip(s.ttft_ms, per_sequence)]


def _as_candidate(c: DecoderCandidate, output_tokens: int) -> Candidate:
    price = c.served_price
    scale = price.sentences_per_s / price.batched_sentences_per_s if price and price.batched_sentences_per_s else 1.0
    rounds = [r * scale for r in capacity_rounds(c, output_tokens)]
    return Candidate(name=c.name, recipe=c.built.recipe, accuracy=c.quality.token_agreement,
                     throughput_per_s=float(np.median(rounds)), throughput_low_per_s=float(np.quantile(rounds, 0.25)),
                     throughput_high_per_s=float(np.quantile(rounds, 0.75)), throughput_rounds=tuple(rounds),
                     monthly_cost_usd=c.cost.monthly_cost_usd, size_mb=c.built.size_ratio,
                     is_production=c.built.is_production)


def served_intervals_overlap(a: DecoderCandidate, b: DecoderCandidate) -> bool:
    """Both were load-tested and their served capacities (held up to the first rate that failed) overlap."""
    intervals = []
    for c in (a, b):
        price = c.served_price
        if price is None or price.basis != SERVED or price.capacity is None or price.capacity.error:
            return False
        high = price.capacity.capacity_high_rps
        intervals.append((price.capacity.capacity_rps, high if high is not None else float("inf")))
    (low_a, high_a), (low_b, high_b) = intervals
    return low_a < high_b and low_b < high_a


def select_decoder(candidates: list[DecoderCandidate], output_tokens: int, margin: float) -> DecoderDecision:
    """The winner among decoder candidates, whether to promote it, and why each other one lost.

    Args:
        candidates: scored (and, when passing, timed and priced) candidates; at most one is production.
        output_tokens: generated tokens per request (cost.traffic.output_tokens_per_request).
        margin: speed gaps below this share are a tie (quality_bar.speed_noise_margin).
    """
    production = next((c for c in candidates if c.built.is_production), None)
    decision = DecoderDecision(winner=None, promote=False, summary="", production=production.name if production else None)
    passing = [c for c in candidates if c.passed and c.cost is not None]
    for c in candidates:
        if c not in passing:
            decision.reasons[c.name] = c.reason if not c.passed else f"passes the gate but was not priced: {c.error or 'untimed'}"
    if not passing:
        decision.summary = "no candidate met the generation quality bar; nothing promoted"
        return decision
    view = {c.name: _as_candidate(c, output_tokens) for c in passing}
    beaten_by = {c.name: next((o for o in sorted(passing, key=lambda o: -view[o.name].throughput_low_per_s)
                               if o is not c and slower_beyond_noise(view[c.name], view[o.name], margin)
                               and not served_intervals_overlap(c, o)), None)
                 for c in passing}
    frontier = [c for c in passing if beaten_by[c.name] is None]
    winner = max(frontier, key=lambda c: (c.quality.token_agreement, -c.built.size_ratio, c.built.is_production))
    for c in passing:
        v = view[c.name]
        if c is winner:
            decision.reasons[c.name] = "winner: cheapest that meets the bar, closest to FP32 among those as fast within noise"
        elif beaten_by[c.name] is not None:
            faster = view[beaten_by[c.name].name]
            decision.reasons[c.name] = (f"passes the bar, but serves {v.throughput_per_s:.2f} requests/s, slower beyond the "
                                        f"noise than {faster.name}'s {faster.throughput_per_s:.2f} "
                                        f"(${v.monthly_cost_usd:,.2f}/month vs ${faster.monthly_cost_usd:,.2f})")
        else:
            decision.reasons[c.name] = (f"passes the bar and is as fast as {winner.name} within noise (in-process "
                                        f"rounds, served capacity intervals); {winner.name} "
                                        f"agrees more with FP32 ({winner.quality.token_agreement:.2%} vs "
                                        f"{c.quality.token_agreement:.2%}) or is smaller")
    decision.winner = winner.name
    if production is not None and (winner is production or (production in frontier)):
        decision.summary = (f"production {production.name} is still the best candidate; kept production"
                            if winner is production else
                            f"{winner.name} is the best new candidate, but production {production.name} is as fast "
                            "within noise; kept production")
        return decision
    decision.promote = True
    decision.summary = (f"promote {winner.name}: ${winner.cost.monthly_cost_usd:,.2f}/month, "
                        f"${winner.usd_per_million_tokens:,.4f} per million generated tokens, token agreement "
                        f"{winner.quality.token_agreement:.2%}, perplexity {winner.quality.candidate_perplexity:.3f} "
                        f"({winner.quality.relative_perplexity_increase:+.2%} vs FP32)")
    return decision
