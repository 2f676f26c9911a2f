"""The cost analysis a buyer asks for: what serving costs now, after the decision, and what the run cost.

Pure: measured candidates and the decision in, numbers out. Every dollar figure comes from the
throughputs measured in this run on this host, priced on the hardware profile the host stands for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tasks.config.settings import HardwareProfile
from tasks.decide.selection import Decision
from tasks.evaluate.candidates import MeasuredCandidate
from tasks.measure.cost import HOURS_PER_MONTH


@dataclass(frozen=True)
class CostAnalysis:
    """Serving cost before and after the decision, the savings, the quality impact, and the run's payback."""

    profile: str
    usd_per_hour: float
    serving: str | None  # what serves after this decision (the winner if promoted, else production)
    serving_monthly_usd: float | None
    serving_accuracy: float | None
    production: str | None  # what served before (None: nothing yet)
    production_monthly_usd: float | None
    production_accuracy: float | None
    fp32_monthly_usd: float | None
    fp32_accuracy: float | None
    savings_vs_production_monthly_usd: float | None
    savings_vs_fp32_monthly_usd: float | None
    run_seconds: float
    run_cost_usd: float
    # Hours of the new savings (vs production, else vs FP32) that pay for this run; None: no savings.
    payback_hours: float | None
    priced_from: str = "batched in-process throughput"  # which throughput the dollar figures come from
    # Per row, the figure behind its price (tasks/measure/served_pricing.py: served, served-ratio or batched).
    serving_basis: str | None = None
    production_basis: str | None = None
    fp32_basis: str | None = None

    @property
    def savings_vs_production_yearly_usd(self) -> float | None:
        """Savings per year against the model that served before."""
        return None if self.savings_vs_production_monthly_usd is None else self.savings_vs_production_monthly_usd * 12

    @property
    def savings_vs_fp32_yearly_usd(self) -> float | None:
        """Savings per year against serving FP32 with ONNX Runtime."""
        return None if self.savings_vs_fp32_monthly_usd is None else self.savings_vs_fp32_monthly_usd * 12

    def as_dict(self) -> dict:
        """Plain dict for decision.json, with the yearly figures."""
        return {**asdict(self), "savings_vs_production_yearly_usd": self.savings_vs_production_yearly_usd,
                "savings_vs_fp32_yearly_usd": self.savings_vs_fp32_yearly_usd}


def _find(measured: list[MeasuredCandidate], predicate) -> MeasuredCandidate | None:
    return next((m for m in measured if predicate(m) and m.cost and m.quality and not m.error), None)


def analyse(measured: list[MeasuredCandidate], decision: Decision, profile: HardwareProfile,
            run_seconds: float, priced_from: str = "batched in-process throughput") -> CostAnalysis:
    """Price the decision.

    Example: production (FP32) costs $326/month, the promoted INT8 $130: savings $196/month,
    $2,352/year. The run took 180 s on a $0.0765/h instance: $0.0038, paid back by the savings
    in 0.0038 / (196 / 730) = 0.014 hours (under a minute).
    """
    production = _find(measured, lambda m: m.built.is_production)
    winner = _find(measured, lambda m: m.built.name == decision.winner)
    serving = winner if decision.promote else production
    fp32 = _find(measured, lambda m: m.built.recipe == "fp32" and not m.built.is_production)
    run_cost = run_seconds / 3600 * profile.usd_per_hour

    def saving(before: MeasuredCandidate | None) -> float | None:
        if before is None or serving is None:
            return None
        return round(before.cost.monthly_cost_usd - serving.cost.monthly_cost_usd, 2)

    vs_production, vs_fp32 = saving(production), saving(fp32)
    monthly = vs_production if production is not None else vs_fp32
    payback = run_cost / (monthly / HOURS_PER_MONTH) if monthly and monthly > 0 else None
    return CostAnalysis(
        profile=profile.name, usd_per_hour=profile.usd_per_hour,
        serving=serving.built.name if serving else None,
        serving_monthly_usd=serving.cost.monthly_cost_usd if serving else None,
        serving_accuracy=serving.quality.accuracy if serving else None,
        production=production.built.name if production else None,
        production_monthly_usd=production.cost.monthly_cost_usd if production else None,
        production_accuracy=production.quality.accuracy if production else None,
        fp32_monthly_usd=fp32.cost.monthly_cost_usd if fp32 else None,
        fp32_accuracy=fp32.quality.accuracy if fp32 else None,
        savings_vs_production_monthly_usd=vs_production, savings_vs_fp32_monthly_usd=vs_fp32,
        run_seconds=round(run_seconds, 1), run_cost_usd=round(run_cost, 4), payback_hours=payback,
        priced_from=priced_from, serving_basis=_basis(serving), production_basis=_basis(production),
        fp32_basis=_basis(fp32),
    )


def _basis(m: MeasuredCandidate | None) -> str | None:
    if m is None:
        return None
    return m.served_price.basis if m.served_price else "batched"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def _payback(hours: float | None) -> str:
    if hours is None:
        return "never (no savings)"
    if hours < 1:
        return f"{hours * 60:.1f} minutes of savings"
    return f"{hours:.1f} hours of savings" if hours < 48 else f"{hours / 24:.1f} days of savings"


def render_markdown(analysis: CostAnalysis) -> str:
    """The cost analysis as a markdown section (MLflow descriptions, report.md)."""
    a = analysis
    accuracy = lambda value: "-" if value is None else f"{value:.2%}"  # noqa: E731
    lines = [
        f"Priced on **{a.profile}** (${a.usd_per_hour}/hour) from {a.priced_from}, measured in this run.",
        "",
        "| | model | $/month | accuracy | priced from |",
        "|---|---|---|---|---|",
        f"| before | {a.production or '(no production model)'} | {_usd(a.production_monthly_usd)} | "
        f"{accuracy(a.production_accuracy)} | {a.production_basis or '-'} |",
        f"| after | {a.serving or '(nothing serving)'} | {_usd(a.serving_monthly_usd)} | {accuracy(a.serving_accuracy)} | "
        f"{a.serving_basis or '-'} |",
        f"| FP32 ONNX Runtime | fp32 | {_usd(a.fp32_monthly_usd)} | {accuracy(a.fp32_accuracy)} | {a.fp32_basis or '-'} |",
        "",
        f"- Savings vs production: **{_usd(a.savings_vs_production_monthly_usd)}/month**, "
        f"{_usd(a.savings_vs_production_yearly_usd)}/year",
        f"- Savings vs FP32: **{_usd(a.savings_vs_fp32_monthly_usd)}/month**, {_usd(a.savings_vs_fp32_yearly_usd)}/year",
    ]
    if a.serving_accuracy is not None and a.fp32_accuracy is not None:
        lines.append(f"- Quality impact vs FP32: {(a.serving_accuracy - a.fp32_accuracy) * 100:+.2f} accuracy points")
    if a.serving_accuracy is not None and a.production_accuracy is not None:
        lines.append(f"- Quality impact vs production: {(a.serving_accuracy - a.production_accuracy) * 100:+.2f} accuracy points")
    lines.append(f"- This run: {a.run_seconds:.0f} s on one instance = {_usd(a.run_cost_usd)}; paid back by "
                 f"{_payback(a.payback_hours)}")
    return "\n".join(lines)
