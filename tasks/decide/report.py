"""The table a person reads at the end of a run."""

from __future__ import annotations

from tasks.decide.selection import Decision
from tasks.evaluate.candidates import MeasuredCandidate

# "batched/s": in-process throughput in batches of 32 (q25-q75 of the timing rounds); "served/s": texts
# per second the served model holds at the p95 target, with how it was found (load: its own load test,
# ratio: its batched figure times a load-tested model's served/batched ratio). $/month prices served/s.
COLUMNS = ("candidate", "precision", "accuracy", "loss vs FP32", "hard slice", "p50 ms", "p95 ms",
           "batched/s (q25-q75)", "served/s", "size MB", "$/month", "verdict")
_BASIS_WORD = {"served": "load", "served-ratio": "ratio", "batched": "batched"}


def served_cell(m: MeasuredCandidate) -> str:
    """The served figure a candidate is priced on, and how it was found ("-" when priced on batched)."""
    price = m.served_price
    if price is None or price.basis == "batched":
        return "-"
    return f"{price.sentences_per_s:.0f} ({_BASIS_WORD[price.basis]})"


def candidate_rows(measured: list[MeasuredCandidate], decision: Decision) -> list[tuple[str, ...]]:
    """One row of display strings per candidate."""
    rows = []
    for m in measured:
        verdict = decision.verdicts[m.built.name]
        status = verdict_word(m, decision)
        status = status.upper() if status == "winner" else status
        q, s, c = m.quality, m.speed, m.cost
        rows.append((
            m.built.name, m.built.precision,
            f"{q.accuracy:.2%}" if q else "-",
            f"{verdict.relative_accuracy_loss:+.2%}" if verdict.relative_accuracy_loss is not None else "-",
            f"{q.hard_slice_accuracy:.2%}" if q else "-",
            f"{s.latency_p50_ms:.2f}" if s else "-",
            f"{s.latency_p95_ms:.2f}" if s else "-",
            f"{s.throughput_per_s:.0f} ({s.throughput_low_per_s:.0f}-{s.throughput_high_per_s:.0f})" if s else "-",
            served_cell(m),
            f"{s.size_mb:.1f}" if s else "-",
            (f"{c.monthly_cost_usd:,.0f}" + ("*" if c.near_instance_boundary else "")) if c else "-",
            status,
        ))
    return rows


def verdict_word(m: MeasuredCandidate, decision: Decision) -> str:
    """winner | pass | fail | screened out (clearly failing on a sample of the rows: never timed) |
    deferred (clearly slower than a passing rival in the speed screen: never scored or timed)."""
    if m.built.name == decision.winner:
        return "winner"
    if m.screened_out:
        return "screened out"
    if m.deferred:
        return "deferred"
    return "pass" if decision.verdicts[m.built.name].passed_bar else "fail"


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


# Short, distinct run names for the MLflow runs table (its name column shows ~20 characters);
# the full candidate spec stays in the `requant.candidate` tag.
_RECIPE_SHORT = {"int8-dynamic": "int8", "int8-static": "int8-static", "int4-weight-only": "int4", "mixed": "mixed"}
_VALUE_SHORT = {("per_channel", "true"): "per-ch", ("per_channel", "false"): "per-t", ("graph", "optimized"): "fused",
                ("graph", "plain"): "plain"}


def short_name(name: str) -> str:
    """'int8-dynamic[per_channel=true,graph=plain]' -> 'int8 per-ch plain'; other names unchanged."""
    base, _, spec = name.partition("[")
    if not spec:
        return name
    parts = []
    for pair in spec.rstrip("]").split(","):
        key, _, value = pair.partition("=")
        parts.append(_VALUE_SHORT.get((key.strip(), value.strip()), value.strip()))
    return " ".join([_RECIPE_SHORT.get(base, base), *parts])


def short_names(names: list[str]) -> dict[str, str]:
    """A short name per candidate, made distinct when two shorten alike."""
    out, seen = {}, {}
    for name in names:
        short = short_name(name)
        seen[short] = seen.get(short, 0) + 1
        out[name] = short if seen[short] == 1 else f"{short} #{seen[short]}"
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows])


