"""Quantization-aware fine-tuning as the bounded escalation after post-training quantization.

The flow tests run the real flow (Prefect's temporary server, MLflow on sqlite, DVC in git) on the
tiny random requant-head model. Its FP32 accuracy on four Banking77 intents is near chance, and the
bar carries an absolute floor of 60%: no post-training candidate can pass (they keep FP32's
quality), so escalation is due. Fine-tuning on the labelled calibration rows, with INT8 simulated in
the loop, lifts the quantized model over the floor on the selection rows and the held-out
confirmation rows, which it never saw.
"""

import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tasks.data.prepare import LABEL, TEXT
from tasks.train.fake_quant import (
    QuantScheme,
    insert_fake_quant,
    quantize_weight,
    scheme_for,
    strip_fake_quant,
)
from tasks.train.qat import plan, training_rows
from tests.cli_helpers import params_for
from tests.conftest import TINY_LABELS, tiny_project

# Training is short and fast on the tiny model: 60 steps of 16 rows at a high learning rate. The
# teacher is a random model here, so distillation is off (it has nothing to teach).
QAT = {"max_steps": 60, "epochs": 100, "batch_size": 16, "learning_rate": 1e-2, "distill": False, "max_minutes": 5}
FLOOR = {"min_accuracy": 0.6}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_folder):
    tmp = tmp_path_factory.mktemp("qat")
    return tiny_project(tmp, tiny_model_folder, data={"calibration_size": 100},
                        quality_bar={**FLOOR, "max_relative_accuracy_loss": 0.9})


@pytest.fixture(scope="module")
def escalated(project, tiny_model_folder, prefect_server):
    from flows.requantize import requantize

    params = params_for(project, "escalated", qat=QAT)
    return params, requantize(params_path=params, model_uri=str(tiny_model_folder))


@pytest.mark.e2e
def test_post_training_misses_the_bar_so_qat_runs_and_its_candidate_is_promoted(escalated):
    import mlflow
    from mlflow import MlflowClient

    from tasks.config.loading import load_settings

    params, summary = escalated
    decision = summary.decision
    # Every post-training candidate missed the floor; the QAT candidate passed, won and was confirmed.
    assert not decision["verdicts"]["int8"]["passed_bar"] and not decision["verdicts"]["fp32"]["passed_bar"]
    assert summary.outcome == "promoted", summary.report
    assert summary.winner == "qat-int8"
    assert decision["confirmation"]["candidate"] == "qat-int8" and decision["confirmation"]["passed_bar"]
    assert decision["candidates"]["qat-int8"]["recipe"] == "int8-dynamic"  # the target's own recipe
    assert decision["candidates"]["qat-int8"]["config"] == decision["candidates"]["int8"]["config"]
    assert decision["candidates"]["qat-int8"]["throughput_per_s"] > 0  # timed with the others
    record = decision["qat"]
    assert record["ran"] and record["target"] == "int8"
    assert "no post-training candidate of a lowered precision passes" in record["reason"]
    assert record["attempts"][0]["steps"] == 60 and record["attempts"][0]["stop_reason"] == "max_steps"
    assert record["result"][0]["winner"] and record["outcome"] == "qat-int8 won"
    assert "evaluation" in record["training_rows_source"]

    registry = load_settings(params).registry
    client = MlflowClient(registry.tracking_uri)
    version = client.get_model_version_by_alias("tiny-escalated-serving", "production")
    assert version.tags["requant.candidate"] == "qat-int8"
    mlflow.set_tracking_uri(registry.tracking_uri)
    served = mlflow.pyfunc.load_model("models:/tiny-escalated-serving@production")
    assert {a["label"] for a in served.predict(["I want to activate my new card"])} <= set(TINY_LABELS)

    # The attempt is a nested run with its training curve as step metrics, and the decision says why.
    experiment = client.get_run(summary.parent_run_id).info.experiment_id
    attempt = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{summary.parent_run_id}' "
                                                             "and tags.`requant.qat_attempt` = 'true'")
    assert len(attempt) == 1 and attempt[0].info.status == "FINISHED"
    curve = client.get_metric_history(attempt[0].info.run_id, "qat_train_loss")
    assert [m.step for m in curve] == [6 * i for i in range(1, 11)]
    assert curve[-1].value < 0.5 * curve[0].value
    markdown = Path(client.download_artifacts(summary.parent_run_id, "decision.md")).read_text()
    assert "## Quantization-aware fine-tuning" in markdown and "qat-int8 won" in markdown


