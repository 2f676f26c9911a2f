"""The table a person reads at the end of a run."""

from __future__ import annotations

from tasks.candidates import MeasuredCandidate
from tasks.selection import Decision

COLUMNS = ("candidate", "precision", "accuracy", "loss vs FP32", "hard slice", "p50 ms", "p95 ms",
           "sent/s (q25-q75)", "size MB", "$/month", "verdict")


def candidate_rows(measured: list[MeasuredCandidate], decision: Decision) -> list[tuple[str, ...]]:
    """One row of display strings per candidate."""
    rows = []
    for m in measured:
        verdict = decision.verdicts[m.built.name]
        status = "WINNER" if m.built.name == decision.winner else ("pass" if verdict.passed_bar else "fail")
        q, s, c = m.quality, m.speed, m.cost
        rows.append((
            m.built.name, m.built.precision,
            f"{q.accuracy:.2%}" if q else "-",
            f"{verdict.relative_accuracy_loss:+.2%}" if verdict.relative_accuracy_loss is not None else "-",
            f"{q.hard_slice_accuracy:.2%}" if q else "-",
            f"{s.latency_p50_ms:.2f}" if s else "-",
            f"{s.latency_p95_ms:.2f}" if s else "-",
            f"{s.throughput_per_s:.0f} ({s.throughput_low_per_s:.0f}-{s.throughput_high_per_s:.0f})" if s else "-",
            f"{s.size_mb:.1f}" if s else "-",
            (f"{c.monthly_cost_usd:,.0f}" + ("*" if c.near_instance_boundary else "")) if c else "-",
            status,
        ))
    return rows


def render_table(rows: list[tuple[str, ...]], columns: tuple[str, ...] = COLUMNS) -> str:
    """Fixed-width text table."""
    widths = [max(len(columns[i]), *(len(r[i]) for r in rows)) for i in range(len(columns))]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def render_decision(decision: Decision, measured: list[MeasuredCandidate] | None = None,
                    confirmation: dict | None = None) -> str:
    """The decision, the winner's confirmation on held-out rows, each loser's reason, and price notes."""
    lines = [f"decision: {decision.summary}"]
    if confirmation:
        if "accuracy" in confirmation:
            lines.append(
                f"confirmed on {confirmation['rows']} held-out rows: {confirmation['candidate']} "
                f"{confirmation['accuracy']:.2%} vs FP32 {confirmation['fp32_accuracy']:.2%} "
                f"(loss {confirmation['relative_accuracy_loss']:+.2%}); "
                + ("passes the bar" if confirmation["passed_bar"] else f"FAILS: {confirmation['reason']}"))
        else:
            lines.append(f"confirmation of {confirmation['candidate']} failed: {confirmation['reason']}")
    lines += [f"  {name}: {v.reason}" for name, v in decision.verdicts.items() if name != decision.winner]
    notes = [f"  * {m.built.name}: {m.cost.boundary_note()}" for m in measured or [] if m.cost and m.cost.near_instance_boundary]
    if notes:
        lines += ["price notes (* in the table):", *notes]
    return "\n".join(lines)
