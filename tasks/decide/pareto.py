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
    why_failed: str = ""  # a few words: "accuracy", "hard slice", "interval", "p95 latency"
    is_production: bool = False


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


def failure_word(reason: str) -> str:
    """A few words for a failed verdict's reason, short enough to label a point."""
    for key, word in (("hard-slice", "hard slice"), ("paired interval", "interval"), ("absolute floor", "floor"),
                      ("below FP32", "accuracy"), ("p95", "p95 latency"), ("failed", "error")):
        if key in reason:
            return word
    return "fails"


def _label_offsets(points: list[Point], xspan: float, yspan: float) -> list[float]:
    """Vertical label offsets (points) that stack labels of points lying close together."""
    offsets, placed = [], []
    for p in points:
        near = [q for q in placed if abs(q.monthly_cost_usd - p.monthly_cost_usd) < 0.08 * xspan
                and abs(q.accuracy - p.accuracy) < 0.06 * yspan]
        offsets.append(4 + 10 * len(near))
        placed.append(p)
    return offsets


def plot_frontier(points: list[Point], selected: str | None, accuracy_floor: float | None, path: Path) -> Path:
    """$/month against accuracy: pass/fail (with why), the frontier, production and the winner marked.

    Labels of points that lie close together are stacked instead of drawn over each other.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = frontier(points)
    ordered = sorted(points, key=lambda p: (p.monthly_cost_usd, -p.accuracy))
    xs, ys = [p.monthly_cost_usd for p in points], [p.accuracy for p in points]
    xspan, yspan = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 0.01
    fig, ax = plt.subplots(figsize=(9, 5.5))
    passed = [p for p in points if p.passed_bar]
    failed = [p for p in points if not p.passed_bar]
    ax.scatter([p.monthly_cost_usd for p in passed], [p.accuracy * 100 for p in passed], color="#4C72B0", zorder=3,
               label="meets the bar")
    ax.scatter([p.monthly_cost_usd for p in failed], [p.accuracy * 100 for p in failed], color="#C44E52", marker="x",
               zorder=3, label="fails the bar (why in the label)")
    for p, dy in zip(ordered, _label_offsets(ordered, xspan, yspan)):
        label = p.name if p.passed_bar else f"{p.name} ({p.why_failed or 'fails'})"
        ax.annotate(label, (p.monthly_cost_usd, p.accuracy * 100), fontsize=7, xytext=(5, dy), textcoords="offset points",
                    color="#333333" if p.passed_bar else "#C44E52")
    ax.plot([p.monthly_cost_usd for p in front], [p.accuracy * 100 for p in front], "--", color="gray",
            label="Pareto frontier")
    production = next((p for p in points if p.is_production), None)
    if production:
        ax.scatter(production.monthly_cost_usd, production.accuracy * 100, s=160, marker="s", facecolors="none",
                   edgecolors="black", linewidths=1.5, zorder=4, label=f"current production: {production.name}")
    winner = next((p for p in points if p.name == selected), None)
    if winner:
        ax.scatter(winner.monthly_cost_usd, winner.accuracy * 100, s=300, facecolors="none", edgecolors="green",
                   linewidths=2, label=f"selected: {winner.name}", zorder=4)
    if accuracy_floor is not None:
        ax.axhline(accuracy_floor * 100, color="#C44E52", linewidth=0.8,
                   label="accuracy bar (point estimate; the gate also checks the interval and the hard slice)")
    ax.set_xlabel("$/month to serve the traffic (throughput measured on this host)")
    ax.set_ylabel("accuracy on the selection rows (%)")
    ax.set_title("Cost against accuracy: every candidate of this run")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
