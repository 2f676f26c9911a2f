"""The decoder candidates as a table and as the parent run's description."""

from __future__ import annotations

from tasks.decide.decoder_selection import DecoderDecision
from tasks.decide.report import render_table
from tasks.evaluate.decoders import DecoderCandidate

COLUMNS = ("candidate", "precision", "perplexity", "vs FP32", "token agree", "KL", "greedy same", "TTFT ms",
           "tok/s @1", "tok/s @c", "req/s in-proc", "req/s priced", "priced from", "size vs FP32", "$/month",
           "$/1M tokens", "verdict")
PRICED_FROM = {"served": "served", "served-ratio": "ratio", "batched": "in-process"}
# Weights that came as a 4-bit GGUF (Q4_1, block 32) already lie on INT4 block-32's grid: that
# recipe's quality is flattered on such a model, which every INT4 figure must say.
FLATTERED = "INT4 with block 32 is flattered here: the source weights were de-quantized from a Q4_1 GGUF (block 32)"


def verdict_word(c: DecoderCandidate, decision: DecoderDecision) -> str:
    """WINNER, pass, fail or failed (did not build or run)."""
    if c.name == decision.winner:
        return "WINNER"
    if c.error:
        return "failed"
    return "pass" if c.passed else "fail"


def decoder_rows(candidates: list[DecoderCandidate], decision: DecoderDecision) -> list[tuple[str, ...]]:
    """One row per candidate, cheapest first, then the failing ones."""
    def key(c: DecoderCandidate):
        return (c.cost is None, c.cost.monthly_cost_usd if c.cost else 0.0, c.name)

    rows = []
    for c in sorted(candidates, key=key):
        q, s = c.quality, c.speed
        speed = s.as_dict() if s and s.ttft_ms else None
        rows.append((
            c.name, c.built.precision,
            f"{q.candidate_perplexity:.3f}" if q else "-",
            f"{q.relative_perplexity_increase:+.2%}" if q else "-",
            f"{q.token_agreement:.2%}" if q else "-",
            f"{q.mean_kl:.4f}" if q else "-",
            f"{c.greedy.identical:.0%}" if c.greedy else "-",
            f"{speed['ttft_ms']:.1f}" if speed else "-",
            f"{speed['decode_tokens_per_s_batch1']:.1f}" if speed else "-",
            f"{speed['decode_tokens_per_s_concurrent']:.1f}" if speed else "-",
            f"{c.served_price.batched_sentences_per_s:.2f}" if c.served_price else "-",
            f"{c.served_price.sentences_per_s:.2f}" if c.served_price else "-",
            PRICED_FROM[c.served_price.basis] if c.served_price else "in-process" if c.cost else "-",
            f"{c.built.size_ratio:.2f}" if c.built.size_ratio else "-",
            f"{c.cost.monthly_cost_usd:,.0f}" if c.cost else "-",
            f"{c.usd_per_million_tokens:.3f}" if c.usd_per_million_tokens is not None else "-",
            verdict_word(c, decision),
        ))
    return rows


def render_decoder_table(candidates: list[DecoderCandidate], decision: DecoderDecision, flattered: bool = False) -> str:
    """Fixed-width table of the decoder candidates (with the INT4 note when the source was a 4-bit GGUF)."""
    table = render_table(decoder_rows(candidates, decision), COLUMNS)
    concurrency = next((c.speed.concurrency for c in candidates if c.speed), None)
    notes = [f"tok/s @c: decode tokens/s with {concurrency} sequences together" if concurrency else "",
             "req/s: requests (prompt in, the traffic's output tokens out) one instance completes; priced from "
             "served = its own load test through the served model, ratio = in-process x a served model's "
             "served/in-process ratio"]
    if flattered:
        notes.append(FLATTERED)
    return "\n".join([table, *[n for n in notes if n]])


def decoder_markdown(candidates: list[DecoderCandidate], decision: DecoderDecision, outcome: str,
                     promoted_version: str | None, serving_model: str) -> str:
    """The parent run's description: the decision, then the candidate table in Markdown."""
    head = f"**{outcome}**: {decision.summary}"
    if promoted_version:
        head += f" (registered as {serving_model} version {promoted_version})"
    rows = decoder_rows(candidates, decision)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    reasons = [f"- **{name}**: {why}" for name, why in decision.reasons.items()]
    return "\n\n".join(["## Decision", head, "## Candidates", "\n".join(lines), "\n".join(reasons)])
