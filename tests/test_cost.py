import math

import pytest

from tasks.config.settings import HardwareProfile, TrafficSettings
from tasks.measure.cost import monthly_cost

PROFILE = HardwareProfile(name="aws-c6a.large", usd_per_hour=0.0765)


def test_monthly_cost_matches_worked_example():
    cost = monthly_cost(216.0, PROFILE, TrafficSettings(requests_per_month=1e8, peak_requests_per_second=1500))
    assert cost.instances == 7
    assert cost.monthly_cost_usd == pytest.approx(7 * 0.0765 * 730, abs=0.01)


def test_monthly_cost_sizes_for_mean_load_when_it_exceeds_peak_setting():
    # 2.628e9 requests in a 730-hour month is 1,000 requests/s on average.
    cost = monthly_cost(100.0, PROFILE, TrafficSettings(requests_per_month=2.628e9, peak_requests_per_second=10))
    assert cost.instances == math.ceil(1000 / 100)


def test_monthly_cost_refuses_zero_throughput():
    with pytest.raises(ValueError):
        monthly_cost(0.0, PROFILE, TrafficSettings(requests_per_month=1, peak_requests_per_second=1))


def test_monthly_cost_says_when_the_noise_band_straddles_an_instance_boundary():
    traffic = TrafficSettings(requests_per_month=1e9, peak_requests_per_second=1500)
    near = monthly_cost(745.0, PROFILE, traffic, throughput_high_per_s=760.0)  # 3 instances at 745/s, 2 at 760/s
    assert near.instances == 3 and near.near_instance_boundary
    assert "2-3 instances" in near.boundary_note()
    clear = monthly_cost(800.0, PROFILE, traffic, throughput_high_per_s=820.0)
    assert not clear.near_instance_boundary and clear.boundary_note() == ""


def test_monthly_cost_refuses_nan_throughput():
    with pytest.raises(ValueError):
        monthly_cost(float("nan"), PROFILE, TrafficSettings(requests_per_month=1, peak_requests_per_second=1))
