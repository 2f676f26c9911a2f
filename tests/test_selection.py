"""Selection is a pure function: table-driven tests with scripted numbers, and fuzzed noise bands."""

import math
from dataclasses import replace

import numpy as np
import pytest

from tasks.config.settings import HardwareProfile, QualityBar, TrafficSettings
from tasks.decide.selection import (
    Candidate,
    Reference,
    more_accurate_beyond_noise,
    paired_speed_ratio,
    select,
    slower_beyond_noise,
)
from tasks.measure.cost import monthly_cost

REF = Reference(accuracy=0.930, hard_slice_accuracy=0.700)
BAR = QualityBar(max_relative_accuracy_loss=0.015, max_hard_slice_relative_loss=0.05)
MARGIN = BAR.speed_noise_margin
PROFILE = HardwareProfile(name="aws-c6a.large", usd_per_hour=0.0765)
TRAFFIC = TrafficSettings(requests_per_month=1e9, peak_requests_per_second=1500)


def cand(name, accuracy=0.925, hard=0.69, cost=None, thr=(600, 620, 640), size=23.0, p95=2.0, error=None, **extra):
    """A candidate priced, as the flow prices it, on the low end of its throughput band."""
    low, mid, high = thr
    if cost is None:
        cost = monthly_cost(low, PROFILE, TRAFFIC).monthly_cost_usd
    return Candidate(name=name, recipe="r", accuracy=accuracy, hard_slice_accuracy=hard, latency_p95_ms=p95,
                     throughput_per_s=mid, throughput_low_per_s=low, throughput_high_per_s=high,
                     monthly_cost_usd=cost, size_mb=size, error=error, **extra)


def test_select_picks_cheapest_passing_candidate():
    decision = select([cand("fp32", 0.93, thr=(280, 290, 300)), cand("int8")], REF, BAR)
    assert decision.winner == "int8" and decision.promote
    assert "beyond the noise" in decision.verdicts["fp32"].reason


@pytest.mark.parametrize("loser, reason", [
    (cand("lossy", accuracy=0.910, thr=(900, 910, 920)), "below FP32"),       # 2.2% relative loss > 1.5%
    (cand("fragile", hard=0.60, thr=(900, 910, 920)), "hard-slice"),          # 14% relative hard-slice loss
    (cand("broken", thr=(900, 910, 920), error="NaN outputs"), "failed: NaN outputs"),
    (cand("nan", accuracy=float("nan"), thr=(900, 910, 920)), "not a finite number"),
    (cand("nan-hard", hard=float("nan"), thr=(900, 910, 920)), "not a finite number"),
    (cand("wide", thr=(900, 910, 920), accuracy_loss_high=0.02), "paired interval"),
    (cand("wide-hard", thr=(900, 910, 920), hard_slice_loss_high=0.08), "hard-slice"),
])
def test_select_rejects_candidate_outside_the_bar_even_when_cheapest(loser, reason):
    decision = select([loser, cand("ok")], REF, BAR)
    assert decision.winner == "ok"
    assert not decision.verdicts[loser.name].passed_bar
    assert reason in decision.verdicts[loser.name].reason


def test_select_fails_closed_when_the_reference_scores_zero():
    decision = select([cand("a"), cand("b", accuracy=0.0)], Reference(0.0, 0.0), BAR)
    assert decision.winner is None and not decision.promote
    assert all("FP32 reference scores 0.00%" in v.reason for v in decision.verdicts.values())


def test_select_absolute_floor_refuses_a_candidate_within_the_relative_bar():
    bar = BAR.model_copy(update={"min_accuracy": 0.928})
    decision = select([cand("int8", accuracy=0.925)], REF, bar)
    assert decision.winner is None
    assert "absolute floor 92.80%" in decision.verdicts["int8"].reason


def test_select_boundary_loss_exactly_at_bar_passes():
    at_bar = cand("edge", accuracy=REF.accuracy * (1 - 0.015) + 1e-12)
    assert select([at_bar], REF, BAR).winner == "edge"


def test_select_p95_limit_applies_when_set():
    bar = BAR.model_copy(update={"max_p95_latency_ms": 3.0})
    decision = select([cand("slow", p95=4.0, thr=(900, 910, 920)), cand("fast", p95=2.0, thr=(300, 310, 320))], REF, bar)
    assert decision.winner == "fast"
    assert "p95 latency" in decision.verdicts["slow"].reason


