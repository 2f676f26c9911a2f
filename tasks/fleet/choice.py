"""The decision across instance types: each profile decides on its own measurements, then the
cheapest (candidate, profile) pair wins. Pure: measurements in, a choice out.

Within a profile the rules are selection's (tasks/decide/selection.py): the bar, speed beyond the
noise measured on that profile, production kept unless beaten beyond noise. Across profiles only
prices compare, each from figures measured on its own hardware. A price is an interval: the
instances needed at the slow end of the measured throughput (the price) down to those needed at the
fast end. One pair is cheaper than another beyond noise when its price is below the other's low end.
Among the pairs no other pair beats beyond noise, production's current instance type stays when it
is one of them (a move costs work and buys nothing provable), else the cheapest price wins, then
the profile cost.fleet lists first.

Worked example: 1,500 requests/s at peak; on a 1-core profile at $0.038/h INT8 serves 260/s (6
instances, $167/month, 290/s at the fast end: still 6); on a 2-core profile at $0.0765/h INT8
serves 480-520/s (4 instances, $223; 3 at the fast end: $168). $167 < $168: the 1-core pair is
cheaper beyond noise, and the report says "move from aws-c6a.large to emulated-1core".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tasks.build.reference import Reference
from tasks.config.settings import HardwareProfile, QualityBar, TrafficSettings
from tasks.decide.decision import select_measured
from tasks.decide.selection import Decision
from tasks.evaluate.candidates import MeasuredCandidate
from tasks.fleet.measure import ProfileMeasurement
from tasks.measure.cost import HOURS_PER_MONTH, monthly_cost
from tasks.measure.served_pricing import price_all


@dataclass
class ProfileOutcome:
    """One profile of the fleet: measured (its candidates priced on it and its own decision) or not, and why."""

    profile: HardwareProfile
    not_measured_because: str | None = None
    measurement: ProfileMeasurement | None = None
    candidates: list[MeasuredCandidate] = field(default_factory=list)  # priced on this profile
    decision: Decision | None = None
    wall_seconds: float = 0.0  # dispatch to answer, waiting for the worker included

    @property
    def measured(self) -> bool:
        """Whether its worker answered with a measurement (only then is it ranked)."""
        return self.not_measured_because is None

    def winner(self) -> MeasuredCandidate | None:
        """The candidate this profile's own decision picked (production when it is kept)."""
        name = self.decision.winner if self.decision else None
        return next((m for m in self.candidates if m.built.name == name), None)

    def as_dict(self) -> dict:
        """Plain dict for decision.json: its status, host, winner, price and each candidate's figures here."""
        winner = self.winner()
        return {"profile": self.profile.name, "usd_per_hour": self.profile.usd_per_hour,
                "work_pool": self.profile.work_pool, "measured": self.measured,
                "not_measured_because": self.not_measured_because,
                "host": self.measurement.host if self.measurement else None,
                "wall_seconds": round(self.wall_seconds, 1),
                "measurement_seconds": round(self.measurement.seconds, 1) if self.measurement else None,
                "winner": winner.built.name if winner else None,
                "decision": self.decision.summary if self.decision else None,
                "monthly_cost_usd": winner.cost.monthly_cost_usd if winner and winner.cost else None,
                "errors": self.measurement.errors if self.measurement else {},
                "candidates": {m.built.name: _figures(m) for m in self.candidates if m.speed}}


def priced_on(measured: list[MeasuredCandidate], measurement: ProfileMeasurement, profile: HardwareProfile,
              traffic: TrafficSettings) -> list[MeasuredCandidate]:
    """Copies of `measured` with the speeds, served capacities and prices of one profile.

    Quality stays as scored once; a candidate the profile did not time keeps no speed (selection
    then treats it as not measured), and one that failed there carries the profile's error.
    """
    copies = []
    for m in measured:
        name = m.built.name
        copy = replace(m, speed=None, cost=None, served_price=None, batched_cost=None)
        if name in measurement.errors:
            copy.error = f"on {profile.name}: {measurement.errors[name]}"
        elif name in measurement.speeds:
            copy.speed = measurement.speeds[name]
            copy.cost = monthly_cost(copy.speed.throughput_low_per_s, profile, traffic, copy.speed.throughput_high_per_s)
        copies.append(copy)
    timed = {m.built.name: m for m in copies if m.speed is not None}
    batched = {name: m.speed.throughput_low_per_s for name, m in timed.items()}
    if measurement.served:
        for name, (price, cost) in price_all(batched, measurement.served, profile, traffic).items():
            timed[name].batched_cost, timed[name].served_price, timed[name].cost = timed[name].cost, price, cost
    return copies


def decide_on_profile(outcome: ProfileOutcome, reference: Reference, bar: QualityBar) -> None:
    """The profile's own decision, by selection's rules on its own figures (sets `outcome.decision`)."""
    outcome.decision = select_measured(outcome.candidates, reference, bar)


