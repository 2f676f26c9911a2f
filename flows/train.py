"""The train-baseline flow: fit the demo classifier head and register it as a new model version."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks.config.loading import load_settings
from tasks.config.settings import DataSettings, ModelSettings, TrainSettings
from tasks.data.prepare import LABEL, TEXT, load_split
from tasks.measure.scoring import label_indices, predict_torch, tokenized_batches
from tasks.models.io import load_classifier, resolve_encoder_dir
from tasks.track import Tracker
from tasks.train.training import train_baseline

log = logging.getLogger("requant")


@dataclass
class TrainedVersion:
    """The registered source version and how good it is."""

    name: str
    version: str
    test_accuracy: float
    best_c: float
    seconds: float = 0.0


def _progress(done: int, total: int) -> None:
    if done == total or done % 2048 < 64:
        log.info("embedded %d/%d train texts", done, total)


@task(name="fit-head", cache_policy=NO_CACHE)
def fit(data: DataSettings, model: ModelSettings, train_settings: TrainSettings, out_dir: str):
    train = load_split(data.train_csv, data.text_column, data.label_column, data.train_sha256)
    encoder_dir = resolve_encoder_dir(model.base_encoder)
    return train_baseline(train, encoder_dir, Path(out_dir), model.max_length, train_settings, _progress)


@task(name="score-test-split", cache_policy=NO_CACHE)
def score(data: DataSettings, folder: Path) -> float:
    test = load_split(data.test_csv, data.text_column, data.label_column, data.test_sha256)
    classifier, tokenizer, card = load_classifier(folder)
    texts = test[TEXT].tolist()
    logits = predict_torch(classifier, tokenized_batches(tokenizer, texts, card.max_length, 64), len(texts))
    known = test[LABEL].isin(card.labels).to_numpy()
    y_true = label_indices(test[LABEL][known].tolist(), card.labels)
    return float((logits[known].argmax(axis=1) == y_true).mean())


@task(name="fine-tune", cache_policy=NO_CACHE)
def fine_tune_classifier(data: DataSettings, model: ModelSettings, train_settings: TrainSettings, out_dir: str):
    """Fine-tune the base encoder end to end as a sequence classifier; save it as a Hugging Face folder."""
    from transformers import AutoTokenizer

    from tasks.train.finetune import (
        build_sequence_classifier,
        fine_tune,
        save_classifier,
    )

    train = load_split(data.train_csv, data.text_column, data.label_column, data.train_sha256)
    base = resolve_encoder_dir(model.base_encoder)
    labels = sorted(train[LABEL].unique())
    classifier = build_sequence_classifier(base, labels, train_settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    position = {label: i for i, label in enumerate(labels)}
    result = fine_tune(classifier, tokenizer, train[TEXT].tolist(), train[LABEL].map(position).to_numpy(),
                       train_settings.finetune, model.max_length, seed=train_settings.seed,
                       progress=lambda p: log.info("fine-tune step %d/%d (epoch %.2f): loss %.4f, %.0f s",
                                                   p.step, p.total_steps, p.epoch, p.loss, p.seconds))
    return save_classifier(classifier, tokenizer, Path(out_dir)), result


@task(name="score-test-split", cache_policy=NO_CACHE)
def score_family(data: DataSettings, model: ModelSettings, folder: Path) -> float:
    """Accuracy of any model family's eager FP32 classifier on the test split."""
    from tasks.models.base import open_model

    test = load_split(data.test_csv, data.text_column, data.label_column, data.test_sha256)
    family = open_model(folder, max_length=model.max_length)
    texts = test[TEXT].tolist()
    logits = predict_torch(family.load_reference(), tokenized_batches(family.tokenizer, texts, family.max_length, 64),
                           len(texts))
    known = test[LABEL].isin(family.labels).to_numpy()
    y_true = label_indices(test[LABEL][known].tolist(), family.labels)
    return float((logits[known].argmax(axis=1) == y_true).mean())


def _fine_tune_and_register(settings, train_settings: TrainSettings) -> TrainedVersion:
    """`train.family: hf-finetune`: fine-tune, score, register with MLflow's transformers flavor."""
    finetune = train_settings.finetune
    with tempfile.TemporaryDirectory() as tmp:
        folder, result = fine_tune_classifier(settings.data, settings.model, train_settings, str(Path(tmp) / "model"))
        accuracy = score_family(settings.data, settings.model, folder)
        log.info("fine-tuned in %.0f s (%d steps, %.2f epochs): test accuracy %.2f%%", result.seconds, result.steps,
                 result.epochs, accuracy * 100)
        version = Tracker(settings.registry).register_transformers(
            folder, finetune.registered_model_name, train_settings.alias, run_name="train-finetune",
            params={"base_encoder": settings.model.base_encoder, "seed": train_settings.seed, "steps": result.steps,
                    **{f"finetune.{k}": v for k, v in finetune.model_dump().items()}},
            metrics={"test_accuracy": accuracy, "finetune_seconds": result.seconds, "final_train_loss": result.final_loss,
                     "epochs_done": result.epochs},
        )
    log.info("registered %s version %s as @%s", finetune.registered_model_name, version, train_settings.alias)
    return TrainedVersion(finetune.registered_model_name, version, accuracy, float("nan"), result.seconds)


@flow(name="train-baseline")
def train_and_register(params_path: str = "params.yaml", seed: int | None = None, family: str | None = None) -> TrainedVersion:
    """Train a source model on the train split, score it on the test split, register it under train.alias.

    Args:
        params_path: params.yaml to read (sections data, model, train, registry).
        seed: overrides train.seed, e.g. to make a new version for a re-tune demo.
        family: overrides train.family: 'requant-head' (frozen encoder + logistic-regression head) or
            'hf-finetune' (the encoder fine-tuned end to end, registered with the transformers flavor).
    """
    settings = load_settings(params_path)
    train_settings = settings.train if seed is None else settings.train.model_copy(update={"seed": seed})
    if (family or train_settings.family) == "hf-finetune":
        return _fine_tune_and_register(settings, train_settings)
    with tempfile.TemporaryDirectory() as tmp:
        folder, head = fit(settings.data, settings.model, train_settings, str(Path(tmp) / "model"))
        accuracy = score(settings.data, folder)
        log.info("baseline test accuracy %.2f%% (C=%s)", accuracy * 100, head.best_c)
        tracker = Tracker(settings.registry)
        version = tracker.register_source(
            folder, settings.train.registered_model_name, settings.train.alias, run_name="train-baseline",
            params={"base_encoder": settings.model.base_encoder, "C": head.best_c, "seed": train_settings.seed,
                    "classes": len(head.labels), "c_grid": settings.train.c_grid},
            metrics={"test_accuracy": accuracy, **{f"holdout_accuracy_C{c:g}": a for c, a in head.holdout_accuracy.items()}},
        )
    log.info("registered %s version %s as @%s", settings.train.registered_model_name, version, settings.train.alias)
    return TrainedVersion(settings.train.registered_model_name, version, accuracy, head.best_c)
