"""Quality of a quantized decoder language model against its FP32 reference, per document.

This module owns the numbers a decoder candidate is judged on and the judgement itself: scoring one
window of tokens from both models' logits (negative log-likelihood of the actual next tokens, top-1
next-token agreement, KL(FP32 || candidate) on the full vocabulary), adding windows up per document
(one WikiText-2 article), pooling documents into perplexities and rates with paired bootstrap
intervals over documents, greedy-generation agreement on fixed prompts, and the verdict against an
`LmBar`. It is pure numpy: the caller runs the models (PyTorch, ONNX Runtime) and hands over logits.

Both models are scored on the same tokens of the same documents, so the intervals come from one
resample of documents applied to both (a paired bootstrap): a document that is hard for FP32 is
hard for the candidate too, and only the difference between them moves the relative perplexity.
Documents, not tokens, are resampled because tokens within an article are far from independent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Logit elements (positions x vocabulary) converted to float64 at a time: about 8 MB per array, so a
# 512-token window over a 49,152-token vocabulary is scored in ~50 MB however long the window is.
DEFAULT_CHUNK_ELEMENTS = 1 << 20


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, stable for large logits (the row maximum is subtracted first).

    Args:
        logits: any shape [..., V]; half precision is computed in float32, integers in float64.

    Returns:
        An array of the same shape; each row's exp sums to 1.
    """
    x = np.asarray(logits)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    elif x.dtype.itemsize < 4:
        x = x.astype(np.float32)
    peak = np.max(x, axis=-1, keepdims=True)
    # A row of -inf has no maximum to subtract; leave it as is rather than produce inf - inf here.
    shifted = x - np.where(np.isfinite(peak), peak, 0)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


@dataclass(frozen=True)
class WindowScore:
    """Sums over the scored next-token positions of one window (or several added together).

    Attributes:
        nll_reference: negative log-likelihood (nats) of the actual next tokens under FP32.
        nll_candidate: the same under the candidate.
        agree: positions where the candidate's top-1 next token equals FP32's.
        kl: sum over positions of KL(P_FP32 || P_candidate), in nats.
        tokens: positions scored.
    """

    nll_reference: float = 0.0
    nll_candidate: float = 0.0
    agree: int = 0
    kl: float = 0.0
    tokens: int = 0

    def __add__(self, other: WindowScore) -> WindowScore:
        return WindowScore(self.nll_reference + other.nll_reference, self.nll_candidate + other.nll_candidate,
                           self.agree + other.agree, self.kl + other.kl, self.tokens + other.tokens)