@dataclass(frozen=True)
class Pair:
    """A profile's best candidate and what serving the traffic with it costs there."""

    profile: str
    candidate: str
    monthly_cost_usd: float  # instances at the slow end of the measured throughput
    low_monthly_cost_usd: float  # instances at the fast end
    instances: int
    is_production: bool


@dataclass
class FleetChoice:
    """The chosen pair (None: no profile was measured, or none has a passing candidate) and why."""

    pair: Pair | None
    pairs: list[Pair]
    incumbent: str | None  # the instance type production is served on, as its version's tag says
    summary: str
    # Set when the pair's candidate is not promoted: where production itself is cheapest (its own move).
    production_move: str | None = None

    @property
    def move(self) -> str:
        """One line for the report: where serving goes."""
        if self.pair is None:
            return f"stay on {self.incumbent}" if self.incumbent else "no instance type chosen"
        if self.incumbent is None:
            return f"serve on {self.pair.profile} (production records no instance type)"
        if self.incumbent == self.pair.profile:
            return f"stay on {self.pair.profile}"
        return f"move from {self.incumbent} to {self.pair.profile}"

    def as_dict(self) -> dict:
        """Plain dict for decision.json."""
        return {"profile": self.pair.profile if self.pair else None,
                "candidate": self.pair.candidate if self.pair else None, "incumbent": self.incumbent,
                "move": self.move, "summary": self.summary, "pairs": [vars(p) for p in self.pairs]}


def pair_of(outcome: ProfileOutcome, candidate: str | None = None) -> Pair | None:
    """The profile's winner (or `candidate`) as a pair, or None when it is not measured or nothing passed there."""
    if candidate is not None:
        winner = next((m for m in outcome.candidates if m.built.name == candidate), None) if outcome.measured else None
    else:
        winner = outcome.winner() if outcome.measured else None
    if winner is None or winner.cost is None:
        return None
    cost = winner.cost
    at_high = cost.instances_at_high or cost.instances
    return Pair(outcome.profile.name, winner.built.name, cost.monthly_cost_usd,
                round(at_high * outcome.profile.usd_per_hour * HOURS_PER_MONTH, 2), cost.instances,
                winner.built.is_production)


def choose_pair(outcomes: list[ProfileOutcome], incumbent: str | None, candidate: str | None = None) -> FleetChoice:
    """The cheapest pair beyond noise over the measured profiles (see the module's rules); with
    `candidate`, the cheapest profile for that one candidate (production, when nothing replaces it)."""
    pairs = [p for p in (pair_of(o, candidate) for o in outcomes) if p is not None]
    skipped = [f"{o.profile.name}: not measured ({o.not_measured_because})" for o in outcomes if not o.measured]
    skipped += [f"{o.profile.name}: nothing passes there ({o.decision.summary})" for o in outcomes
                if o.measured and pair_of(o, candidate) is None and o.decision]
    if not pairs:
        return FleetChoice(None, [], incumbent, "; ".join(skipped) or "no profile in the fleet")
    # Not beaten beyond noise: no other pair's price lies below its low end.
    frontier = [p for p in pairs if not any(q.monthly_cost_usd < p.low_monthly_cost_usd for q in pairs if q is not p)]
    order = {o.profile.name: i for i, o in enumerate(outcomes)}
    staying = next((p for p in frontier if p.profile == incumbent), None)
    chosen = staying or min(frontier, key=lambda p: (p.monthly_cost_usd, order[p.profile]))
    why = (f"{chosen.candidate} on {chosen.profile} at ${chosen.monthly_cost_usd:,.2f}/month ({chosen.instances} "
           f"instance{'s' if chosen.instances != 1 else ''})")
    others = [f"{p.candidate} on {p.profile} ${p.monthly_cost_usd:,.2f}" + (" (tie within noise)" if p in frontier else "")
              for p in pairs if p is not chosen]
    reason = "production's instance type is within noise of the cheapest" if staying and len(frontier) > 1 else "cheapest"
    summary = f"{reason}: {why}" + (f"; against {', '.join(others)}" if others else "")
    return FleetChoice(chosen, pairs, incumbent, summary + ("; " + "; ".join(skipped) if skipped else ""))


def priced_per_s(m: MeasuredCandidate) -> float:
    """The throughput a timed candidate's price comes from: its served figure, else its batched low end."""
    return m.served_price.sentences_per_s if m.served_price else m.speed.throughput_low_per_s


def _figures(m: MeasuredCandidate) -> dict:
    return {"throughput_per_s": m.speed.throughput_per_s, "throughput_low_per_s": m.speed.throughput_low_per_s,
            "throughput_high_per_s": m.speed.throughput_high_per_s, "latency_p95_ms": m.speed.latency_p95_ms,
            "throughput_rounds_per_s": list(m.speed.throughput_rounds),
            "priced_per_s": priced_per_s(m),
            "priced_from": m.served_price.describe() if m.served_price else "batched in-process throughput",
            "monthly_cost_usd": m.cost.monthly_cost_usd if m.cost else None,
            "instances": m.cost.instances if m.cost else None}
