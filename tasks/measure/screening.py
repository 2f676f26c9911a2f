"""Screening: stop scoring a candidate as soon as it clearly fails the quality bar.

The selection rows are scored in waves (a simple random sample of `first_rows` rows, then as many
again, then doubling, then the rest). After every wave but the last, a sequential test asks whether
the candidate's loss on the *whole* selection set is already known to exceed the bar; if so it is
screened out (no further rows, no timing, no confirmation). A candidate that is not clearly failing
goes on to the next wave, and one that reaches the last wave has had the full evaluation: screening
never passes or picks anyone, it only spares the work on clear failures.

The test. Per row, with FP32 and the candidate scored on the same row: b = "FP32 right, candidate
wrong", c = "candidate right, FP32 wrong". The relative loss on all N selection rows is
(B_N - C_N) / R_N (R_N = FP32's hits there, known: FP32 is scored on every row up front), so the
candidate passes the point test only if p_b - p_c <= theta = bar * R_N / N, and the interval gate is
stricter still. After n sampled rows we bound p_b from below and p_c from above with the Chernoff
(KL) bound for Bernoulli means, each at delta / 2:

    P(p > UCB) <= exp(-n KL(p_hat || UCB)) = delta / 2,

which holds for sampling without replacement from the finite set of rows as well (Hoeffding 1963,
Theorem 4), so it speaks about the whole selection set, not a hypothetical population. The
candidate is screened out when LCB(p_b) - UCB(p_c) > theta. The hard-slice loss and the optional
absolute accuracy floor are tested the same way. The levels are spent by Bonferroni over
(looks x tests): alpha / (looks * tests) each, so

    P(a candidate that would pass the full gate is screened out) <= alpha

for every candidate, whatever its true loss. Worked example (alpha 0.01, 2,156 rows, waves 256,
256, 512, 1,132: 3 looks, 2 tests, delta = 0.0017): a candidate 10 points below FP32 (p_b = 0.11,
p_c = 0.01) is out after 512 rows; one at 0.9 points (the default grid's per-tensor INT8) is never
screened out: its point loss is inside the bar, so only the full measurement can judge it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np


def wave_sizes(rows: int, first_rows: int) -> list[int]:
    """Rows per wave: first_rows, first_rows, then doubling, the last wave taking the rest.

    Example: 2,156 rows, first_rows 256 -> [256, 256, 512, 1132]. Fewer rows than 2 * first_rows
    -> one wave (no look: the sample would be most of the set anyway).
    """
    if rows <= 0:
        return []
    sizes, size, taken = [], first_rows, 0
    while taken + size < rows and rows - taken - size >= first_rows:
        sizes.append(size)
        taken += size
        size = first_rows if len(sizes) == 1 else size * 2
    sizes.append(rows - taken)
    return sizes


def wave_rows(rows: int, first_rows: int, seed: int = 0) -> list[np.ndarray]:
    """Positions of the selection rows in each wave: a seeded simple random sample, so every prefix
    of waves is a uniform sample without replacement (what the bound assumes), sorted within a wave."""
    order = np.random.default_rng(seed).permutation(rows)
    ends = np.cumsum(wave_sizes(rows, first_rows))
    return [np.sort(order[start:end]) for start, end in zip(np.concatenate([[0], ends[:-1]]), ends)]


def kl_bernoulli(p: float, q: float) -> float:
    """KL(Bernoulli(p) || Bernoulli(q))."""
    q = min(max(q, 1e-15), 1 - 1e-15)
    out = 0.0
    if p > 0:
        out += p * math.log(p / q)
    if p < 1:
        out += (1 - p) * math.log((1 - p) / (1 - q))
    return out


def _kl_bound(hits: int, n: int, delta: float, upper: bool) -> float:
    """The Chernoff (KL) confidence bound on a Bernoulli mean at level delta (one-sided), by bisection."""
    if n == 0:
        return 1.0 if upper else 0.0
    p_hat, budget = hits / n, math.log(1 / delta) / n
    low, high = (p_hat, 1.0) if upper else (0.0, p_hat)
    for _ in range(60):
        mid = (low + high) / 2
        inside = kl_bernoulli(p_hat, mid) <= budget
        if upper:
            low, high = (mid, high) if inside else (low, mid)
        else:
            low, high = (low, mid) if inside else (mid, high)
    return high if upper else low


def upper_bound(hits: int, n: int, delta: float) -> float:
    """UCB on a Bernoulli mean from `hits` of `n`: exceeded by the truth with probability <= delta."""
    return _kl_bound(hits, n, delta, upper=True)


def lower_bound(hits: int, n: int, delta: float) -> float:
    """LCB on a Bernoulli mean from `hits` of `n`: above the truth with probability <= delta."""
    return _kl_bound(hits, n, delta, upper=False)


def loss_lower_bound(reference_correct: np.ndarray, candidate_correct: np.ndarray, delta: float) -> float:
    """Lower confidence bound (level delta) on p_b - p_c, the per-row accuracy lost against FP32."""
    ref, cand = np.asarray(reference_correct, bool), np.asarray(candidate_correct, bool)
    n = len(ref)
    only_ref, only_cand = int((ref & ~cand).sum()), int((cand & ~ref).sum())
    return lower_bound(only_ref, n, delta / 2) - upper_bound(only_cand, n, delta / 2)


@dataclass(frozen=True)
class Bar:
    """What the full gate demands, as the screen needs it (relative losses and the optional floor)."""

    max_relative_accuracy_loss: float
    max_hard_slice_relative_loss: float
    min_accuracy: float | None = None


@dataclass
class ScreeningOutcome:
    """Whether a candidate was screened out, after how many rows, and on what evidence."""

    screened_out: bool
    rows_used: int
    rows_total: int
    reason: str = ""
    test: str = ""  # accuracy | hard slice | accuracy floor (the test that fired)
    bound: float | None = None  # its confidence bound (per-row loss, or accuracy for the floor)
    limit: float | None = None  # what the bound was compared with
    level: float | None = None  # the test's level at that look (alpha spent by Bonferroni)

    def as_dict(self) -> dict:
        """Plain dict for decision.json."""
        return asdict(self)


def screen(reference_correct: np.ndarray, candidate_correct: np.ndarray, hard_mask: np.ndarray, bar: Bar,
           alpha: float, looks: int, rows_total: int, reference_hits: int, reference_hard_hits: int,
           hard_total: int) -> ScreeningOutcome:
    """One look: is the candidate, seen on these rows (a uniform sample of the selection rows), clearly failing?

    Args:
        reference_correct / candidate_correct: per sampled row, FP32 / the candidate was right.
        hard_mask: per sampled row, it belongs to the hard slice.
        bar: the quality bar.
        alpha: the whole screen's error rate; this look spends alpha / (looks * tests) per test.
        looks: how many looks the screen makes in all (waves - 1).
        rows_total, reference_hits: N and FP32's hits on all selection rows.
        reference_hard_hits, hard_total: the same on the hard slice.
    """
    ref, cand, hard = (np.asarray(a, bool) for a in (reference_correct, candidate_correct, hard_mask))
    tests = 2 + (bar.min_accuracy is not None)
    delta = alpha / (max(looks, 1) * tests)
    n = len(ref)
    outcome = ScreeningOutcome(False, n, rows_total, level=delta)
    checks: list[tuple[str, float, float]] = []
    if reference_hits > 0:
        checks.append(("accuracy", loss_lower_bound(ref, cand, delta), bar.max_relative_accuracy_loss * reference_hits / rows_total))
    if reference_hard_hits > 0 and hard.any():
        checks.append(("hard slice", loss_lower_bound(ref[hard], cand[hard], delta),
                       bar.max_hard_slice_relative_loss * reference_hard_hits / hard_total))
    if bar.min_accuracy is not None:
        # Fails when even the upper bound on its accuracy is below the floor: compared as "loss below
        # the floor" so every check reads bound > limit.
        checks.append(("accuracy floor", -upper_bound(int(cand.sum()), n, delta), -bar.min_accuracy))
    for test, bound, limit in checks:
        if bound > limit:
            outcome.screened_out, outcome.test, outcome.bound, outcome.limit = True, test, bound, limit
            outcome.reason = _reason(test, bound, limit, n, rows_total, alpha)
            break
    return outcome


def _reason(test: str, bound: float, limit: float, n: int, total: int, alpha: float) -> str:
    if test == "accuracy floor":
        return (f"screened out after {n} of {total} rows: accuracy is below the floor {-limit:.2%} "
                f"(upper confidence bound {-bound:.2%}; false screen-out rate <= {alpha:g})")
    return (f"screened out after {n} of {total} rows: {test} loss clearly above the bar (lower confidence bound "
            f"{bound:.2%} of rows lost vs FP32, bar {limit:.2%}; false screen-out rate <= {alpha:g})")


def sequential_screen(predict_wave: Callable[[int], np.ndarray], waves: list[np.ndarray], reference_correct: np.ndarray,
                      y_true: np.ndarray, hard_idx: np.ndarray, bar: Bar, alpha: float,
                      enabled: bool = True) -> tuple[ScreeningOutcome, np.ndarray]:
    """Score wave after wave, looking after each one but the last; stop when the candidate clearly fails.

    Args:
        predict_wave: wave index -> predicted class of each row of that wave (in `waves[i]` order).
        waves: selection-row positions per wave (see `wave_rows`).
        reference_correct: FP32 right, per selection row (all N rows).
        y_true: labels of all selection rows.
        hard_idx: positions of the hard slice among the selection rows.
        enabled: False scores every wave and never screens (the same rows, the same batches).

    Returns:
        The outcome and the predictions of every selection row (-1 on rows not scored).
    """
    rows_total = len(y_true)
    predictions = np.full(rows_total, -1, dtype=np.int64)
    hard = np.zeros(rows_total, dtype=bool)
    hard[hard_idx] = True
    looks = len(waves) - 1
    seen = np.zeros(0, dtype=np.int64)
    outcome = ScreeningOutcome(False, 0, rows_total)
    for i, rows in enumerate(waves):
        predictions[rows] = predict_wave(i)
        seen = np.concatenate([seen, rows])
        if i == looks or not enabled:
            continue
        outcome = screen(reference_correct[seen], predictions[seen] == y_true[seen], hard[seen], bar, alpha, looks,
                         rows_total, int(reference_correct.sum()), int(reference_correct[hard].sum()), int(hard.sum()))
        if outcome.screened_out:
            return outcome, predictions
    return ScreeningOutcome(False, rows_total, rows_total), predictions