def score_window(reference_logits: np.ndarray, candidate_logits: np.ndarray, input_ids: np.ndarray,
                 mask: np.ndarray | None = None, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> WindowScore:
    """Score one window of tokens (or a batch of windows) from both models' logits.

    Position t predicts token t+1, as in `model(input_ids, labels=input_ids)`: a window of T tokens
    has T-1 predicted positions. With a mask, only targets t+1 where mask[t+1] is non-zero count,
    which is how padding and the already-scored context of an overlapping (strided) window are left
    out; it is the `labels == -100` convention of Hugging Face, written as a mask over the tokens.

    Example: T = 4 tokens [a, b, c, d] with mask [1, 1, 0, 1] scores the predictions of b (from
    position 0) and d (from position 2), so `tokens` is 2.

    Args:
        reference_logits: FP32 logits, [T, V] or [B, T, V].
        candidate_logits: the candidate's logits on the same tokens, same shape.
        input_ids: the tokens, [T] or [B, T].
        mask: optional, the shape of input_ids; non-zero marks a target token that is scored.
        chunk_elements: positions x vocabulary converted to float64 at a time (bounds memory).

    Returns:
        The sums over the scored positions of all windows given.

    Raises:
        ValueError: on mismatched shapes or a token id outside the vocabulary.
    """
    reference = np.asarray(reference_logits)
    candidate = np.asarray(candidate_logits)
    ids = np.asarray(input_ids)
    if reference.shape != candidate.shape:
        raise ValueError(f"reference logits {reference.shape} and candidate logits {candidate.shape} differ in shape")
    if reference.ndim not in (2, 3):
        raise ValueError(f"logits must be [T, V] or [B, T, V], got shape {reference.shape}")
    if ids.shape != reference.shape[:-1]:
        raise ValueError(f"input_ids {ids.shape} do not match the logits' positions {reference.shape[:-1]}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got {ids.dtype}")
    if reference.ndim == 2:  # one window: a batch of one (views, no copies)
        reference, candidate, ids = reference[None], candidate[None], ids[None]
        mask = None if mask is None else np.asarray(mask)[None]
    scored = np.ones(ids[:, 1:].shape, dtype=bool) if mask is None else _target_mask(mask, ids.shape)
    rows, positions = np.nonzero(scored)
    targets = ids[rows, positions + 1]
    vocab = reference.shape[-1]
    if targets.size and (targets.min() < 0 or targets.max() >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}), got {targets.min()}..{targets.max()}")
    step = max(1, chunk_elements // max(vocab, 1))
    nll_reference = nll_candidate = kl = 0.0
    agree = 0
    for start in range(0, len(targets), step):
        r, p, target = rows[start:start + step], positions[start:start + step], targets[start:start + step]
        ref = reference[r, p].astype(np.float64)
        cand = candidate[r, p].astype(np.float64)
        agree += int(np.count_nonzero(ref.argmax(axis=-1) == cand.argmax(axis=-1)))
        ref, cand = log_softmax(ref), log_softmax(cand)
        here = np.arange(len(target))
        nll_reference -= float(ref[here, target].sum())
        nll_candidate -= float(cand[here, target].sum())
        prob = np.exp(ref)
        # 0 * log 0 is 0: a token FP32 gives no mass adds nothing, even where the candidate gives it none.
        with np.errstate(invalid="ignore"):
            per_position = np.where(prob > 0, prob * (ref - cand), 0.0).sum(axis=-1)
        kl += float(np.maximum(per_position, 0.0).sum())  # KL >= 0; rounding can leave -1e-17
    return WindowScore(nll_reference, nll_candidate, agree, kl, len(targets))


def _target_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask {mask.shape} does not match input_ids {shape}")
    return mask[:, 1:] != 0


@dataclass(frozen=True)
class DocumentScores:
    """The window sums of one document (one WikiText-2 article), the unit the intervals resample."""

    document: str
    nll_reference: float
    nll_candidate: float
    agree: int
    kl: float
    tokens: int

    @classmethod
    def from_windows(cls, document: str, windows: Iterable[WindowScore]) -> DocumentScores:
        """Add up the windows of one document (each from `score_window`).

        Args:
            document: the document's name (its article title or index), for the record.
            windows: its scored windows; a generator keeps only one window's logits alive at a time.
        """
        total = sum(windows, WindowScore())
        return cls(document, total.nll_reference, total.nll_candidate, total.agree, total.kl, total.tokens)


@dataclass(frozen=True)
class LmQuality:
    """A decoder candidate's quality against FP32, pooled over documents, with paired intervals.

    Perplexities are exp(total NLL / total tokens), pooled over all documents (not a mean of
    per-document perplexities). Each interval is a percentile interval at `confidence` from a
    paired bootstrap over documents.
    """

    reference_perplexity: float
    candidate_perplexity: float
    relative_perplexity_increase: float
    token_agreement: float
    mean_kl: float
    documents: int
    tokens: int
    perplexity_increase_interval: tuple[float, float]
    agreement_interval: tuple[float, float]
    kl_interval: tuple[float, float]
    confidence: float = 0.95

    def as_dict(self) -> dict[str, float]:
        """Flat float metrics for MLflow, all named `lm_*`."""
        return {
            "lm_perplexity": float(self.candidate_perplexity),
            "lm_reference_perplexity": float(self.reference_perplexity),
            "lm_relative_perplexity_increase": float(self.relative_perplexity_increase),
            "lm_relative_perplexity_increase_low": float(self.perplexity_increase_interval[0]),
            "lm_relative_perplexity_increase_high": float(self.perplexity_increase_interval[1]),
            "lm_token_agreement": float(self.token_agreement),
            "lm_token_agreement_low": float(self.agreement_interval[0]),
            "lm_token_agreement_high": float(self.agreement_interval[1]),
            "lm_mean_kl": float(self.mean_kl),
            "lm_mean_kl_low": float(self.kl_interval[0]),
            "lm_mean_kl_high": float(self.kl_interval[1]),
            "lm_documents": float(self.documents),
            "lm_tokens": float(self.tokens),
        }


def summarise(documents: Sequence[DocumentScores], confidence: float = 0.95, resamples: int = 2000,
              seed: int = 0) -> LmQuality:
    """Pool documents into perplexities and rates, with paired bootstrap intervals over documents.

    Each resample draws len(documents) documents with replacement and applies the same draw to
    FP32 and the candidate, then recomputes the pooled ratios. Example: 24 articles of ~250 scored
    tokens each, FP32 perplexity 20.0 and candidate 20.6 pooled: the point increase is +3.0%; if
    the 95% interval is [+2.1%, +4.0%] it meets a 5% bar, while a candidate at +4.5% whose interval
    reaches +6.0% does not (the bar is held against the upper end).

    Args:
        documents: per-document sums, each with at least one scored token.
        confidence: two-sided coverage of the percentile intervals.
        resamples: bootstrap resamples.
        seed: fixed, so the same scores always give the same intervals.

    Raises:
        ValueError: with no documents, a document without scored tokens, or a bad confidence.
    """
    if not documents:
        raise ValueError("no documents to summarise")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    empty = [d.document for d in documents if d.tokens <= 0]
    if empty:
        raise ValueError(f"documents without scored tokens: {', '.join(empty[:5])}")
    # Columns: nll_reference, nll_candidate, agree, kl, tokens (counts stay exact in float64).
    sums = np.array([[d.nll_reference, d.nll_candidate, d.agree, d.kl, d.tokens] for d in documents],
                    dtype=np.float64)
    point = _pooled(sums.sum(axis=0)[None])
    count = len(documents)
    rng = np.random.default_rng(seed)
    draws = np.empty((resamples, 3), dtype=np.float64)
    step = max(1, 4_000_000 // count)  # bound memory: ~32 MB of resample counts at a time
    uniform = np.full(count, 1.0 / count)
    for start in range(0, resamples, step):
        n = min(step, resamples - start)
        # How often each document is drawn in each resample: the same weights for both models.
        weights = rng.multinomial(count, uniform, size=n).astype(np.float64)
        draws[start:start + n] = _pooled(weights @ sums)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail], axis=0)
    increase, agreement, kl = (float(v) for v in point[0])
    nll_reference, nll_candidate, tokens = sums[:, 0].sum(), sums[:, 1].sum(), sums[:, 4].sum()
    return LmQuality(
        reference_perplexity=float(np.exp(nll_reference / tokens)),
        candidate_perplexity=float(np.exp(nll_candidate / tokens)),
        relative_perplexity_increase=increase, token_agreement=agreement, mean_kl=kl,
        documents=count, tokens=int(tokens),
        perplexity_increase_interval=(float(low[0]), float(high[0])),
        agreement_interval=(float(low[1]), float(high[1])),
        kl_interval=(float(low[2]), float(high[2])),
        confidence=confidence)


