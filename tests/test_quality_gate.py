import numpy as np
import pytest

from tasks.config.settings import QualityBar
from tasks.decide.selection import Candidate, Reference, select
from tasks.measure.quality_intervals import paired_relative_loss


def correctness(n, ref_right, only_ref, only_cand):
    """Paired correctness vectors: both right on ref_right - only_ref rows, then the discordant rows."""
    ref = np.zeros(n, bool)
    cand = np.zeros(n, bool)
    ref[:ref_right] = True
    cand[:ref_right - only_ref] = True
    cand[ref_right:ref_right + only_cand] = True
    return ref, cand


def test_paired_interval_matches_the_docstring_example():
    ref, cand = correctness(3080, 2863, only_ref=40, only_cand=33)
    loss = paired_relative_loss(ref, cand)
    assert loss.point == pytest.approx(7 / 2863)
    assert -0.006 < loss.low < 0 < loss.point < loss.high < 0.011


def test_gate_point_estimate_passes_but_interval_does_not():
    # 1.2% relative loss (point) with 120 discordant rows: inside a 1.5% bar, but not with 95% confidence.
    ref, cand = correctness(3080, 2860, only_ref=87, only_cand=53)
    loss = paired_relative_loss(ref, cand)
    assert loss.point < 0.015 < loss.high
    bar = QualityBar(max_relative_accuracy_loss=0.015, max_hard_slice_relative_loss=0.99)
    reference = Reference(accuracy=ref.mean(), hard_slice_accuracy=1.0)
    base = dict(recipe="r", hard_slice_accuracy=1.0, throughput_per_s=500, throughput_low_per_s=490,
                throughput_high_per_s=510, monthly_cost_usd=100, size_mb=20)
    point_only = Candidate(name="c", accuracy=cand.mean(), **base)
    with_interval = Candidate(name="c", accuracy=cand.mean(), accuracy_loss_high=loss.high, **base)
    assert select([point_only], reference, bar).winner == "c"
    decision = select([with_interval], reference, bar)
    assert decision.winner is None
    assert "paired interval" in decision.verdicts["c"].reason


def test_identical_predictions_have_a_zero_width_interval():
    ref, cand = correctness(500, 400, 0, 0)
    loss = paired_relative_loss(ref, cand)
    assert loss.low == loss.point == loss.high == 0.0


def test_paired_interval_refuses_mismatched_vectors():
    with pytest.raises(ValueError):
        paired_relative_loss(np.ones(3, bool), np.ones(4, bool))
