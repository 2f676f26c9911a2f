"""The speed screen: who is deferred, who never is, who comes back, and its false-defer rate (no model)."""

import math

import numpy as np

from tasks.build.candidates import BuiltCandidate
from tasks.config.settings import QualityBar
from tasks.decide.decision import for_selection
from tasks.decide.selection import Reference, select
from tasks.evaluate.candidates import MeasuredCandidate
from tasks.evaluate.speed import bring_back_deferred
from tasks.measure.cost import CostEstimate
from tasks.measure.scoring import QualityMetrics
from tasks.measure.speed_screen import defer_slower, log_ratio_lower_bound
from tasks.measure.timing import SpeedMetrics

ALPHA, MARGIN = 0.05, 0.10


def test_a_candidate_clearly_slower_in_every_round_is_deferred_against_the_faster_rival():
    rates = {"int8": [800, 760, 820, 790], "fp32": [410, 380, 430, 400], "int8-static": [790, 770, 805, 800]}
    deferred = defer_slower(rates, ALPHA, MARGIN)
    assert set(deferred) == {"fp32"}
    outcome = deferred["fp32"]
    assert {b.rival for b in outcome.beaten_by} == {"int8", "int8-static"}
    assert all(1 + MARGIN < b.ratio_low < b.ratio for b in outcome.beaten_by)
    assert outcome.level == ALPHA / 2 and outcome.rounds == 4
    assert "deferred by the speed screen" in outcome.reason


def test_a_near_tie_within_the_margin_is_never_deferred_however_steady():
    # 8% slower in every round with no noise at all: inside the 10% margin, so it gets the full measurement.
    rates = {"a": [1000.0] * 4, "b": [1000.0 / 1.08] * 4}
    assert defer_slower(rates, ALPHA, MARGIN) == {}
    # Clearly slower on average but not in every round (one round the other way): not deferred either.
    rates = {"a": [1000, 1000, 1000, 600], "b": [500, 500, 500, 700]}
    assert defer_slower(rates, ALPHA, MARGIN) == {}


def test_noise_keeps_a_slower_candidate_in_when_the_bound_does_not_clear_the_margin():
    # 25% slower on average, but the rounds disagree widely: the lower bound is under the margin.
    rival, candidate = [1000, 1000, 1000, 1000], [900, 700, 880, 650]
    mean, low = log_ratio_lower_bound(rival, candidate, ALPHA)
    assert mean > math.log1p(MARGIN) > low
    assert defer_slower({"rival": rival, "candidate": candidate}, ALPHA, MARGIN) == {}


def test_production_is_never_deferred_but_is_a_rival():
    rates = {"production-v3": [300, 310, 290, 305], "int8": [800, 790, 810, 805], "fp32": [150, 160, 155, 150]}
    deferred = defer_slower(rates, ALPHA, MARGIN, protected={"production-v3"})
    assert set(deferred) == {"fp32"}
    assert {b.rival for b in deferred["fp32"].beaten_by} == {"int8", "production-v3"}


def _measured(name: str, accuracy: float, rate: float) -> MeasuredCandidate:
    """A scored and timed candidate with these numbers (FP32 at 0.93 is the reference below)."""
    speed = SpeedMetrics(1, 2, 1, 1, rate, rate * 0.98, rate * 1.02, 100, 23)
    return MeasuredCandidate(BuiltCandidate(name, "int8-dynamic", "int8", {}, f"h-{name}"),
                             quality=QualityMetrics(accuracy, accuracy, 1.0, accuracy, 100, 10), speed=speed,
                             cost=CostEstimate("p", 3, 1e5 / rate, 0.1))


class Scorer:
    """Scores by looking up the accuracy and speed a full measurement would give; counts every call."""

    def __init__(self, truth: dict[str, tuple[float, float]]) -> None:
        self.truth, self.calls = truth, []

    def __call__(self, built: BuiltCandidate) -> MeasuredCandidate:
        self.calls.append(built.name)
        return _measured(built.name, *self.truth[built.name])


