"""The FP32 reference: the ONNX graphs every recipe starts from, and the predictions it is judged by."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.data_prep import LABEL, TEXT
from tasks.evaluation import (
    Batches,
    QualityMetrics,
    hard_slice,
    label_indices,
    predict_torch,
    quality_metrics,
    tokenized_batches,
)
from tasks.model_io import ModelCard, tokenize
from tasks.models.base import open_model
from tasks.recipes.base import QuantizeInputs
from tasks.serving import ServingAssets
from tasks.settings import EvaluateSettings, ModelSettings


@dataclass
class Reference:
    """Everything candidates are built from and compared against, computed once per run."""

    card: ModelCard
    inputs: QuantizeInputs
    eval_batches: Batches
    y_true: np.ndarray
    logits: np.ndarray
    hard_idx: np.ndarray
    quality: QualityMetrics
    # Feeds every candidate must run finite on: a real batch and a longest-sequence stress batch.
    proof_feeds: list[dict[str, np.ndarray]]
    latency_feeds: list[dict[str, np.ndarray]]
    throughput_feeds: list[dict[str, np.ndarray]]
    # Tokenizer and labels that turn a candidate graph into the served text-in model.
    serving: ServingAssets | None = None

    @property
    def predictions(self) -> np.ndarray:
        """FP32 (PyTorch eager) predicted class per evaluation row."""
        return self.logits.argmax(axis=1)


def prepare_reference(source_folder: Path, evaluation: pd.DataFrame, calibration: pd.DataFrame, work_dir: Path,
                      model: ModelSettings, evaluate: EvaluateSettings, calibration_batch_size: int) -> Reference:
    """Export and fuse the FP32 graph, score PyTorch eager FP32, and tokenize everything once."""
    # The model family (tasks/models/) loads, exports and tokenizes; everything below is family-agnostic.
    family = open_model(source_folder, model.family, model.max_length, model.allow_pickle_weights)
    classifier, tokenizer = family.load_reference(), family.tokenizer
    card = ModelCard(labels=family.class_names_for(evaluation[LABEL]), max_length=family.max_length)
    fp32_path = family.export_onnx(work_dir / "fp32" / "model.onnx", model.onnx_opset)
    optimized_path = family.optimize(fp32_path, work_dir / "fp32-optimized" / "model.onnx")
    serving = ServingAssets(family.save_tokenizer(work_dir / "tokenizer"), family.labels, family.max_length)

    texts = evaluation[TEXT].tolist()
    batches = tokenized_batches(tokenizer, texts, card.max_length, evaluate.batch_size)
    y_true = label_indices(evaluation[LABEL].tolist(), card.labels)
    logits = predict_torch(classifier, batches, len(texts))
    hard_idx = hard_slice(logits, y_true, evaluate.hard_margin_fraction, evaluate.worst_intents)

    calibration_texts = calibration[TEXT].tolist()
    calibration_feeds = [feed for _, feed in tokenized_batches(tokenizer, calibration_texts, card.max_length,
                                                                calibration_batch_size)]
    rng = np.random.default_rng(0)
    latency_texts = [texts[i] for i in rng.permutation(len(texts))[: evaluate.latency_runs]]
    throughput_rows = rng.permutation(len(texts))
    size = evaluate.throughput_batch_size
    throughput_feeds = [
        tokenize(tokenizer, [texts[i] for i in np.resize(throughput_rows, size * evaluate.throughput_batches)[b * size:(b + 1) * size]],
                 card.max_length)
        for b in range(evaluate.throughput_batches)
    ]
    stress = tokenize(tokenizer, [" ".join(["transfer"] * card.max_length)] * 2, card.max_length)
    return Reference(
        card=card,
        inputs=QuantizeInputs(fp32_model=fp32_path, optimized_model=optimized_path, calibration_feeds=calibration_feeds),
        eval_batches=batches,
        y_true=y_true,
        logits=logits,
        hard_idx=hard_idx,
        quality=quality_metrics(logits, y_true, logits.argmax(axis=1), hard_idx),
        proof_feeds=[batches[-1][1], stress],
        latency_feeds=[tokenize(tokenizer, [t], card.max_length) for t in latency_texts],
        throughput_feeds=throughput_feeds,
        serving=serving,
    )
