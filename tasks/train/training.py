"""Train the demo baseline head: logistic regression on frozen, mean-pooled encoder embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from tasks.config.settings import TrainSettings
from tasks.data.prepare import LABEL, TEXT
from tasks.models.io import (
    ModelCard,
    build_classifier,
    length_sorted_batches,
    load_tokenizer,
    save_model_folder,
    tokenize,
)


@dataclass
class TrainedHead:
    """A fitted head and how it was chosen."""

    weight: np.ndarray
    bias: np.ndarray
    labels: list[str]
    best_c: float
    holdout_accuracy: dict[float, float]


def embed_texts(encoder_dir: Path, texts: Sequence[str], max_length: int, batch_size: int,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Return L2-normalised mean-pooled embeddings, [len(texts), hidden], in input order."""
    import torch

    hidden = _hidden_size(encoder_dir)
    encoder = build_classifier(encoder_dir, np.zeros((1, hidden), np.float32), np.zeros(1, np.float32))
    tokenizer = load_tokenizer(encoder_dir)
    out = np.zeros((len(texts), hidden), dtype=np.float32)
    done = 0
    with torch.inference_mode():
        for idx in length_sorted_batches(texts, batch_size):
            batch = tokenize(tokenizer, [texts[i] for i in idx], max_length)
            out[idx] = encoder.embed(*(torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask"))).numpy()
            done += len(idx)
            if progress:
                progress(done, len(texts))
    return out


def _hidden_size(encoder_dir: Path) -> int:
    import json

    return int(json.loads((Path(encoder_dir) / "config.json").read_text())["hidden_size"])


def fit_head(embeddings: np.ndarray, labels: Sequence[str], settings: TrainSettings) -> TrainedHead:
    """Pick C on a stratified holdout, then refit on all rows with that C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    classes = sorted(set(labels))
    y = np.array([classes.index(label) for label in labels])
    x_fit, x_hold, y_fit, y_hold = train_test_split(
        embeddings, y, test_size=settings.holdout_fraction, stratify=y, random_state=settings.seed
    )
    scores = {}
    for c in settings.c_grid:
        model = LogisticRegression(C=c, max_iter=2000, random_state=settings.seed).fit(x_fit, y_fit)
        scores[c] = float((model.predict(x_hold) == y_hold).mean())
    best_c = max(scores, key=lambda c: (scores[c], -c))
    final = LogisticRegression(C=best_c, max_iter=2000, random_state=settings.seed).fit(embeddings, y)
    return TrainedHead(final.coef_.astype(np.float32), final.intercept_.astype(np.float32), classes, best_c, scores)


def train_baseline(train: pd.DataFrame, encoder_dir: Path, out_dir: Path, max_length: int, settings: TrainSettings,
                   progress: Callable[[int, int], None] | None = None) -> tuple[Path, TrainedHead]:
    """Embed the train split, fit the head, and write a model folder."""
    texts = train[TEXT].tolist()
    embeddings = embed_texts(encoder_dir, texts, max_length, settings.batch_size, progress)
    head = fit_head(embeddings, train[LABEL].tolist(), settings)
    card = ModelCard(labels=head.labels, max_length=max_length, normalize=True)
    return save_model_folder(out_dir, encoder_dir, head.weight, head.bias, card), head