def test_select_promotes_nothing_when_no_candidate_passes():
    decision = select([cand("a", accuracy=0.5), cand("b", error="boom")], REF, BAR)
    assert decision.winner is None and not decision.promote
    assert "nothing promoted" in decision.summary


def test_select_a_noisy_expensive_candidate_never_beats_a_cheap_tight_one():
    # The script: $521 at 200-800/s used to tie with $130 at 780-820/s and win on accuracy.
    noisy = cand("noisy", accuracy=0.929, thr=(200, 500, 800), cost=521.0)
    tight = cand("tight", accuracy=0.921, thr=(780, 800, 820), cost=130.0)
    decision = select([noisy, tight], REF, BAR)
    assert decision.winner == "tight"
    assert "beyond the noise" in decision.verdicts["noisy"].reason


def test_select_fp32_whose_band_overlaps_does_not_win_when_its_median_is_slower():
    fp32 = cand("fp32", accuracy=0.930, thr=(300, 560, 900))   # wide band, overlaps int8's
    int8 = cand("int8", accuracy=0.925, thr=(600, 620, 640))
    assert select([fp32, int8], REF, BAR).winner == "int8"


def test_select_throughputs_within_noise_are_a_tie_and_accuracy_decides():
    # Prices differ only because the bands straddle an instance boundary: that difference is noise.
    cheap = cand("cheap", accuracy=0.921, thr=(760, 775, 790))
    accurate = cand("accurate", accuracy=0.929, thr=(740, 765, 785))
    assert cheap.monthly_cost_usd < accurate.monthly_cost_usd
    decision = select([cheap, accurate], REF, BAR)
    assert decision.winner == "accurate"
    assert "within measured noise" in decision.verdicts["cheap"].reason


def test_select_equal_cost_goes_to_the_faster_beyond_noise_and_says_so():
    slower = cand("slower", accuracy=0.929, cost=195, thr=(655, 661, 701))
    faster = cand("faster", accuracy=0.928, cost=195, thr=(718, 734, 748))
    decision = select([slower, faster], REF, BAR)
    assert decision.winner == "faster"
    assert "below faster's" in decision.verdicts["slower"].reason


def rounds_cand(name, rates, accuracy=0.925):
    """A candidate timed in interleaved rounds, summarised as the flow does (median, quartile band)."""
    rates = np.asarray(rates, dtype=float)
    low, mid, high = (float(np.quantile(rates, q)) for q in (0.25, 0.5, 0.75))
    return cand(name, accuracy=accuracy, thr=(low, mid, high), throughput_rounds=tuple(float(r) for r in rates))


def test_select_a_steady_gap_hidden_by_overlapping_bands_is_seen_round_by_round():
    # Two INT8 graphs whose bands overlap (the load moves both), the plain one more accurate but ~10%
    # slower in every round. Bands alone call it a tie; the rounds see the gap.
    load = np.array([1.00, 0.80, 1.05, 0.70, 0.95, 0.85, 1.02])
    fused = rounds_cand("fused", 200 * load, accuracy=0.9280)
    plain = rounds_cand("plain", 180 * load * np.array([1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0]), accuracy=0.9290)
    assert plain.throughput_per_s >= fused.throughput_low_per_s  # the band rule alone sees a tie
    decision = select([fused, plain], REF, BAR)
    assert decision.winner == "fused"
    assert "in every one of the 7 timing rounds" in decision.verdicts["plain"].reason
    assert paired_speed_ratio(plain, fused) < 1.0 - MARGIN


def test_select_a_gap_within_the_session_noise_margin_is_a_tie():
    # Slower in every round, but by 3%: a new session of the same graph can differ that much.
    load = np.array([1.00, 0.80, 1.05, 0.70, 0.95, 0.85, 1.02])
    fused = rounds_cand("fused", 200 * load, accuracy=0.9280)
    plain = rounds_cand("plain", 194 * load, accuracy=0.9290)
    decision = select([fused, plain], REF, BAR)
    assert decision.verdicts["fused"].on_speed_frontier and decision.verdicts["plain"].on_speed_frontier


