"""The decision across instance types (tasks/fleet/choice.py), pure: each profile's winner at its own
price; a pair wins only when cheaper beyond the noise of its measured throughput; a profile that was
not measured is never ranked."""

from __future__ import annotations

import pytest

from tasks.build.candidates import BuiltCandidate
from tasks.config.settings import HardwareProfile, TrafficSettings
from tasks.decide.selection import Decision
from tasks.evaluate.candidates import MeasuredCandidate
from tasks.fleet.choice import ProfileOutcome, choose_pair, priced_on
from tasks.fleet.measure import ProfileMeasurement
from tasks.measure.served_pricing import SERVED, ServedCapacity
from tasks.measure.timing import SpeedMetrics

TRAFFIC = TrafficSettings(requests_per_month=1e6, peak_requests_per_second=1500)
SMALL = HardwareProfile(name="small", usd_per_hour=0.04, work_pool="pool-small")
LARGE = HardwareProfile(name="large", usd_per_hour=0.08, work_pool="pool-large")


def speed(low: float, high: float) -> SpeedMetrics:
    median = (low + high) / 2
    return SpeedMetrics(1.0, 2.0, 1.0, 1.0, median, low, high, 100.0, 20.0, low, high, 3, (low, median, high))


def candidate(name: str, production: bool = False) -> MeasuredCandidate:
    return MeasuredCandidate(BuiltCandidate(name, "int8-dynamic", "int8", {}, "h-" + name, is_production=production))


def outcome(profile: HardwareProfile, winner: str, low: float, high: float, production: bool = False) -> ProfileOutcome:
    """A measured profile whose own decision picked `winner`, timed at [low, high] texts/s there."""
    measurement = ProfileMeasurement(profile.name, {"cpu_model": "x"}, {winner: speed(low, high)})
    priced = priced_on([candidate(winner, production)], measurement, profile, TRAFFIC)
    return ProfileOutcome(profile, None, measurement, priced, Decision(winner, not production, "", {}, {}))


def test_the_cheaper_pair_beyond_noise_wins_and_the_report_says_where_serving_moves():
    # small: 1500/260 -> 6 instances (6 at the fast end too) = $175.20; large: 1500/480 -> 4 = $233.60
    # (3 at the fast end, 1500/520: $175.20). $175.20 is not below $175.20: a tie within noise.
    small, large = outcome(SMALL, "int8", 260, 290), outcome(LARGE, "int8", 480, 520)
    tie = choose_pair([large, small], incumbent="large")
    assert tie.pair.profile == "large" and tie.move == "stay on large"
    assert "within noise" in tie.summary

    # large's fast end still needs 4 instances: small is cheaper beyond noise, production moves.
    large = outcome(LARGE, "int8", 420, 450)
    choice = choose_pair([large, small], incumbent="large")
    assert (choice.pair.profile, choice.pair.candidate) == ("small", "int8")
    assert choice.pair.monthly_cost_usd == pytest.approx(6 * 0.04 * 730)
    assert choice.move == "move from large to small"
    assert choose_pair([large, small], incumbent=None).move == "serve on small (production records no instance type)"


def test_without_an_incumbent_a_tie_goes_to_the_lower_price_then_the_profile_listed_first():
    small, large = outcome(SMALL, "int8", 260, 290), outcome(LARGE, "int8", 480, 520)
    assert choose_pair([large, small], incumbent=None).pair.profile == "small"  # $175.20 < $233.60
    twin = outcome(HardwareProfile(name="twin", usd_per_hour=0.04, work_pool="p"), "int8", 260, 290)
    assert choose_pair([twin, small], incumbent=None).pair.profile == "twin"


def test_a_profile_not_measured_is_never_ranked_however_cheap_and_says_why():
    small = outcome(SMALL, "int8", 260, 290)
    free = ProfileOutcome(HardwareProfile(name="free", usd_per_hour=0.001, work_pool="p"), "no live worker in work pool p")
    choice = choose_pair([free, small], incumbent="free")
    assert choice.pair.profile == "small" and [p.profile for p in choice.pairs] == ["small"]
    assert "free: not measured (no live worker in work pool p)" in choice.summary
    nothing = choose_pair([free], incumbent="free")
    assert nothing.pair is None and nothing.move == "stay on free"


def test_a_profile_prices_each_candidate_on_its_own_figures_and_its_own_failures():
    measured = [candidate("fp32"), candidate("int8"), candidate("int4")]
    measured[2].untimed_because = "fails the bar"
    served = {"int8": ServedCapacity(200.0, 220.0, 1, 40.0, True, 30.0, 180.0, 5, 10.0)}
    measurement = ProfileMeasurement("small", {}, {"fp32": speed(100, 110), "int8": speed(300, 330)},
                                     {"fp32": "Fail while timing: out of memory"}, served)
    priced = {m.built.name: m for m in priced_on(measured, measurement, SMALL, TRAFFIC)}
    assert priced["fp32"].error == "on small: Fail while timing: out of memory" and priced["fp32"].speed is None
    assert priced["int8"].served_price.basis == SERVED and priced["int8"].cost.instances == 8  # ceil(1500 / 200)
    assert priced["int8"].batched_cost.instances == 5  # ceil(1500 / 300): the batched figure stays as a column
    assert priced["int4"].speed is None and priced["int4"].cost is None
    assert measured[1].speed is None  # the run's own candidates are untouched: each profile gets copies


def test_when_nothing_replaces_production_its_own_cheapest_profile_says_where_it_goes():
    def both(profile: HardwareProfile, int8_at: tuple[float, float], production_at: tuple[float, float]) -> ProfileOutcome:
        measurement = ProfileMeasurement(profile.name, {}, {"int8": speed(*int8_at), "production-v1": speed(*production_at)})
        priced = priced_on([candidate("int8"), candidate("production-v1", production=True)], measurement, profile, TRAFFIC)
        return ProfileOutcome(profile, None, measurement, priced, Decision("int8", True, "", {}, {}))

    # int8 is cheapest on large (2 x $0.08 against 6 x $0.04); production alone is cheapest on small
    # (6 x $0.04 against 5 x $0.08).
    small, large = both(SMALL, (250, 260), (260, 290)), both(LARGE, (800, 820), (300, 320))
    assert choose_pair([small, large], incumbent="small").pair.profile == "large"
    production = choose_pair([small, large], incumbent="large", candidate="production-v1")
    assert (production.pair.profile, production.pair.candidate) == ("small", "production-v1")
    assert production.move == "move from large to small"
