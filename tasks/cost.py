"""Dollar cost of serving a candidate, from its measured throughput and a hardware price."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tasks.settings import HardwareProfile, TrafficSettings

HOURS_PER_MONTH = 730.0
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600


@dataclass(frozen=True)
class CostEstimate:
    """What serving the traffic costs on one hardware profile."""

    profile: str
    instances: int
    monthly_cost_usd: float
    usd_per_million_requests: float

    def as_dict(self) -> dict:
        """Plain dict for MLflow and the decision record."""
        return asdict(self)


def monthly_cost(throughput_per_s: float, profile: HardwareProfile, traffic: TrafficSettings) -> CostEstimate:
    """Instances needed to absorb the peak (and the monthly mean), priced for a 730-hour month.

    Callers pass the low end of the measured throughput interval, so capacity holds at the
    slowest measured repeat.

    Example: 1,500 requests/s at peak on a host that serves 216/s needs ceil(1500/216) = 7
    instances; at $0.0765/hour that is 7 * 0.0765 * 730 = $390.92 a month.
    """
    if throughput_per_s <= 0:
        raise ValueError("throughput must be positive to price a candidate")
    mean_rps = traffic.requests_per_month / SECONDS_PER_MONTH
    instances = max(1, math.ceil(max(traffic.peak_requests_per_second, mean_rps) / throughput_per_s))
    return CostEstimate(
        profile=profile.name,
        instances=instances,
        monthly_cost_usd=round(instances * profile.usd_per_hour * HOURS_PER_MONTH, 2),
        usd_per_million_requests=round(profile.usd_per_hour / (throughput_per_s * 3600) * 1e6, 4),
    )
