"""Quality of a candidate on the evaluation set, against the FP32 reference's predictions."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tasks.model_io import length_sorted_batches, tokenize


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


def onnx_session(model_path: Path, threads: int):
    """Open a CPU InferenceSession with fixed thread counts (benchmarks depend on it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


# Pre-tokenized evaluation batches: (row indices, feed). Tokenized once, reused by every candidate.
Batches = list[tuple[np.ndarray, dict[str, np.ndarray]]]


def tokenized_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int) -> Batches:
    """Tokenize texts in length-sorted batches (little padding), keeping each batch's row indices."""
    return [(idx, tokenize(tokenizer, [texts[i] for i in idx], max_length))
            for idx in length_sorted_batches(texts, batch_size)]


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


def hard_slice(reference_logits: np.ndarray, y_true: np.ndarray, margin_fraction: float, worst_classes: int) -> np.ndarray:
    """Indices of the hard cases: smallest FP32 top-1 margin, plus all rows of the worst classes.

    The slice is fixed by the reference, so every candidate is scored on the same rows.
    """
    top2 = np.sort(reference_logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    n_margin = max(1, int(round(margin_fraction * len(y_true))))
    smallest_margin = np.argsort(margin, kind="stable")[:n_margin]
    predicted = reference_logits.argmax(axis=1)
    classes = np.unique(y_true)
    per_class = np.array([(predicted[y_true == c] == c).mean() for c in classes])
    worst = classes[np.argsort(per_class, kind="stable")[:worst_classes]]
    return np.union1d(smallest_margin, np.flatnonzero(np.isin(y_true, worst)))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-F1 over the classes present in y_true."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0))


def quality_metrics(logits: np.ndarray, y_true: np.ndarray, reference_pred: np.ndarray, hard_idx: np.ndarray) -> QualityMetrics:
    """Score one candidate's logits."""
    y_pred = logits.argmax(axis=1)
    return QualityMetrics(
        accuracy=float((y_pred == y_true).mean()),
        macro_f1=macro_f1(y_true, y_pred),
        agreement_with_fp32=float((y_pred == reference_pred).mean()),
        hard_slice_accuracy=float((y_pred[hard_idx] == y_true[hard_idx]).mean()) if len(hard_idx) else float("nan"),
        eval_rows=int(len(y_true)),
        hard_slice_rows=int(len(hard_idx)),
    )
