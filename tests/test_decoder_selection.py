"""Choosing among decoder candidates on served prices (tasks/decide/decoder_selection.py): the per-round
capacities are scaled by each one's served/in-process ratio, and two served candidates whose served
capacity intervals overlap are never told apart."""

from __future__ import annotations

import pytest

from tasks.build.candidates import BuiltCandidate
from tasks.config.settings import HardwareProfile, TrafficSettings
from tasks.decide.decoder_selection import select_decoder, served_intervals_overlap
from tasks.evaluate.decoders import (
    DecoderCandidate,
    DecoderSpeed,
    usd_per_million_tokens,
)
from tasks.measure.cost import monthly_cost
from tasks.measure.lm_quality import LmQuality
from tasks.measure.served_pricing import SERVED, ServedCapacity, ServedPrice

PROFILE = HardwareProfile(name="aws-c6a.large", usd_per_hour=0.0765)
TRAFFIC = TrafficSettings(requests_per_month=1e6, peak_requests_per_second=2, output_tokens_per_request=100)


def candidate(name: str, agreement: float, decode_tps: list[float], served: tuple[float, float | None]) -> DecoderCandidate:
    """A passing candidate timed in 5 rounds (TTFT 0.2 s, `decode_tps` with 4 sequences) and load-tested at `served`."""
    quality = LmQuality(25.0, 25.0 / agreement, 0.0, agreement, 0.0, 24, 6000, (0.0, 0.0), (agreement, agreement),
                        (0.0, 0.0))
    c = DecoderCandidate(BuiltCandidate(name, "int8-weight-only" if name != "fp32" else "fp32", "int8", {}, name,
                                        size_ratio=1.0 if name == "fp32" else 0.45),
                         quality=quality, passed=True, speed=DecoderSpeed([200.0] * 5, [40.0] * 5, decode_tps, 4))
    inprocess = c.inprocess_capacity_rps(TRAFFIC)
    capacity = ServedCapacity(served[0], served[1], 1, 5000.0, True, 0.1, 150.0, 5, 240.0)
    c.served_price = ServedPrice(SERVED, served[0], inprocess, served[0] / inprocess, None, capacity)
    c.cost = monthly_cost(served[0], PROFILE, TRAFFIC, served[1])
    c.usd_per_million_tokens = usd_per_million_tokens(served[0], PROFILE, TRAFFIC)
    return c


def test_a_quantized_decoder_faster_in_every_round_but_inside_fp32s_served_interval_does_not_win():
    fp32 = candidate("fp32", 1.0, [110.0, 111.0, 109.0, 112.0, 110.0], served=(2.05, 2.48))
    int8 = candidate("int8", 0.97, [148.0, 147.0, 149.0, 146.0, 148.0], served=(2.42, 2.73))
    assert served_intervals_overlap(fp32, int8)
    decision = select_decoder([fp32, int8], 100, margin=0.05)
    # In process int8 is 1.3x faster in every round, but served the two overlap: a tie, and FP32 agrees most.
    assert decision.winner == "fp32"
    assert "as fast as fp32 within noise" in decision.reasons["int8"]


def test_served_intervals_apart_let_the_faster_one_win():
    fp32 = candidate("fp32", 1.0, [110.0, 111.0, 109.0, 112.0, 110.0], served=(1.4, 1.6))
    int8 = candidate("int8", 0.97, [148.0, 147.0, 149.0, 146.0, 148.0], served=(2.4, 2.7))
    assert not served_intervals_overlap(fp32, int8)
    decision = select_decoder([fp32, int8], 100, margin=0.05)
    assert decision.winner == "int8" and decision.promote
    assert "slower beyond the noise" in decision.reasons["fp32"]
    assert int8.cost.instances == 1 and fp32.cost.instances == 2  # 2 requests/s at peak


@pytest.mark.parametrize(("a", "b", "overlap"), [((1.0, 1.2), (1.1, 1.3), True), ((1.0, 1.2), (1.2, 1.4), False),
                                                 ((1.0, None), (5.0, 6.0), True), ((2.0, 2.1), (1.0, 1.5), False)])
def test_served_interval_overlap(a, b, overlap):
    tps = [100.0] * 5
    assert served_intervals_overlap(candidate("fp32", 1.0, tps, a), candidate("int8", 0.97, tps, b)) is overlap