@pytest.mark.e2e
def test_qat_never_trains_on_the_evaluation_or_confirmation_rows(project, escalated):
    from mlflow import MlflowClient

    from tasks.config.loading import load_settings

    params, summary = escalated
    settings = load_settings(params)
    client = MlflowClient(settings.registry.tracking_uri)
    experiment = client.get_run(summary.parent_run_id).info.experiment_id
    attempt = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{summary.parent_run_id}' "
                                                             "and tags.`requant.qat_attempt` = 'true'")[0]
    used = pd.read_csv(client.download_artifacts(attempt.info.run_id, "qat_training_rows.csv"), dtype=str)
    prepared = Path(settings.data.output_dir)
    evaluation = pd.read_csv(prepared / "evaluation.csv", dtype=str)  # selection and confirmation rows
    calibration = pd.read_csv(prepared / "calibration.csv", dtype=str)
    assert len(used) == summary.decision["qat"]["attempts"][0]["training_rows"] > 50
    assert not set(used[TEXT].str.casefold()) & set(evaluation[TEXT].str.casefold())
    assert set(used[TEXT]) <= set(calibration[TEXT])


@pytest.mark.e2e
def test_with_escalation_disabled_nothing_is_promoted(project, tiny_model_folder, prefect_server):
    from mlflow import MlflowClient

    from flows.requantize import requantize
    from tasks.config.loading import load_settings

    params = params_for(project, "disabled", qat={**QAT, "enabled": False})
    summary = requantize(params_path=params, model_uri=str(tiny_model_folder))
    assert summary.outcome == "no-candidate-passed" and summary.promoted_version is None
    assert summary.decision["qat"]["ran"] is False and "disabled" in summary.decision["qat"]["reason"]
    assert not any(name.startswith("qat-") for name in summary.decision["candidates"])
    client = MlflowClient(load_settings(params).registry.tracking_uri)
    assert client.search_model_versions("name = 'tiny-disabled-serving'") == []


@pytest.mark.e2e
def test_a_zero_time_budget_stops_cleanly_with_the_reason_on_record(project, tiny_model_folder, prefect_server):
    from flows.requantize import requantize

    params = params_for(project, "zero-budget", qat={**QAT, "max_minutes": 0})
    summary = requantize(params_path=params, model_uri=str(tiny_model_folder))
    assert summary.outcome == "no-candidate-passed" and summary.promoted_version is None
    record = summary.decision["qat"]
    assert record["ran"] and record["attempts"][0]["steps"] == 0 and record["attempts"][0]["error"] is None
    assert "time budget is zero" in record["attempts"][0]["stop_reason"]
    assert record["outcome"].startswith("no candidate: time budget is zero")
    assert "time budget is zero" in summary.report


def test_training_rows_drop_every_calibration_text_that_is_an_evaluation_row():
    calibration = pd.DataFrame({TEXT: ["lost my card", "  How old must I be?", "top up failed", "refund please"],
                                LABEL: ["card_lost", "top_up", "top_up", "refund"]})
    evaluation = pd.DataFrame({TEXT: ["how old must i be?", "refund please", "something else"],
                               LABEL: ["top_up", "refund", "refund"]})
    rows = training_rows(calibration, evaluation, TINY_LABELS)
    assert rows.texts == ["lost my card", "top up failed"] and rows.dropped == 2
    assert rows.targets.tolist() == [TINY_LABELS.index("card_lost"), TINY_LABELS.index("top_up")]


def _measured(name: str, precision: str, accuracy: float, recipe: str = "int8-dynamic"):
    from tasks.build.candidates import BuiltCandidate
    from tasks.evaluate.candidates import MeasuredCandidate
    from tasks.measure.scoring import QualityMetrics

    built = BuiltCandidate(name, recipe, precision, {"per_channel": True}, "h", size_ratio=0.3 if precision == "int8" else 1.0)
    return MeasuredCandidate(built, quality=QualityMetrics(accuracy, accuracy, 1.0, accuracy, 100, 20))