def test_select_rounds_that_cross_are_a_tie_and_accuracy_decides():
    load = np.array([1.00, 0.80, 1.05, 0.70, 0.95, 0.85, 1.02])
    a = rounds_cand("a", 200 * load * np.array([1.03, 0.97, 1.02, 0.98, 1.01, 0.99, 1.0]), accuracy=0.921)
    b = rounds_cand("b", 200 * load * np.array([0.97, 1.03, 0.98, 1.02, 0.99, 1.01, 1.0]), accuracy=0.929)
    decision = select([a, b], REF, BAR)
    assert decision.winner == "b"
    assert decision.verdicts["a"].on_speed_frontier


def test_paired_ratio_needs_the_same_rounds():
    five = [100, 200, 300, 400, 500]
    assert paired_speed_ratio(rounds_cand("a", five), rounds_cand("b", five[:4])) is None
    assert paired_speed_ratio(rounds_cand("a", five[:4]), rounds_cand("b", five[:4])) is None  # too few
    assert paired_speed_ratio(replace(rounds_cand("a", five), throughput_rounds=(100, 200, math.nan, 400, 500)),
                              rounds_cand("b", five)) is None
    assert paired_speed_ratio(rounds_cand("a", [90, 180, 270, 360, 480]), rounds_cand("b", five)) == pytest.approx(0.96)


def test_select_equal_speeds_are_rarely_split_by_the_rounds():
    # Two equally fast candidates, 7 rounds of independent noise: "slower in every round" by chance
    # has probability 2 * 2^-7 = 1.6%; over 2,000 simulated timings it stays near that.
    rng = np.random.default_rng(0)
    split = 0
    for _ in range(2000):
        load = rng.uniform(0.6, 1.1, size=7)
        a = rounds_cand("a", 200 * load * rng.normal(1, 0.05, size=7))
        b = rounds_cand("b", 200 * load * rng.normal(1, 0.05, size=7))
        split += (paired_speed_ratio(a, b) or 2) < 1 or (paired_speed_ratio(b, a) or 2) < 1
    assert split / 2000 < 0.03


def rows_right(n_rows, wrong):
    """Per-row correctness: right on every row except the indices in `wrong`."""
    wrong = set(wrong)
    return tuple(i not in wrong for i in range(n_rows))


def test_select_one_row_of_accuracy_is_noise_and_the_smaller_file_wins():
    # Tied on speed; plain gets 1 more of 2,156 rows right. That is no evidence: the smaller file wins,
    # as it would whenever the timing rounds happen to put plain slower beyond the noise.
    fused = replace(cand("fused", accuracy=1 - 158 / 2156, size=22.8), correct_rows=rows_right(2156, range(158)))
    plain = replace(cand("plain", accuracy=1 - 157 / 2156, size=23.0), correct_rows=rows_right(2156, range(1, 158)))
    assert plain.accuracy > fused.accuracy and not more_accurate_beyond_noise(plain, fused, 0.95)
    decision = select([fused, plain], REF, BAR)
    assert decision.winner == "fused"
    assert "as accurate within noise and smaller" in decision.verdicts["plain"].reason


def test_select_accuracy_beyond_noise_still_beats_a_smaller_file():
    small = replace(cand("small", accuracy=1 - 190 / 2156, size=14.5), correct_rows=rows_right(2156, range(190)))
    accurate = replace(cand("accurate", accuracy=1 - 150 / 2156, size=23.0), correct_rows=rows_right(2156, range(150)))
    assert more_accurate_beyond_noise(accurate, small, 0.95)  # right on 40 rows the other misses, wrong on none of its
    assert select([small, accurate], REF, BAR).winner == "accurate"


def test_sign_test_counts_only_the_rows_where_they_disagree():
    a = rows_right(100, [0, 1])
    b = rows_right(100, list(range(2, 12)))  # a right on 10 rows b misses, b right on 2 rows a misses
    ca, cb = replace(cand("a"), correct_rows=a), replace(cand("b"), correct_rows=b)
    assert more_accurate_beyond_noise(ca, cb, 0.95)  # P(X >= 10 | n = 12) = 0.019
    assert not more_accurate_beyond_noise(ca, cb, 0.99)
    assert not more_accurate_beyond_noise(cb, ca, 0.5 + 1e-9)


