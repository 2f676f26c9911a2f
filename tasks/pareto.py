"""The cost-quality frontier: candidates no other candidate beats on both cost and accuracy."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Point:
    """One measured candidate on the cost-quality plane."""

    name: str
    monthly_cost_usd: float
    accuracy: float
    passed_bar: bool


def frontier(points: list[Point]) -> list[Point]:
    """Points not dominated by another (another is no more expensive, no less accurate, and better in one).

    Returned cheapest first.
    """
    def dominated(p: Point) -> bool:
        return any(q.monthly_cost_usd <= p.monthly_cost_usd and q.accuracy >= p.accuracy
                   and (q.monthly_cost_usd < p.monthly_cost_usd or q.accuracy > p.accuracy) for q in points)

    return sorted((p for p in points if not dominated(p)), key=lambda p: (p.monthly_cost_usd, -p.accuracy))


def frontier_table(points: list[Point], selected: str | None) -> list[dict]:
    """Every point with its frontier membership and whether selection picked it, cheapest first."""
    on_frontier = {p.name for p in frontier(points)}
    return [{**asdict(p), "on_frontier": p.name in on_frontier, "selected": p.name == selected}
            for p in sorted(points, key=lambda p: (p.monthly_cost_usd, -p.accuracy))]


def plot_frontier(points: list[Point], selected: str | None, accuracy_floor: float | None, path: Path) -> Path:
    """Scatter of $/month against accuracy; the frontier as a line, the selected point circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = frontier(points)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for p in points:
        ax.scatter(p.monthly_cost_usd, p.accuracy * 100, color="#4C72B0" if p.passed_bar else "#C44E52", zorder=3)
        ax.annotate(p.name, (p.monthly_cost_usd, p.accuracy * 100), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.plot([p.monthly_cost_usd for p in front], [p.accuracy * 100 for p in front], "--", color="gray", label="frontier")
    winner = next((p for p in points if p.name == selected), None)
    if winner:
        ax.scatter(winner.monthly_cost_usd, winner.accuracy * 100, s=250, facecolors="none", edgecolors="green",
                   linewidths=2, label=f"selected: {winner.name}", zorder=4)
    if accuracy_floor is not None:
        ax.axhline(accuracy_floor * 100, color="#C44E52", linewidth=0.8, label="quality bar")
    ax.set_xlabel("$/month (measured throughput on this host)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