def test_escalation_runs_only_when_no_lowered_precision_passes(tmp_path):
    from tasks.config.loading import load_settings

    repo_params = yaml.safe_load(Path("params.yaml").read_text())
    repo_params["quality_bar"] = {"max_relative_accuracy_loss": 0.02, "max_hard_slice_relative_loss": 0.05, "gate": "point"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(repo_params))
    settings = load_settings(path)
    reference = types.SimpleNamespace(quality=types.SimpleNamespace(accuracy=0.90, hard_slice_accuracy=0.90))
    fp32, passing, failing = (_measured("fp32", "fp32", 0.90, "fp32"), _measured("int8-static", "int8", 0.89, "int8-static"),
                              _measured("int4-weight-only", "int4", 0.80, "int4-weight-only"))
    target, reason = plan([fp32, passing, failing], reference, settings)
    assert target is None and "int8-static already passes" in reason
    target, reason = plan([fp32, _measured("int8-static", "int8", 0.85, "int8-static"), failing], reference, settings)
    assert target.built.name == "int4-weight-only" and "lowest expected cost" in reason  # fewest bits first
    named = settings.model_copy(update={"qat": settings.qat.model_copy(update={"target": "int8-static"})})
    target, reason = plan([fp32, passing, failing], reference, named)
    assert target is None and "already passes" in reason
    target, _ = plan([fp32, _measured("int8-static", "int8", 0.85, "int8-static"), failing], reference, named)
    assert target.built.name == "int8-static"


def test_a_named_target_that_is_not_a_candidate_is_refused_in_one_line(tmp_path):
    from tasks.config.loading import load_settings
    from tasks.config.settings import SettingsError

    params = yaml.safe_load(Path("params.yaml").read_text())
    params["qat"]["target"] = "int3-magic"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(SettingsError, match=r"'qat.target': 'int3-magic' is not a candidate; use one of fp32"):
        load_settings(path)


@pytest.mark.parametrize("scheme", [QuantScheme(bits=8), QuantScheme(bits=8, per_channel=True),
                                    QuantScheme(bits=8, symmetric=False), QuantScheme(bits=4, block_size=16)])
def test_weights_written_back_on_their_grid_are_found_again_by_min_max(scheme):
    import torch

    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    on_grid = quantize_weight(weight, scheme)
    assert not torch.equal(on_grid, weight)  # quantization moved the weights...
    torch.testing.assert_close(quantize_weight(on_grid, scheme), on_grid, rtol=0, atol=1e-6)  # ...onto a fixed point


def test_int4_blocks_follow_onnxruntime_formula():
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantizer,
    )

    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    blocks = weight.numpy().reshape(-1, 32)
    q, scale = DefaultWeightOnlyQuantizer.quant_slice_symmetric(blocks)
    expected = (q.astype(np.float32) * scale).reshape(8, 64)
    np.testing.assert_allclose(quantize_weight(weight, QuantScheme(bits=4, block_size=32)).numpy(), expected, atol=1e-6)


def test_hf_classifier_trains_with_fake_quant_and_is_written_back_as_the_same_family(tmp_path, tiny_bert_classifier):
    import torch

    from tasks.models.base import open_model
    from tasks.models.graph import onnx_session
    from tasks.models.io import tokenize

    family = open_model(tiny_bert_classifier)
    model = family.load_trainable()
    scheme = scheme_for("int8-static", {"per_channel": False})
    assert insert_fake_quant(model, scheme) == 2 * 6 + 2  # 6 Linear per layer, the pooler and the classifier
    from tasks.config.settings import FinetuneSettings
    from tasks.train.finetune import fine_tune

    texts = ["lost my card", "top up failed", "refund please", "exchange rate?"] * 4
    result = fine_tune(model, family.tokenizer, texts, np.arange(16) % 4, FinetuneSettings(max_steps=4, batch_size=8),
                       max_length=16)
    assert result.steps == 4 and all(np.isfinite(result.loss_curve))
    assert strip_fake_quant(model) == 14
    folder = family.save_trained(model, tmp_path / "trained")
    trained = open_model(folder)
    assert trained.id == family.id and trained.labels == family.labels
    graph = trained.export_onnx(tmp_path / "onnx" / "model.onnx", 17)
    feed = tokenize(trained.tokenizer, texts[:4], 16)
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    np.testing.assert_allclose(onnx_session(graph, 1).run(["logits"], feed)[0], expected, atol=1e-4)