def candidates_markdown(measured: list[MeasuredCandidate], decision: Decision) -> str:
    """The candidate table for descriptions: cost and verdict first, then quality and speed, then the reason."""
    def order(m: MeasuredCandidate):
        verdict = decision.verdicts[m.built.name]
        return (m.built.name != decision.winner, not verdict.passed_bar, m.cost.monthly_cost_usd if m.cost else float("inf"))

    rows = []
    for m in sorted(measured, key=order):
        verdict = decision.verdicts[m.built.name]
        status = "**WINNER**" if m.built.name == decision.winner else verdict_word(m, decision)
        q, s, c = m.quality, m.speed, m.cost
        rows.append([
            m.built.name, status, f"${c.monthly_cost_usd:,.0f}" + ("*" if c.near_instance_boundary else "") if c else "-",
            f"{q.accuracy:.2%}" if q else "-",
            f"{verdict.relative_accuracy_loss:+.2%}" if verdict.relative_accuracy_loss is not None else "-",
            f"{verdict.hard_slice_relative_loss:+.2%}" if verdict.hard_slice_relative_loss is not None else "-",
            f"{s.throughput_per_s:.0f} ({s.throughput_low_per_s:.0f}-{s.throughput_high_per_s:.0f})" if s else "-",
            served_cell(m), f"{s.latency_p95_ms:.2f}" if s else "-", f"{s.size_mb:.1f}" if s else "-",
            verdict.reason if m.built.name != decision.winner else "",
        ])
    return _md_table(["candidate", "verdict", "$/month", "accuracy", "loss vs FP32", "hard-slice loss",
                      "batched/s (q25-q75)", "served/s", "p95 ms", "MB", "why"], rows)


def decision_markdown(decision: Decision, measured: list[MeasuredCandidate], outcome: str, cost_markdown: str,
                      confirmation: dict | None, promoted_version: str | None, serving_model: str) -> str:
    """The parent run's description: the decision, its cost analysis, and every candidate."""
    head = f"**{outcome}**: {decision.summary}"
    if promoted_version:
        head += f"\n\n`models:/{serving_model}/{promoted_version}` is now `@production`."
    lines = ["## Decision", "", head, ""]
    if confirmation and "accuracy" in confirmation:
        lines += [f"Confirmed on {confirmation['rows']} held-out rows (not used to choose it): "
                  f"{confirmation['accuracy']:.2%} vs FP32 {confirmation['fp32_accuracy']:.2%}, "
                  + ("passes the bar." if confirmation["passed_bar"] else f"**fails**: {confirmation['reason']}"), ""]
    lines += ["## Cost", "", cost_markdown, "", "## Candidates", "", candidates_markdown(measured, decision), "",
              "`*` the price sits on an instance-count boundary within the throughput noise band."]
    return "\n".join(lines)


def candidate_markdown(m: MeasuredCandidate, decision: Decision) -> str:
    """One candidate run's description: its verdict and why, then its key numbers."""
    verdict = decision.verdicts[m.built.name]
    status = verdict_word(m, decision).upper()
    lines = [f"**{status}**: {verdict.reason or 'see the decision'}", "", f"Candidate `{m.built.name}` "
             f"(recipe `{m.built.recipe}`, config hash `{m.built.config_hash}`)."]
    if m.error:
        lines += ["", f"Error: `{m.error}`"]
    if m.quality and m.cost and m.speed:
        lines += ["", f"Accuracy {m.quality.accuracy:.2%}, hard slice {m.quality.hard_slice_accuracy:.2%}; "
                      f"{m.speed.throughput_per_s:.0f} sentences/s ({m.speed.throughput_low_per_s:.0f}-"
                      f"{m.speed.throughput_high_per_s:.0f}), ${m.cost.monthly_cost_usd:,.2f}/month "
                      f"({m.cost.instances} instances)."]
    return "\n".join(lines)


def html_page(title: str, markdown_text: str) -> str:
    """A self-contained HTML page from markdown (tables included), for `requant report`."""
    import html

    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
             "th{background:#f3f3f3}code{background:#f6f6f6}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")
