"""Selection is a pure function: table-driven tests with scripted numbers, no model."""

import pytest

from tasks.selection import Candidate, ProductionModel, Reference, select
from tasks.settings import QualityBar

REF = Reference(accuracy=0.930, hard_slice_accuracy=0.700)
BAR = QualityBar(max_relative_accuracy_loss=0.015, max_hard_slice_relative_loss=0.05)


def cand(name, accuracy=0.925, hard=0.69, cost=200.0, thr=(600, 620, 640), size=23.0, p95=2.0, error=None):
    low, mid, high = thr
    return Candidate(name=name, recipe="r", accuracy=accuracy, hard_slice_accuracy=hard, latency_p95_ms=p95,
                     throughput_per_s=mid, throughput_low_per_s=low, throughput_high_per_s=high,
                     monthly_cost_usd=cost, size_mb=size, error=error)


def test_select_picks_cheapest_passing_candidate():
    decision = select([cand("fp32", 0.93, cost=390, thr=(280, 290, 300)), cand("int8", cost=195)], REF, BAR)
    assert decision.winner == "int8" and decision.promote
    assert "costs $390.00/month" in decision.verdicts["fp32"].reason


@pytest.mark.parametrize("loser, reason", [
    (cand("lossy", accuracy=0.910, cost=100), "below FP32"),             # 2.2% relative loss > 1.5%
    (cand("fragile", hard=0.60, cost=100), "hard-slice"),                # 14% relative hard-slice loss
    (cand("broken", cost=100, error="NaN outputs"), "failed: NaN outputs"),
])
def test_select_rejects_candidate_outside_the_bar_even_when_cheapest(loser, reason):
    decision = select([loser, cand("ok", cost=195)], REF, BAR)
    assert decision.winner == "ok"
    assert not decision.verdicts[loser.name].passed_bar
    assert reason in decision.verdicts[loser.name].reason


def test_select_boundary_loss_exactly_at_bar_passes():
    at_bar = cand("edge", accuracy=REF.accuracy * (1 - 0.015) + 1e-12, cost=100)
    assert select([at_bar], REF, BAR).winner == "edge"


def test_select_p95_limit_applies_when_set():
    bar = BAR.model_copy(update={"max_p95_latency_ms": 3.0})
    decision = select([cand("slow", cost=100, p95=4.0), cand("fast", cost=150, p95=2.0, thr=(300, 310, 320))], REF, bar)
    assert decision.winner == "fast"
    assert "p95 latency" in decision.verdicts["slow"].reason


def test_select_promotes_nothing_when_no_candidate_passes():
    decision = select([cand("a", accuracy=0.5), cand("b", error="boom")], REF, BAR)
    assert decision.winner is None and not decision.promote
    assert "nothing promoted" in decision.summary


def test_select_does_not_decide_on_throughput_within_noise():
    # 'cheap' is cheaper on its median throughput, but the intervals overlap: that difference is
    # noise, so the more accurate candidate wins.
    cheap = cand("cheap", accuracy=0.921, cost=195, thr=(560, 640, 700))
    accurate = cand("accurate", accuracy=0.929, cost=260, thr=(520, 560, 600))
    decision = select([cheap, accurate], REF, BAR)
    assert decision.winner == "accurate"
    assert "within measured noise" in decision.verdicts["cheap"].reason


def test_select_decides_on_throughput_beyond_noise():
    cheap = cand("cheap", accuracy=0.921, cost=195, thr=(650, 660, 670))
    accurate = cand("accurate", accuracy=0.929, cost=260, thr=(390, 400, 410))
    assert select([cheap, accurate], REF, BAR).winner == "cheap"


def test_select_keeps_production_that_is_as_accurate_and_cheaper():
    production = ProductionModel(version="3", accuracy=0.929, monthly_cost_usd=150.0)
    decision = select([cand("int8", accuracy=0.925, cost=195)], REF, BAR, production)
    assert decision.winner == "int8" and not decision.promote
    assert "kept production" in decision.summary


def test_select_replaces_production_when_winner_is_cheaper():
    production = ProductionModel(version="3", accuracy=0.929, monthly_cost_usd=390.0)
    assert select([cand("int8", accuracy=0.925, cost=195)], REF, BAR, production).promote


def test_select_equal_cost_goes_to_the_faster_beyond_noise_and_says_so():
    slower = cand("slower", accuracy=0.929, cost=195, thr=(655, 661, 701))
    faster = cand("faster", accuracy=0.928, cost=195, thr=(718, 734, 748))
    decision = select([slower, faster], REF, BAR)
    assert decision.winner == "faster"
    assert "same $195.00/month" in decision.verdicts["slower"].reason
