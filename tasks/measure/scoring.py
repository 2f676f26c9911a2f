"""Quality of a candidate on the evaluation set, against the FP32 reference's predictions."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from tasks.models.io import length_sorted_batches, token_budget_batches, tokenize


@dataclass(frozen=True)
class QualityMetrics:
    """Quality numbers logged under the same names for every candidate."""

    accuracy: float
    macro_f1: float
    agreement_with_fp32: float
    hard_slice_accuracy: float
    eval_rows: int
    hard_slice_rows: int

    def as_dict(self) -> dict[str, float]:
        """Plain dict for MLflow and the decision record."""
        return asdict(self)


# Pre-tokenized evaluation batches: (row indices, feed). Tokenized once, reused by every candidate.
Batches = list[tuple[np.ndarray, dict[str, np.ndarray]]]


def tokenized_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int,
                      max_tokens: int | None = None) -> Batches:
    """Tokenize texts in length-sorted batches (little padding), keeping each batch's row indices.

    With `max_tokens`, rows are sorted by token length and a batch also holds at most that many
    tokens once padded (see `token_budget_batches`); without it, `batch_size` rows by text length.
    """
    if max_tokens is None:
        groups = list(length_sorted_batches(texts, batch_size))
    else:
        ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        groups = token_budget_batches([len(row) for row in ids], batch_size, max_tokens)
    return [(idx, tokenize(tokenizer, [texts[i] for i in idx], max_length)) for idx in groups]


def predict_onnx(session, batches: Batches, rows: int) -> np.ndarray:
    """Logits [rows, classes] of an ONNX candidate, in input order."""
    logits = None
    for idx, feed in batches:
        # The feed holds exactly the graph's inputs: the model family's tokenizer produced it.
        out = session.run(["logits"], feed)[0]
        if logits is None:
            logits = np.zeros((rows, out.shape[1]), dtype=np.float32)
        logits[idx] = out
    return logits


def predict_torch(classifier, batches: Batches, rows: int) -> np.ndarray:
    """Logits of the eager PyTorch FP32 classifier, the quality reference."""
    import torch

    logits = None
    with torch.inference_mode():
        for idx, feed in batches:
            out = classifier(**{name: torch.from_numpy(value) for name, value in feed.items()}).numpy()
            if logits is None:
                logits = np.zeros((rows, out.shape[1]), dtype=np.float32)
            logits[idx] = out
    return logits


def label_indices(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Map label strings to the model's class indices (validation has checked they are known)."""
    position = {name: i for i, name in enumerate(classes)}
    return np.array([position[label] for label in labels], dtype=np.int64)


def least_confident_classes(logits: np.ndarray, y_true: np.ndarray, count: int) -> np.ndarray:
    """The `count` classes with the smallest mean top-1 probability margin of the reference.

    Called on the calibration split, never on the rows being scored: a slice picked from the
    reference's own near-ties on the scored rows flips under any perturbation, so it penalises
    every candidate (regression to the mean), whatever its real quality.
    """
    if count <= 0 or len(y_true) == 0:
        return np.array([], dtype=np.int64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    classes = np.unique(y_true)
    mean_margin = np.array([margin[y_true == c].mean() for c in classes])
    return classes[np.argsort(mean_margin, kind="stable")[:count]]


def hard_slice(y_true: np.ndarray, token_lengths: np.ndarray, hard_classes: np.ndarray, length_fraction: float) -> np.ndarray:
    """Indices of the hard cases: every row of `hard_classes`, plus the shortest and longest queries.

    Depends only on labels, lengths and classes chosen elsewhere, never on any model's predictions on
    these rows, so every candidate (and FP32) is scored on an unbiased slice.
    """
    rows = np.flatnonzero(np.isin(y_true, hard_classes))
    n_tail = int(round(length_fraction * len(y_true)))
    if n_tail:
        order = np.argsort(token_lengths, kind="stable")
        rows = np.union1d(rows, np.concatenate([order[:n_tail], order[-n_tail:]]))
    return rows.astype(np.int64)


def stratified_holdout(labels: Sequence[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (kept, held out), holding out `fraction` of each class.

    Classes with a single row stay in `kept`. Both index arrays are sorted.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_held = int(round(fraction * len(rows))) if len(rows) > 1 else 0
        held.extend(rows[:min(n_held, len(rows) - 1)])
    held = np.sort(np.asarray(held, dtype=np.int64))
    return np.setdiff1d(np.arange(len(labels)), held), held


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-F1 over the classes present in y_true."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0))


def quality_metrics(logits: np.ndarray, y_true: np.ndarray, reference_pred: np.ndarray, hard_idx: np.ndarray) -> QualityMetrics:
    """Score one candidate's logits."""
    return prediction_quality(logits.argmax(axis=1), y_true, reference_pred, hard_idx)


def prediction_quality(y_pred: np.ndarray, y_true: np.ndarray, reference_pred: np.ndarray,
                       hard_idx: np.ndarray) -> QualityMetrics:
    """Score one candidate's predicted classes (the numbers kept when a score is reused)."""
    return QualityMetrics(
        accuracy=float((y_pred == y_true).mean()),
        macro_f1=macro_f1(y_true, y_pred),
        agreement_with_fp32=float((y_pred == reference_pred).mean()),
        # An empty slice scores NaN, which the quality bar treats as a failure (fail closed).
        hard_slice_accuracy=float((y_pred[hard_idx] == y_true[hard_idx]).mean()) if len(hard_idx) else float("nan"),
        eval_rows=int(len(y_true)),
        hard_slice_rows=int(len(hard_idx)),
    )
