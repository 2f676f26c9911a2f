"""The FP32 reference: the ONNX graphs every recipe starts from, and the predictions it is judged by."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config.settings import EvaluateSettings, ModelSettings
from tasks.data.prepare import LABEL, TEXT
from tasks.measure.scoring import (
    Batches,
    QualityMetrics,
    hard_slice,
    label_indices,
    least_confident_classes,
    predict_torch,
    quality_metrics,
    stratified_holdout,
    tokenized_batches,
)
from tasks.measure.screening import wave_rows
from tasks.models.base import open_model
from tasks.models.io import ModelCard, tokenize
from tasks.recipes.base import QuantizeInputs
from tasks.serve.serving import ServingAssets

log = logging.getLogger("requant")


@dataclass
class EvaluationRows:
    """One set of scored rows: tokenized batches, labels, FP32 logits, the hard slice, FP32 quality."""

    batches: Batches
    y_true: np.ndarray
    logits: np.ndarray
    hard_idx: np.ndarray
    quality: QualityMetrics
    rows: np.ndarray  # positions in the evaluation set
    wave_batch_ends: list[int] | None = None  # where each screening wave's batches end (selection rows only)

    @property
    def predictions(self) -> np.ndarray:
        """FP32 (PyTorch eager) predicted class per row."""
        return self.logits.argmax(axis=1)


@dataclass
class Reference:
    """Everything candidates are built from and compared against, computed once per run.

    The evaluation set is split once: candidates are scored and chosen on the selection rows
    (`eval_batches`, `y_true`, ...), and the winner is confirmed on `confirmation` rows that took
    no part in choosing it (the winner's curse: the best of many noisy scores is biased upwards).
    """

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
    confirmation: EvaluationRows | None = None
    # The selection rows in screening waves (positions into y_true): eval_batches holds the batches of
    # wave 0, then wave 1, ...; wave_batch_ends[i] is where wave i's batches end.
    waves: list[np.ndarray] | None = None
    wave_batch_ends: list[int] | None = None
    hard_classes: list[str] | None = None  # intents in the hard slice (chosen on the calibration split)
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
    labels = evaluation[LABEL].tolist()
    calibration_texts = calibration[TEXT].tolist()
    # Hard intents come from the calibration split: never from FP32's predictions on scored rows.
    log.info("FP32 reference: scoring %d calibration rows (hard intents), then %d evaluation rows",
             len(calibration_texts), len(texts))
    calibration_batches = tokenized_batches(tokenizer, calibration_texts, card.max_length, evaluate.batch_size,
                                            evaluate.batch_tokens)
    calibration_logits = predict_torch(classifier, calibration_batches, len(calibration_texts))
    hard_classes = least_confident_classes(calibration_logits, label_indices(calibration[LABEL].tolist(), card.labels),
                                           evaluate.worst_intents)
    selection_rows, confirmation_rows = stratified_holdout(labels, evaluate.confirmation_fraction, seed=0)
    # Selection rows are batched wave by wave (length-sorted within a wave), with or without
    # screening: a candidate scored in full sees the very same batches either way.
    waves = wave_rows(len(selection_rows), evaluate.screening.first_rows)
    scored = _score_rows(classifier, tokenizer, card, texts, labels, selection_rows, hard_classes, evaluate, waves)
    confirmation = (_score_rows(classifier, tokenizer, card, texts, labels, confirmation_rows, hard_classes, evaluate)
                    if len(confirmation_rows) else None)
    batches, y_true, logits, hard_idx = scored.batches, scored.y_true, scored.logits, scored.hard_idx
    texts = [texts[i] for i in selection_rows]

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
        quality=scored.quality,
        proof_feeds=[batches[-1][1], stress],
        latency_feeds=[tokenize(tokenizer, [t], card.max_length) for t in latency_texts],
        throughput_feeds=throughput_feeds,
        confirmation=confirmation,
        waves=waves,
        wave_batch_ends=scored.wave_batch_ends,
        hard_classes=[card.labels[i] for i in hard_classes],
        serving=serving,
    )


def _score_rows(classifier, tokenizer, card: ModelCard, texts: list[str], labels: list[str], rows: np.ndarray,
                hard_classes: np.ndarray, evaluate: EvaluateSettings,
                waves: list[np.ndarray] | None = None) -> EvaluationRows:
    """Tokenize and score FP32 on a subset of the evaluation rows, with its own hard slice.

    With `waves` (positions into `rows`), the batches are cut wave by wave, in wave order.
    """
    subset = [texts[i] for i in rows]
    batches, ends = [], []
    for wave in waves if waves is not None else [np.arange(len(subset))]:
        for idx, feed in tokenized_batches(tokenizer, [subset[i] for i in wave], card.max_length, evaluate.batch_size,
                                           evaluate.batch_tokens):
            batches.append((wave[idx], feed))
        ends.append(len(batches))
    y_true = label_indices([labels[i] for i in rows], card.labels)
    logits = predict_torch(classifier, batches, len(subset))
    lengths = np.zeros(len(subset), dtype=np.int64)
    for idx, feed in batches:
        lengths[idx] = feed["attention_mask"].sum(axis=1)
    hard_idx = hard_slice(y_true, lengths, hard_classes, evaluate.hard_length_fraction)
    return EvaluationRows(batches, y_true, logits, hard_idx,
                          quality_metrics(logits, y_true, logits.argmax(axis=1), hard_idx), rows, ends)
