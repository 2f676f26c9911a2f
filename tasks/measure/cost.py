"""Dollar cost of serving a candidate, from its measured throughput and a hardware price."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tasks.config.settings import HardwareProfile, TrafficSettings

HOURS_PER_MONTH = 730.0
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600


@dataclass(frozen=True)
class CostEstimate:
    """What serving the traffic costs on one hardware profile."""

    profile: str
    instances: int
    monthly_cost_usd: float
    usd_per_million_requests: float
    # Instances needed at the fast end of the noise band; when it differs from `instances`, the
    # price sits on an instance-count boundary and could move with a small change in speed.
    instances_at_high: int | None = None

    @property
    def near_instance_boundary(self) -> bool:
        """The noise band of the throughput spans an instance-count boundary."""
        return self.instances_at_high is not None and self.instances_at_high != self.instances

    def boundary_note(self) -> str:
        """One line for the report, or "" when the price is not next to a boundary."""
        if not self.near_instance_boundary:
            return ""
        return (f"price sits on an instance boundary: {self.instances_at_high}-{self.instances} instances "
                f"within the throughput noise band")

    def as_dict(self) -> dict:
        """Plain dict for MLflow and the decision record."""
        return asdict(self)


def instances_needed(throughput_per_s: float, traffic: TrafficSettings) -> int:
    """Instances that absorb the peak (and the monthly mean) at this throughput per instance."""
    mean_rps = traffic.requests_per_month / SECONDS_PER_MONTH
    return max(1, math.ceil(max(traffic.peak_requests_per_second, mean_rps) / throughput_per_s))


def monthly_cost(throughput_per_s: float, profile: HardwareProfile, traffic: TrafficSettings,
                 throughput_high_per_s: float | None = None) -> CostEstimate:
    """Instances needed to absorb the peak (and the monthly mean), priced for a 730-hour month.

    Callers pass the low end of the measured throughput band (a robust low quantile over timing
    rounds), so capacity holds at the slow end of the noise; with the band's high end too, the
    estimate says whether the price sits next to an instance-count boundary.

    Example: 1,500 requests/s at peak on a host that serves 216/s needs ceil(1500/216) = 7
    instances; at $0.0765/hour that is 7 * 0.0765 * 730 = $390.92 a month.
    """
    if throughput_per_s <= 0:
        raise ValueError("throughput must be positive to price a candidate")
    if not math.isfinite(throughput_per_s):
        raise ValueError("throughput must be finite to price a candidate")
    instances = instances_needed(throughput_per_s, traffic)
    return CostEstimate(
        profile=profile.name,
        instances=instances,
        monthly_cost_usd=round(instances * profile.usd_per_hour * HOURS_PER_MONTH, 2),
        usd_per_million_requests=round(profile.usd_per_hour / (throughput_per_s * 3600) * 1e6, 4),
        instances_at_high=(instances_needed(throughput_high_per_s, traffic)
                           if throughput_high_per_s and throughput_high_per_s > 0 else None),
    )