def random_rounds_field(rng, n, rounds=7):
    """n passing candidates timed in the same rounds: a shared per-round load times own noise."""
    load = rng.uniform(0.6, 1.1, size=rounds)
    return [rounds_cand(f"c{i}", rng.uniform(150, 250) * load * rng.normal(1.0, rng.uniform(0.0, 0.1), size=rounds).clip(0.5),
                        accuracy=rng.uniform(0.917, 0.930)) for i in range(n)]


@pytest.mark.parametrize("seed", range(300))
def test_select_paired_rounds_keep_the_decision_consistent(seed):
    rng = np.random.default_rng(5000 + seed)
    field = random_rounds_field(rng, int(rng.integers(2, 8)))
    decision = select(field, REF, BAR)
    winner = next(c for c in field if c.name == decision.winner)
    assert not any(slower_beyond_noise(winner, other, MARGIN) for other in field)
    for c in field:
        for other in field:  # never both ways, so a tie is mutual and the relation has no cycles
            assert not (slower_beyond_noise(c, other, MARGIN) and slower_beyond_noise(other, c, MARGIN))
        if decision.verdicts[c.name].on_speed_frontier:
            assert not slower_beyond_noise(c, winner, MARGIN) and not slower_beyond_noise(winner, c, MARGIN)
        else:
            assert any(slower_beyond_noise(c, other, MARGIN) for other in field)
    fastest = max(field, key=lambda c: c.throughput_per_s)
    assert decision.verdicts[fastest.name].on_speed_frontier


@pytest.mark.parametrize("seed", range(300))
def test_select_a_candidate_slower_in_every_round_never_wins(seed):
    rng = np.random.default_rng(9000 + seed)
    field = random_rounds_field(rng, int(rng.integers(1, 6)))
    rival = field[int(rng.integers(len(field)))]
    # Slower than the rival in every round by more than the margin, and more accurate than anyone.
    slow = rounds_cand("slow", np.asarray(rival.throughput_rounds) * rng.uniform(0.80, 0.949, size=7), accuracy=0.9299)
    decision = select(field + [slow], REF, BAR)
    assert decision.winner != "slow"
    assert not decision.verdicts["slow"].on_speed_frontier


@pytest.mark.parametrize("seed", range(300))
def test_select_rounds_never_help_compared_with_bands_alone(seed):
    # The paired comparison only adds exclusions: whoever it lets win, the band rule let stay too.
    rng = np.random.default_rng(12000 + seed)
    field = random_rounds_field(rng, int(rng.integers(2, 7)))
    with_rounds = select(field, REF, BAR)
    bands_only = select([replace(c, throughput_rounds=()) for c in field], REF, BAR)
    assert bands_only.verdicts[with_rounds.winner].on_speed_frontier
    for c in field:
        if with_rounds.verdicts[c.name].on_speed_frontier:
            assert bands_only.verdicts[c.name].on_speed_frontier


# --------------------------------------------------------------------------- production, side by side
def test_select_keeps_production_measured_as_fast_and_as_accurate_within_noise():
    production = cand("production-v3", accuracy=0.925, thr=(600, 615, 630), is_production=True)
    new = cand("int8", accuracy=0.926, thr=(605, 620, 640), accuracy_gain_vs_production_low=-0.002)
    decision = select([production, new], REF, BAR)
    assert not decision.promote and "kept production" in decision.summary


def test_select_replaces_production_that_is_slower_beyond_noise():
    production = cand("production-v3", accuracy=0.930, thr=(280, 290, 300), is_production=True)
    new = cand("int8", accuracy=0.925, thr=(600, 620, 640), accuracy_gain_vs_production_low=-0.01)
    decision = select([production, new], REF, BAR)
    assert decision.winner == "int8" and decision.promote
    assert "slower beyond the noise" in decision.summary


def test_select_replaces_production_when_the_winner_is_more_accurate_beyond_noise():
    production = cand("production-v3", accuracy=0.920, thr=(600, 615, 630), is_production=True)
    new = cand("int8", accuracy=0.928, thr=(605, 620, 640), accuracy_gain_vs_production_low=0.003)
    decision = select([production, new], REF, BAR)
    assert decision.promote and "more accurate beyond noise" in decision.summary


