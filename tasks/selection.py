"""Pick the cheapest candidate that meets the quality bar. Pure: numbers in, a Decision out.

Rules, in order:
1. A candidate that failed to build or verify is out.
2. Its accuracy loss relative to the FP32 reference must be within the bar (judged on the upper
   end of its paired interval when one is given), and so must its hard-slice loss; an optional
   p95 latency limit applies.
3. Among the passing candidates the cheapest (monthly cost, then throughput) leads. Any passing
   candidate whose throughput interval overlaps the leader's is tied with it within measured
   noise; among the tied, the more accurate wins, then the smaller. A cost difference smaller
   than the noise never decides.
4. An existing production model that is at least as accurate and no more expensive is kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tasks.settings import QualityBar


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
    # Upper end of the paired interval on the relative accuracy loss (quality_gate); when set,
    # the bar is judged on it instead of the point estimate.
    accuracy_loss_high: float | None = None


@dataclass(frozen=True)
class Reference:
    """FP32 quality the bar is measured against (PyTorch eager)."""

    accuracy: float
    hard_slice_accuracy: float


@dataclass(frozen=True)
class ProductionModel:
    """What the registry knows about the model currently behind the production alias."""

    version: str
    accuracy: float
    monthly_cost_usd: float


@dataclass
class Verdict:
    """Whether one candidate passed, and why it won or lost."""

    passed_bar: bool
    relative_accuracy_loss: float | None
    hard_slice_relative_loss: float | None
    reason: str = ""
    relative_accuracy_loss_high: float | None = None


@dataclass
class Decision:
    """The outcome of selection, written as JSON on the parent MLflow run."""

    winner: str | None
    promote: bool
    summary: str
    reference: dict
    bar: dict
    verdicts: dict[str, Verdict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain dict, JSON-serialisable."""
        return asdict(self)


def _relative_loss(reference: float, value: float) -> float:
    return (reference - value) / reference if reference > 0 else 0.0


def judge(candidate: Candidate, reference: Reference, bar: QualityBar) -> Verdict:
    """Whether one candidate meets the bar, with the reason when it does not."""
    if candidate.error:
        return Verdict(False, None, None, f"failed: {candidate.error}")
    loss = _relative_loss(reference.accuracy, candidate.accuracy)
    hard_loss = _relative_loss(reference.hard_slice_accuracy, candidate.hard_slice_accuracy)
    verdict = Verdict(True, loss, hard_loss, relative_accuracy_loss_high=candidate.accuracy_loss_high)
    judged = loss if candidate.accuracy_loss_high is None else max(loss, candidate.accuracy_loss_high)
    if judged > bar.max_relative_accuracy_loss:
        verdict.passed_bar = False
        interval = (f"; upper end of the {bar.confidence:.0%} paired interval {candidate.accuracy_loss_high:.2%}"
                    if candidate.accuracy_loss_high is not None else "")
        verdict.reason = (
            f"accuracy {candidate.accuracy:.2%} is {loss:.2%} below FP32 {reference.accuracy:.2%}{interval} "
            f"(bar: {bar.max_relative_accuracy_loss:.2%})"
        )
    elif hard_loss > bar.max_hard_slice_relative_loss:
        verdict.passed_bar = False
        verdict.reason = (
            f"hard-slice accuracy {candidate.hard_slice_accuracy:.2%} is {hard_loss:.2%} below FP32 "
            f"{reference.hard_slice_accuracy:.2%} (bar: {bar.max_hard_slice_relative_loss:.2%})"
        )
    elif bar.max_p95_latency_ms is not None and candidate.latency_p95_ms > bar.max_p95_latency_ms:
        verdict.passed_bar = False
        verdict.reason = f"p95 latency {candidate.latency_p95_ms:.2f} ms exceeds {bar.max_p95_latency_ms:.2f} ms"
    return verdict


def _overlaps(a: Candidate, b: Candidate) -> bool:
    return a.throughput_low_per_s <= b.throughput_high_per_s and b.throughput_low_per_s <= a.throughput_high_per_s


def select(candidates: list[Candidate], reference: Reference, bar: QualityBar,
           production: ProductionModel | None = None) -> Decision:
    """Return the winner and, for every other candidate, why it lost.

    Args:
        candidates: measured candidates (failed ones carry `error`).
        reference: FP32 quality the relative losses are computed against.
        bar: the quality bar from params.yaml.
        production: the model behind the production alias, if any; a winner that is neither
            more accurate nor cheaper than it is not promoted.
    """
    verdicts = {c.name: judge(c, reference, bar) for c in candidates}
    decision = Decision(winner=None, promote=False, summary="", reference=asdict(reference), bar=bar.model_dump(),
                        verdicts=verdicts)
    passing = sorted((c for c in candidates if verdicts[c.name].passed_bar),
                     key=lambda c: (c.monthly_cost_usd, -c.throughput_per_s))
    if not passing:
        decision.summary = "no candidate met the quality bar; nothing promoted"
        return decision

    leader = passing[0]
    tied = [c for c in passing if c is leader or _overlaps(c, leader)]
    winner = max(tied, key=lambda c: (c.accuracy, -c.size_mb))
    for c in passing:
        if c is winner:
            verdicts[c.name].reason = "winner: cheapest that meets the bar" + (
                f" (tied within throughput noise with {', '.join(t.name for t in tied if t is not c)}; more accurate or smaller)"
                if len(tied) > 1 else "")
        elif c in tied:
            verdicts[c.name].reason = (
                f"passes the bar; cost within measured noise of {winner.name}, which is more accurate or smaller"
            )
        elif c.monthly_cost_usd == winner.monthly_cost_usd:
            verdicts[c.name].reason = (
                f"passes the bar at the same ${c.monthly_cost_usd:,.2f}/month, but its throughput "
                f"({c.throughput_low_per_s:.0f}-{c.throughput_high_per_s:.0f}/s) is below {winner.name}'s "
                f"({winner.throughput_low_per_s:.0f}-{winner.throughput_high_per_s:.0f}/s) beyond the noise"
            )
        else:
            verdicts[c.name].reason = (
                f"passes the bar but costs ${c.monthly_cost_usd:,.2f}/month vs ${winner.monthly_cost_usd:,.2f} for {winner.name}"
            )

    decision.winner = winner.name
    if production and production.accuracy >= winner.accuracy and production.monthly_cost_usd <= winner.monthly_cost_usd:
        decision.summary = (
            f"{winner.name} is the best candidate, but production version {production.version} is at least as accurate "
            f"({production.accuracy:.2%}) and no more expensive (${production.monthly_cost_usd:,.2f}/month); kept production"
        )
        return decision
    decision.promote = True
    decision.summary = f"promote {winner.name}: ${winner.monthly_cost_usd:,.2f}/month at {winner.accuracy:.2%} accuracy"
    return decision