def _pooled(sums: np.ndarray) -> np.ndarray:
    """[n, 5] column sums -> [n, 3]: relative perplexity increase, token agreement, mean KL."""
    tokens = sums[:, 4]
    # cand/ref - 1 = exp((NLL_cand - NLL_ref) / tokens) - 1, without forming two large exponentials.
    increase = np.expm1((sums[:, 1] - sums[:, 0]) / tokens)
    return np.stack([increase, sums[:, 2] / tokens, sums[:, 3] / tokens], axis=1)


@dataclass(frozen=True)
class GreedyAgreement:
    """How often the candidate's greedy continuation of a fixed prompt equals FP32's.

    Attributes:
        identical: share of prompts whose generated tokens are identical to FP32's.
        mean_prefix: mean share of FP32's continuation matched before the first differing token.
        prompts: prompts compared.
    """

    identical: float
    mean_prefix: float
    prompts: int

    def as_dict(self) -> dict[str, float]:
        """Flat float metrics for MLflow."""
        return {"lm_greedy_identical": float(self.identical), "lm_greedy_mean_prefix": float(self.mean_prefix),
                "lm_greedy_prompts": float(self.prompts)}


def greedy_agreement(reference_tokens: Sequence[Sequence[int]],
                     candidate_tokens: Sequence[Sequence[int]]) -> GreedyAgreement:
    """Compare greedy continuations of the same prompts, one list of generated token ids per prompt.

    Pass the generated tokens only, without the prompt (the prompt always matches and would inflate
    the prefix share), and keep the end-of-sequence token if one was generated, so that stopping
    early or late counts as a difference. Example: FP32 [5, 6, 7, 8] against [5, 6, 9, 8] matches
    a prefix of 2 of 4 tokens (0.5) and is not identical. An empty FP32 continuation counts as a
    full prefix (1.0); it is identical only to an empty candidate continuation.

    Args:
        reference_tokens: FP32's generated token ids, per prompt.
        candidate_tokens: the candidate's, for the same prompts in the same order.

    Raises:
        ValueError: with no prompts, or different numbers of prompts.
    """
    if len(reference_tokens) != len(candidate_tokens):
        raise ValueError(f"{len(reference_tokens)} reference continuations but {len(candidate_tokens)} candidate ones")
    if not reference_tokens:
        raise ValueError("no prompts to compare")
    identical = 0
    prefixes = []
    for reference, candidate in zip(reference_tokens, candidate_tokens):
        reference, candidate = [int(t) for t in reference], [int(t) for t in candidate]
        identical += reference == candidate
        matched = 0
        for ours, theirs in zip(reference, candidate):
            if ours != theirs:
                break
            matched += 1
        prefixes.append(matched / len(reference) if reference else 1.0)
    return GreedyAgreement(identical=identical / len(reference_tokens), mean_prefix=float(np.mean(prefixes)),
                           prompts=len(reference_tokens))


