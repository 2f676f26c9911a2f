"""Pick the cheapest candidate that meets the quality bar. Pure: numbers in, a Decision out.

Rules, in order:
1. A candidate that failed to build, verify or measure is out, and so is one whose numbers are not
   finite (fail closed: NaN never passes).
2. Its accuracy loss relative to the FP32 reference must be within the bar, judged on the upper end
   of its paired interval when one is given; so must its hard-slice loss; an optional absolute
   accuracy floor and an optional p95 latency limit apply.
3. Speed decides before accuracy, but only beyond the noise. Every candidate carries a throughput
   median and a noise band [low, high] from interleaved timing rounds; its price comes from `low`
   (a robust low quantile), so capacity holds at the slow end of the noise. A passing candidate is
   *slower beyond the noise* than another when its median lies below the other's `low`; such a
   candidate never wins, whatever its accuracy. When both candidates were timed in the same
   interleaved rounds (at least 5), the rounds are also compared pairwise: one that is slower in
   every round is slower beyond the noise too (a one-sided sign test: two equally fast candidates
   do that by chance with probability 2^-rounds, 3% with 5 rounds, 0.8% with the default 7). A
   disturbance of the host lands on both candidates of a round alike, so the per-round comparison
   sees a steady gap of a few percent that two overlapping bands hide. Both tests leave a margin
   (`quality_bar.speed_noise_margin`, 5%): a new ONNX Runtime session of the same graph can run a
   few percent faster or slower for its whole life (memory layout, thread placement), a noise that
   the rounds of one run cannot see; measured on the shared AMD host, two graphs of equal speed
   swapped places by up to 5% between runs.
   The rest (the speed frontier) are as fast as the fastest within noise: among them the most
   accurate wins. Accuracy too is judged beyond noise when the per-row results are given: a
   candidate is more accurate than another only when an exact sign test on the rows where they
   disagree says so at the bar's confidence (`more_accurate_beyond_noise`); 1 row in 2,000 is not.
   Among candidates tied on speed and accuracy the smaller file wins (a deterministic, real
   difference; their price difference is noise), then the cheaper.

   A wider band never helps a candidate: its own median decides whether it is out, its own `low`
   only lets more rivals stay in, and its price (from `low`) only rises. The paired comparison only
   ever adds exclusions to the band rule, and "slower beyond the noise" always means a lower median
   (slower in every round implies it), so the relation has no cycles and the fastest median is
   always on the frontier.
4. The production model, measured in the same run as a candidate, stays unless the winner is better
   beyond noise: production is slower beyond the noise than the winner, or the winner's accuracy
   gain over production has a paired interval above zero, or production no longer meets the bar.

Worked example with the default bar: FP32 scores 93.0%; int8 A at 800/s (band 780-820) costs $130,
int8 B at 790/s (775-805) costs $195 because its band crosses an instance boundary, fp32 at
320/s (310-330) costs $326. fp32 is slower beyond the noise (320 < 775); A and B tie on speed
(790 >= 780 and 800 >= 775), so the more accurate of A and B wins, even if B is priced higher:
that price difference is smaller than the noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from tasks.config.settings import QualityBar


@dataclass(frozen=True)
class Candidate:
    """The measured numbers selection needs about one candidate."""

    name: str
    recipe: str
    accuracy: float = 0.0
    hard_slice_accuracy: float = 0.0
    latency_p95_ms: float = 0.0
    throughput_per_s: float = 0.0
    throughput_low_per_s: float = 0.0
    throughput_high_per_s: float = 0.0
    monthly_cost_usd: float = 0.0
    size_mb: float = 0.0
    error: str | None = None
    # Throughput of each interleaved timing round, in round order; empty when not timed in rounds.
    throughput_rounds: tuple[float, ...] = ()
    # Whether it got each selection row right (the same rows, in the same order, for every
    # candidate); empty when unknown, and then accuracies are compared as point estimates.
    correct_rows: tuple[bool, ...] = ()
    # Upper ends of the paired intervals of the relative losses vs FP32 (tasks.measure.quality_intervals); when
    # set, the bar is judged on them instead of the point estimates.
    accuracy_loss_high: float | None = None
    hard_slice_loss_high: float | None = None
    # The model behind the production alias, measured in this run like any other candidate.
    is_production: bool = False
    # Lower end of the paired interval of (this accuracy - production's accuracy) on the same rows;
    # None when there is no production model or this is it.
    accuracy_gain_vs_production_low: float | None = None
    # Set when it was scored but never timed (it failed the bar first): without measured speed it
    # cannot pass, whatever its numbers say (fail closed).
    untimed_because: str | None = None


@dataclass(frozen=True)
class Reference:
    """FP32 quality the bar is measured against (PyTorch eager)."""

    accuracy: float
    hard_slice_accuracy: float


@dataclass
class Verdict:
    """Whether one candidate passed, and why it won or lost."""

    passed_bar: bool
    relative_accuracy_loss: float | None
    hard_slice_relative_loss: float | None
    reason: str = ""
    relative_accuracy_loss_high: float | None = None
    hard_slice_relative_loss_high: float | None = None
    # Passing, and not slower beyond the noise than any other passing candidate.
    on_speed_frontier: bool = False


@dataclass
class Decision:
    """The outcome of selection, written as JSON on the parent MLflow run."""

    winner: str | None
    promote: bool
    summary: str
    reference: dict
    bar: dict
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    production: str | None = None  # the production candidate's name, if one was measured

    def as_dict(self) -> dict:
        """Plain dict, JSON-serialisable."""
        return asdict(self)


def _relative_loss(reference: float, value: float) -> float:
    # Fail closed: a reference that scores nothing makes every loss meaningless, not zero.
    if not reference > 0:
        return math.inf
    return (reference - value) / reference


def _finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


def judge(candidate: Candidate, reference: Reference, bar: QualityBar) -> Verdict:
    """Whether one candidate meets the bar, with the reason when it does not."""
    if candidate.error:
        return Verdict(False, None, None, f"failed: {candidate.error}")
    if not _finite(candidate.accuracy, candidate.hard_slice_accuracy):
        return Verdict(False, None, None, "failed: accuracy is not a finite number (fail closed)")
    if not (reference.accuracy > 0 and reference.hard_slice_accuracy > 0):
        return Verdict(False, None, None, f"failed: the FP32 reference scores {reference.accuracy:.2%} "
                                          f"(hard slice {reference.hard_slice_accuracy:.2%}); no loss can be judged against it")
    loss = _relative_loss(reference.accuracy, candidate.accuracy)
    hard_loss = _relative_loss(reference.hard_slice_accuracy, candidate.hard_slice_accuracy)
    verdict = Verdict(True, loss, hard_loss, relative_accuracy_loss_high=candidate.accuracy_loss_high,
                      hard_slice_relative_loss_high=candidate.hard_slice_loss_high)
    judged = max(loss, candidate.accuracy_loss_high) if candidate.accuracy_loss_high is not None else loss
    judged_hard = max(hard_loss, candidate.hard_slice_loss_high) if candidate.hard_slice_loss_high is not None else hard_loss
    if not _finite(judged, judged_hard):
        verdict.passed_bar = False
        verdict.reason = "failed: the loss interval is not finite (fail closed)"
    elif bar.min_accuracy is not None and candidate.accuracy < bar.min_accuracy:
        verdict.passed_bar = False
        verdict.reason = f"accuracy {candidate.accuracy:.2%} is below the absolute floor {bar.min_accuracy:.2%}"
    elif judged > bar.max_relative_accuracy_loss:
        verdict.passed_bar = False
        interval = (f"; upper end of the {bar.confidence:.0%} paired interval {candidate.accuracy_loss_high:.2%}"
                    if candidate.accuracy_loss_high is not None else "")
        verdict.reason = (
            f"accuracy {candidate.accuracy:.2%} is {loss:.2%} below FP32 {reference.accuracy:.2%}{interval} "
            f"(bar: {bar.max_relative_accuracy_loss:.2%})"
        )
    elif judged_hard > bar.max_hard_slice_relative_loss:
        verdict.passed_bar = False
        interval = (f"; upper end of the {bar.confidence:.0%} paired interval {candidate.hard_slice_loss_high:.2%}"
                    if candidate.hard_slice_loss_high is not None else "")
        verdict.reason = (
            f"hard-slice accuracy {candidate.hard_slice_accuracy:.2%} is {hard_loss:.2%} below FP32 "
            f"{reference.hard_slice_accuracy:.2%}{interval} (bar: {bar.max_hard_slice_relative_loss:.2%})"
        )
    elif bar.max_p95_latency_ms is not None and not candidate.latency_p95_ms <= bar.max_p95_latency_ms:
        verdict.passed_bar = False
        verdict.reason = f"p95 latency {candidate.latency_p95_ms:.2f} ms exceeds {bar.max_p95_latency_ms:.2f} ms"
    elif candidate.untimed_because:
        verdict.passed_bar = False
        verdict.reason = f"failed: not timed ({candidate.untimed_because}), so it has no measured speed or price"
    return verdict


# Paired rounds needed before "slower in every round" is evidence: 2^-5 = 3% by chance.
MIN_PAIRED_ROUNDS = 5


def slower_beyond_noise(a: Candidate, b: Candidate, margin: float = 0.0) -> bool:
    """Whether a is slower than b beyond the noise, by more than `margin` (a share of b's speed).

    Either a's median throughput lies below b's noise band (b's robust low quantile) shrunk by
    the margin, or both were timed in the same rounds and a is slower than b by more than the
    margin in every one of them (`paired_speed_ratio` < 1 - margin).
    """
    if a.throughput_per_s < b.throughput_low_per_s * (1 - margin):
        return True
    ratio = paired_speed_ratio(a, b)
    return ratio is not None and ratio < 1.0 - margin


def paired_speed_ratio(a: Candidate, b: Candidate) -> float | None:
    """The largest per-round ratio of a's throughput to b's, or None when the rounds are not comparable.

    Below 1 means a was slower than b in every round. Rounds are comparable when both candidates
    have the same number of them (the same interleaved timing), at least MIN_PAIRED_ROUNDS, all
    finite and positive.
    """
    ra, rb = a.throughput_rounds, b.throughput_rounds
    if len(ra) != len(rb) or len(ra) < MIN_PAIRED_ROUNDS:
        return None
    ratios = [x / y for x, y in zip(ra, rb) if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)]
    return max(ratios) if len(ratios) == len(ra) else None


def more_accurate_beyond_noise(a: Candidate, b: Candidate, confidence: float) -> bool:
    """Whether a is more accurate than b beyond noise.

    With per-row results for both (same rows): of the rows where exactly one of them is right, a
    must be right on so many that a fair coin would do as well with probability at most
    1 - confidence (one-sided exact sign test). Without them: a's point accuracy is higher.
    """
    if not a.correct_rows or len(a.correct_rows) != len(b.correct_rows):
        return a.accuracy > b.accuracy
    a_only = sum(1 for x, y in zip(a.correct_rows, b.correct_rows) if x and not y)
    b_only = sum(1 for x, y in zip(a.correct_rows, b.correct_rows) if y and not x)
    n = a_only + b_only
    if a_only <= b_only:
        return False
    tail = sum(math.comb(n, k) for k in range(a_only, n + 1)) / 2 ** n
    return tail <= 1 - confidence


def _band(c: Candidate) -> str:
    return f"{c.throughput_per_s:.0f}/s ({c.throughput_low_per_s:.0f}-{c.throughput_high_per_s:.0f})"


def select(candidates: list[Candidate], reference: Reference, bar: QualityBar) -> Decision:
    """Return the winner, whether to promote it, and for every other candidate why it lost.

    Args:
        candidates: measured candidates (failed ones carry `error`); at most one has
            `is_production` set: the model behind the production alias, measured in this run.
        reference: FP32 quality the relative losses are computed against.
        bar: the quality bar from params.yaml.
    """
    verdicts = {c.name: judge(c, reference, bar) for c in candidates}
    production = next((c for c in candidates if c.is_production), None)
    decision = Decision(winner=None, promote=False, summary="", reference=asdict(reference), bar=bar.model_dump(),
                        verdicts=verdicts, production=production.name if production else None)
    passing = [c for c in candidates if verdicts[c.name].passed_bar]
    if not passing:
        decision.summary = "no candidate met the quality bar; nothing promoted"
        return decision

    beaten_by = {c.name: next((o for o in sorted(passing, key=lambda o: -o.throughput_low_per_s)
                               if o is not c and slower_beyond_noise(c, o, bar.speed_noise_margin)), None) for c in passing}
    frontier = [c for c in passing if beaten_by[c.name] is None]
    for c in frontier:
        verdicts[c.name].on_speed_frontier = True
    # "More accurate beyond noise" implies a higher accuracy, so the most accurate is never beaten
    # and `top` is never empty.
    top = [c for c in frontier if not any(more_accurate_beyond_noise(o, c, bar.confidence) for o in frontier)]
    winner = max(top, key=lambda c: (-c.size_mb, -c.monthly_cost_usd, c.accuracy, c.is_production))
    tied = [c for c in frontier if c is not winner]
    for c in passing:
        if c is winner:
            verdicts[c.name].reason = "winner: cheapest that meets the bar" + (
                f" (as fast as {', '.join(t.name for t in tied)} within measured noise; more accurate beyond noise, "
                "or as accurate within noise and smaller, then cheaper)" if tied else "")
        elif beaten_by[c.name] is not None:
            faster = beaten_by[c.name]
            paired = paired_speed_ratio(c, faster)
            how = (f"below {faster.name}'s {_band(faster)} beyond the noise"
                   if c.throughput_per_s < faster.throughput_low_per_s * (1 - bar.speed_noise_margin)
                   else f"slower than {faster.name}'s {_band(faster)} in every one of the "
                        f"{len(c.throughput_rounds)} timing rounds (at most {paired:.3f}x its speed)")
            verdicts[c.name].reason = (
                f"passes the bar, but its throughput {_band(c)} is {how} "
                f"(${c.monthly_cost_usd:,.2f}/month vs ${faster.monthly_cost_usd:,.2f})"
            )
        else:
            how = ("more accurate beyond noise" if c not in top else
                   f"as accurate within noise and smaller ({winner.size_mb:.1f} vs {c.size_mb:.1f} MB) or cheaper")
            verdicts[c.name].reason = (
                f"passes the bar; as fast as {winner.name} within measured noise, and {winner.name} is {how} "
                f"({winner.accuracy:.2%} vs {c.accuracy:.2%})"
            )

    decision.winner = winner.name
    if production is not None:
        kept = _keep_production(production, winner, verdicts, beaten_by)
        if kept:
            decision.summary = kept
            return decision
    decision.promote = True
    decision.summary = f"promote {winner.name}: ${winner.monthly_cost_usd:,.2f}/month at {winner.accuracy:.2%} accuracy"
    if production is not None:
        decision.summary += f"; production {production.name} is {_why_replaced(production, winner, verdicts, beaten_by)}"
    return decision


def _keep_production(production: Candidate, winner: Candidate, verdicts: dict[str, Verdict],
                     beaten_by: dict[str, Candidate | None]) -> str | None:
    """The summary when production stays, or None when the winner replaces it."""
    if winner is production:
        return f"production {production.name} is still the best candidate; kept production"
    if not verdicts[production.name].passed_bar or beaten_by.get(production.name) is not None:
        return None
    gain = winner.accuracy_gain_vs_production_low
    if gain is not None and gain > 0:
        return None
    return (f"{winner.name} is the best new candidate, but production {production.name} is as fast within noise "
            f"({_band(production)} vs {_band(winner)}) and {winner.name} is not more accurate beyond noise "
            f"({winner.accuracy:.2%} vs {production.accuracy:.2%}); kept production")


def _why_replaced(production: Candidate, winner: Candidate, verdicts: dict[str, Verdict],
                  beaten_by: dict[str, Candidate | None]) -> str:
    if not verdicts[production.name].passed_bar:
        return f"replaced: it no longer meets the bar ({verdicts[production.name].reason})"
    if beaten_by.get(production.name) is not None:
        return f"replaced: slower beyond the noise ({_band(production)} vs {_band(winner)})"
    return (f"replaced: {winner.name} is more accurate beyond noise ({winner.accuracy:.2%} vs {production.accuracy:.2%}, "
            f"gain interval low end {winner.accuracy_gain_vs_production_low:+.2%})")
