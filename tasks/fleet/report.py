"""The fleet in the report: one candidate table per profile, the profiles not measured and why, and
where serving moves."""

from __future__ import annotations

from tasks.decide.report import candidate_rows, render_table
from tasks.fleet.choice import FleetChoice, ProfileOutcome, priced_per_s


def profile_heading(outcome: ProfileOutcome) -> str:
    """`name ($/h, pool): CPU, cores` or `name: not measured (why)`."""
    p = outcome.profile
    head = f"{p.name} (${p.usd_per_hour}/h, work pool {p.work_pool})"
    if not outcome.measured:
        return f"{head}: NOT MEASURED, never ranked: {outcome.not_measured_because}"
    host = outcome.measurement.host
    return (f"{head}: {host.get('cpu_model')}, {host.get('cores_available')} core(s), onnxruntime "
            f"{host.get('onnxruntime')}; measured in {outcome.measurement.seconds:.0f} s ({outcome.wall_seconds:.0f} s "
            f"from dispatch to answer); its own decision: "
            f"{outcome.decision.summary}")


def render_fleet(outcomes: list[ProfileOutcome], choice: FleetChoice) -> str:
    """Text for report.txt: the choice and the move first, then each profile's table."""
    move = (f"{choice.production_move} (production keeps serving: {choice.pair.candidate} on {choice.pair.profile} "
            "is not promoted)" if choice.production_move and choice.pair and not choice.pair.is_production
            else choice.production_move or choice.move)
    parts = [f"instance type: {move}", f"fleet decision: {choice.summary}"]
    for outcome in outcomes:
        parts.append(profile_heading(outcome))
        if outcome.measured:
            parts.append(render_table(candidate_rows(outcome.candidates, outcome.decision)))
    return "\n\n".join(parts)


def fleet_rows(outcomes: list[ProfileOutcome]) -> list[dict]:
    """One row per (profile, candidate) for the Prefect table artifact, the profile a column."""
    rows = []
    for o in outcomes:
        if not o.measured:
            rows.append({"profile": o.profile.name, "candidate": None, "verdict": "not measured",
                         "usd_per_month": None, "priced_per_s": None, "reason": o.not_measured_because})
            continue
        for m in o.candidates:
            verdict = o.decision.verdicts[m.built.name]
            rows.append({"profile": o.profile.name, "candidate": m.built.name,
                         "verdict": "winner" if m.built.name == o.decision.winner else
                         "pass" if verdict.passed_bar else "fail",
                         "usd_per_month": m.cost.monthly_cost_usd if m.cost else None,
                         "priced_per_s": round(priced_per_s(m)) if m.speed else None,
                         "reason": verdict.reason})
    return rows


def fleet_metrics(candidate: str, outcomes: list[ProfileOutcome]) -> dict[str, float]:
    """A candidate's figures on every profile that measured it, as MLflow metrics (`fleet.PROFILE.*`)."""
    out = {}
    for o in outcomes:
        m = next((c for c in o.candidates if c.built.name == candidate and c.speed and c.cost), None)
        if m is None:
            continue
        out[f"fleet.{o.profile.name}.throughput_per_s"] = m.speed.throughput_per_s
        out[f"fleet.{o.profile.name}.priced_per_s"] = priced_per_s(m)
        out[f"fleet.{o.profile.name}.monthly_cost_usd"] = m.cost.monthly_cost_usd
    return out