@dataclass(frozen=True)
class LmBar:
    """What a decoder candidate must meet against FP32, each held against the conservative end of its interval.

    The same fields as the `lm_quality_bar` settings section (tasks.config.settings.LmQualityBar), which
    `judge_lm` accepts as well. Worked through: a candidate with relative perplexity increase +3.0%
    (interval [+2.1%, +4.0%]), token agreement 94% ([93.1%, 94.8%]), mean KL 0.04 ([0.035, 0.046]) and
    identical greedy answers on 6 of 8 prompts passes the defaults; the same candidate with agreement
    interval [88.7%, 90.6%] fails, even though its point estimate 89.7% is close, because 88.7% < 90%.

    Attributes:
        max_relative_perplexity_increase: largest perplexity increase vs FP32, relative (upper end).
        min_token_agreement: smallest top-1 next-token agreement with FP32 (lower end).
        max_mean_kl: largest mean KL(FP32 || candidate) per token in nats (upper end).
        min_greedy_agreement: smallest share of prompts whose greedy answer equals FP32's.
    """

    max_relative_perplexity_increase: float = 0.05
    min_token_agreement: float = 0.90
    max_mean_kl: float = 0.10
    min_greedy_agreement: float = 0.5


@dataclass(frozen=True)
class LmVerdict:
    """Whether a decoder candidate meets the bar, and one sentence saying why."""

    passed: bool
    reason: str


def judge_lm(quality: LmQuality, greedy: GreedyAgreement | None, bar: LmBar) -> LmVerdict:
    """Hold a candidate's quality against the bar, conservative end of each interval first.

    Checks in order: the upper end of the perplexity-increase interval, the lower end of the
    token-agreement interval, the upper end of the KL interval, then greedy agreement (if measured).
    Perplexity alone is not enough: a candidate whose perplexity is unchanged but whose top-1 next
    token differs from FP32's on 30% of positions fails on agreement. A NaN anywhere fails.

    Args:
        quality: from `summarise`.
        greedy: from `greedy_agreement`, or None when generation was not compared.
        bar: an `LmBar`, or the settings' `LmQualityBar` (the same field names).

    Returns:
        The verdict; its reason names the first failed check with its numbers, or summarises a pass.
    """
    increase_high = quality.perplexity_increase_interval[1]
    agreement_low = quality.agreement_interval[0]
    kl_high = quality.kl_interval[1]
    # Written as "not (within)" so that NaN, which compares False, fails every check.
    if not increase_high <= bar.max_relative_perplexity_increase:
        return LmVerdict(False, f"relative perplexity increase {quality.relative_perplexity_increase:+.1%} "
                                f"(upper bound {increase_high:+.1%}) is above the bar "
                                f"{_percent(bar.max_relative_perplexity_increase)}")
    if not agreement_low >= bar.min_token_agreement:
        return LmVerdict(False, f"token agreement {quality.token_agreement:.1%} (lower bound {agreement_low:.1%}) "
                                f"is below the bar {_percent(bar.min_token_agreement)}")
    if not kl_high <= bar.max_mean_kl:
        return LmVerdict(False, f"mean KL {quality.mean_kl:.3g} nats per token (upper bound {kl_high:.3g}) "
                                f"is above the bar {bar.max_mean_kl:g}")
    if greedy is not None and not greedy.identical >= bar.min_greedy_agreement:
        return LmVerdict(False, f"greedy answers identical to FP32 on {greedy.identical:.1%} of {greedy.prompts} "
                                f"prompts, below the bar {_percent(bar.min_greedy_agreement)}")
    summary = (f"passes on {quality.documents} documents ({quality.tokens} tokens): relative perplexity increase {quality.relative_perplexity_increase:+.1%} "
               f"(upper bound {increase_high:+.1%}, bar {_percent(bar.max_relative_perplexity_increase)}), "
               f"token agreement {quality.token_agreement:.1%} (lower bound {agreement_low:.1%}, bar "
               f"{_percent(bar.min_token_agreement)}), mean KL {quality.mean_kl:.3g} nats (upper bound "
               f"{kl_high:.3g}, bar {bar.max_mean_kl:g})")
    if greedy is not None:
        summary += (f", greedy answers identical on {greedy.identical:.1%} of {greedy.prompts} prompts "
                    f"(bar {_percent(bar.min_greedy_agreement)})")
    return LmVerdict(True, summary)


def _percent(share: float) -> str:
    """0.05 -> '5%', 0.925 -> '92.5%' (a bar is quoted as written)."""
    return f"{share * 100:g}%"
