"""`requant train --family hf-finetune`: the fine-tuning loop, and the flow that registers its result
with MLflow's transformers flavor and hands it to `requantize`."""

import numpy as np
import pandas as pd
import pytest

from tasks.config.settings import FinetuneSettings
from tasks.train.finetune import build_sequence_classifier, fine_tune, total_steps
from tests.conftest import BANKING77, tiny_project


def test_fine_tune_lowers_the_training_loss_within_its_step_budget(tiny_model_folder):
    from transformers import AutoTokenizer

    frame = pd.read_csv(BANKING77 / "train.csv")
    frame = frame[frame["category"].isin(sorted(frame["category"].unique())[:4])].groupby("category").head(8)
    labels = sorted(frame["category"].unique())
    encoder = tiny_model_folder / "encoder"
    model = build_sequence_classifier(encoder, labels)
    tokenizer = AutoTokenizer.from_pretrained(str(encoder), local_files_only=True)
    settings = FinetuneSettings(epochs=100, max_steps=24, batch_size=32, learning_rate=1e-2, warmup_fraction=0.1)
    seen = []
    result = fine_tune(model, tokenizer, frame["text"].tolist(), frame["category"].map(labels.index).to_numpy(),
                       settings, max_length=32, progress=seen.append, report_every=8)
    assert result.steps == total_steps(len(frame), settings) == 24  # the cap bounds the work
    assert [p.step for p in seen] == [8, 16, 24]
    assert result.loss_curve[-1] < 0.8 * result.loss_curve[0]
    assert model.config.id2label == dict(enumerate(labels)) and not model.training


@pytest.mark.e2e
def test_train_hf_finetune_registers_a_transformers_version_that_requantize_promotes(tmp_path, tiny_model_folder,
                                                                                       prefect_server):
    import mlflow
    from mlflow import MlflowClient

    from flows.requantize import requantize
    from flows.train import train_and_register
    from tasks.config.loading import load_settings

    project = tiny_project(tmp_path, tiny_model_folder, model={"base_encoder": str(tiny_model_folder / "encoder")},
                           train={"finetune": {"registered_model_name": "tiny-ft", "max_steps": 6, "batch_size": 16}})
    params = str(project / "params.yaml")
    trained = train_and_register(params_path=params, family="hf-finetune")
    assert (trained.name, trained.version) == ("tiny-ft", "1") and trained.seconds > 0
    uri = load_settings(params).registry.tracking_uri
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    assert "transformers" in mlflow.models.get_model_info("models:/tiny-ft@champion").flavors
    summary = requantize(params_path=params, model_uri="models:/tiny-ft@champion")
    assert summary.outcome == "promoted"
    served = client.get_model_version_by_alias("minilm-banking77-serving", "production")
    assert served.tags["requant.source_uri"] == "models:/tiny-ft@champion"
    assert np.isfinite(summary.decision["candidates"]["int8"]["accuracy"])