def _run(truth: dict[str, tuple[float, float]], rates: dict[str, list[float]]):
    """The flow's order: screen, score the rest, bring back, then select among the measured."""
    deferred = defer_slower(rates, ALPHA, MARGIN)
    score = Scorer(truth)
    built = [BuiltCandidate(name, "int8-dynamic", "int8", {}, f"h-{name}") for name in truth]
    measured = [MeasuredCandidate(b, speed_screening=deferred[b.name]) if b.name in deferred else score(b)
                for b in built]
    bar = QualityBar()
    passes = lambda m: m.quality is not None and (0.93 - m.quality.accuracy) / 0.93 <= bar.max_relative_accuracy_loss  # noqa: E731
    brought = bring_back_deferred(measured, score, passes)
    decision = select([for_selection(m) for m in measured], Reference(0.93, 0.93), bar)
    return measured, score.calls, brought, decision


RATES = {"int8": [800, 760, 820, 790], "fp32": [410, 380, 430, 400], "fp16": [120, 110, 125, 118]}


def test_a_deferred_candidate_is_never_scored_or_timed_when_a_faster_rival_passes():
    measured, calls, brought, decision = _run({"int8": (0.925, 800), "fp32": (0.93, 400), "fp16": (0.93, 120)}, RATES)
    assert calls == ["int8"] and brought == []
    by_name = {m.built.name: m for m in measured}
    for name in ("fp32", "fp16"):
        assert by_name[name].deferred and by_name[name].quality is None and by_name[name].speed is None
        assert not decision.verdicts[name].passed_bar
    assert decision.winner == "int8"


def test_a_deferred_candidate_comes_back_when_its_faster_rival_fails_and_can_then_win():
    # int8 fails the bar (2.2% loss > 1.5%): fp32 comes back, is measured in full and wins; fp16 was
    # beaten by fp32 too, which passes, so it stays deferred.
    measured, calls, brought, decision = _run({"int8": (0.91, 800), "fp32": (0.93, 400), "fp16": (0.93, 120)}, RATES)
    assert brought == ["fp32"] and calls == ["int8", "fp32"]
    by_name = {m.built.name: m for m in measured}
    assert by_name["fp32"].speed_screening.brought_back and not by_name["fp32"].deferred
    assert "int8" in by_name["fp32"].speed_screening.brought_back_because
    assert by_name["fp16"].deferred
    assert decision.winner == "fp32"


def test_a_chain_of_deferrals_unwinds_when_every_faster_rival_fails():
    measured, calls, brought, decision = _run({"int8": (0.90, 800), "fp32": (0.90, 400), "fp16": (0.93, 120)}, RATES)
    assert brought == ["fp32", "fp16"] and calls == ["int8", "fp32", "fp16"]
    assert decision.winner == "fp16"


def _false_defer_rate(true_ratio: float, noise: float, candidates: int, rounds: int, trials: int, seed: int) -> float:
    """Share of (trial, candidate) pairs deferred when the fastest rival is `true_ratio` faster than the rest.

    Each round has a shared host effect (hits every candidate in it alike) and each timing its own
    log-normal noise; candidate 0 is the fast one, the others are equal to each other.
    """
    rng = np.random.default_rng(seed)
    deferred = 0
    for _ in range(trials):
        host = rng.normal(0, 0.3, rounds)  # a shared round effect, large on purpose: interleaving cancels it
        rates = {f"c{i}": list(1000 / (true_ratio if i else 1.0) * np.exp(host + rng.normal(0, noise, rounds)))
                 for i in range(candidates)}
        deferred += len(set(defer_slower(rates, ALPHA, MARGIN)) - {"c0"})
    return deferred / (trials * (candidates - 1))


def test_false_defer_rate_on_equal_speed_candidates_is_at_most_alpha():
    assert _false_defer_rate(1.0, noise=0.08, candidates=5, rounds=4, trials=1500, seed=1) <= ALPHA


def test_false_defer_rate_at_the_margin_itself_is_at_most_alpha():
    # The worst case the test is built for: the rival exactly `margin` faster (ratio 1.10), normal noise.
    # There the t bound is exact, so the rate is alpha itself up to simulation error (3 standard errors).
    trials = 4000
    rate = _false_defer_rate(1 + MARGIN, noise=0.08, candidates=2, rounds=4, trials=trials, seed=2)
    assert rate <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / trials)
    # ...and the screen has power: a rival twice as fast is caught almost always at the same noise.
    assert _false_defer_rate(2.0, noise=0.08, candidates=2, rounds=4, trials=500, seed=3) > 0.9