def test_select_replaces_production_that_no_longer_meets_the_bar():
    production = cand("production-v3", accuracy=0.90, thr=(900, 910, 920), is_production=True)
    decision = select([production, cand("int8")], REF, BAR)
    assert decision.winner == "int8" and decision.promote
    assert "no longer meets the bar" in decision.summary


def test_select_production_that_is_the_best_candidate_stays():
    production = cand("production-v3", accuracy=0.928, thr=(700, 720, 740), is_production=True)
    decision = select([production, cand("fp32", accuracy=0.930, thr=(280, 290, 300))], REF, BAR)
    assert decision.winner == "production-v3" and not decision.promote


# --------------------------------------------------------------------------- fuzzed noise bands
def random_field(rng, n):
    """n passing candidates with random medians, asymmetric bands and accuracies; priced on their low end."""
    out = []
    for i in range(n):
        mid = rng.uniform(200, 1000)
        low, high = mid * (1 - rng.uniform(0, 0.4)), mid * (1 + rng.uniform(0, 0.4))
        out.append(cand(f"c{i}", accuracy=rng.uniform(0.917, 0.930), hard=0.69, thr=(low, mid, high),
                        size=rng.uniform(10, 90)))
    return out


def widen(c: Candidate, factor: float) -> Candidate:
    """The same median, a wider band, and the price that band's low end gives."""
    low = c.throughput_per_s - (c.throughput_per_s - c.throughput_low_per_s) * factor - 1.0
    high = c.throughput_per_s + (c.throughput_high_per_s - c.throughput_per_s) * factor + 1.0
    low = max(low, 1.0)
    return replace(c, throughput_low_per_s=low, throughput_high_per_s=high,
                   monthly_cost_usd=monthly_cost(low, PROFILE, TRAFFIC).monthly_cost_usd)


@pytest.mark.parametrize("seed", range(300))
def test_select_a_wider_band_never_helps_a_candidate(seed):
    rng = np.random.default_rng(seed)
    field = random_field(rng, int(rng.integers(2, 7)))
    target = int(rng.integers(len(field)))
    before = select(field, REF, BAR).winner
    widened = list(field)
    widened[target] = widen(field[target], rng.uniform(1.5, 6))
    after = select(widened, REF, BAR).winner
    if before != field[target].name:
        assert after != field[target].name


@pytest.mark.parametrize("seed", range(300))
def test_select_winner_is_never_slower_beyond_noise_and_ties_are_mutual(seed):
    rng = np.random.default_rng(1000 + seed)
    field = random_field(rng, int(rng.integers(2, 8)))
    decision = select(field, REF, BAR)
    winner = next(c for c in field if c.name == decision.winner)
    assert not any(slower_beyond_noise(winner, other, MARGIN) for other in field)
    for c in field:
        if decision.verdicts[c.name].on_speed_frontier:  # a tie is declared only when indistinguishable
            assert not slower_beyond_noise(c, winner, MARGIN) and not slower_beyond_noise(winner, c, MARGIN)
        else:
            assert any(slower_beyond_noise(c, other, MARGIN) for other in field)
        # the fastest band's owner is always on the frontier, so a cheapest candidate is never dropped
    fastest = max(field, key=lambda c: c.throughput_low_per_s)
    assert decision.verdicts[fastest.name].on_speed_frontier
    assert winner.monthly_cost_usd < math.inf


def test_a_candidate_never_timed_cannot_pass_even_with_passing_quality_numbers():
    """Fail closed: a scored candidate without measured speed has no price, so it is never the winner."""
    untimed = Candidate(name="untimed", recipe="int8-dynamic", accuracy=0.93, hard_slice_accuracy=0.90,
                        untimed_because="it fails the quality bar, so its speed cannot change the decision")
    timed = Candidate(name="timed", recipe="int8-dynamic", accuracy=0.92, hard_slice_accuracy=0.90,
                      throughput_per_s=200, throughput_low_per_s=190, throughput_high_per_s=210,
                      monthly_cost_usd=500, size_mb=23)
    decision = select([untimed, timed], Reference(0.93, 0.90), QualityBar())
    assert decision.winner == "timed" and not decision.verdicts["untimed"].passed_bar
    assert "not timed" in decision.verdicts["untimed"].reason
    alone = select([untimed], Reference(0.93, 0.90), QualityBar())
    assert alone.winner is None and not alone.promote
