"""The train-baseline flow: fit the demo classifier head and register it as a new model version."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks.data_prep import LABEL, TEXT, load_split
from tasks.evaluation import label_indices, predict_torch, tokenized_batches
from tasks.model_io import load_classifier, resolve_encoder_dir
from tasks.settings import DataSettings, ModelSettings, TrainSettings, load_settings
from tasks.tracking import Tracker
from tasks.training import train_baseline

log = logging.getLogger("requant")


@dataclass
class TrainedVersion:
    """The registered source version and how good it is."""

    name: str
    version: str
    test_accuracy: float
    best_c: float


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


@flow(name="train-baseline")
def train_and_register(params_path: str = "params.yaml", seed: int | None = None) -> TrainedVersion:
    """Train the head on the train split, score it on the test split, register it under train.alias.

    Args:
        params_path: params.yaml to read (sections data, model, train, registry).
        seed: overrides train.seed, e.g. to make a new version for a re-tune demo.
    """
    settings = load_settings(params_path)
    train_settings = settings.train if seed is None else settings.train.model_copy(update={"seed": seed})
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
