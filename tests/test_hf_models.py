"""Hugging Face classifiers through the real flow: tiny random BERT, DistilBERT and RoBERTa, logged
with MLflow's transformers flavor, requantized, promoted, and served as text-in pyfunc models.

Real parts: MLflow on sqlite, DVC in a git repo, Prefect's temporary server, `mlflow models serve`.
"""

import json
import os
import sys
import urllib.request

import numpy as np
import pytest

from tests.cli_helpers import params_for
from tests.conftest import TINY_LABELS, tiny_hf_classifier, tiny_project
from tests.servers import HOST, background, free_port, wait_until_answering

pytestmark = pytest.mark.e2e
ARCHITECTURES = ["bert", "distilbert", "roberta"]
TEXTS = ["I lost my card yesterday", "how do I top up by bank transfer?", "I want a refund",
         "what exchange rate do you use?"]


@pytest.fixture(scope="module")
def hf_project(tmp_path_factory, minilm_dir, tiny_bert_classifier):
    tmp = tmp_path_factory.mktemp("hf")
    project = tiny_project(tmp, tiny_bert_classifier)
    folders = {arch: tiny_hf_classifier(tmp / arch, arch, minilm_dir) for arch in ARCHITECTURES}
    return project, folders


def register(params_path: str, folder, name: str) -> str:
    from tasks.config.loading import load_settings
    from tasks.track import Tracker

    return Tracker(load_settings(params_path).registry).register_transformers(folder, name, "champion", "train", {},
                                                                              {"test_accuracy": 0.25})


def candidate_model_uri(client, parent_run_id: str, candidate: str) -> str:
    experiment = client.get_run(parent_run_id).info.experiment_id
    run = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                                         f"and tags.`requant.candidate` = '{candidate}'")[0]
    return f"models:/{run.outputs.model_outputs[0].model_id}"


def triggered_model_uri(params_path: str, name: str, version: str) -> str:
    """The model_uri the deployment's webhook trigger (flows/deploy.py) passes for a new version."""
    from flows.deploy import deployment_options
    from tasks.config.loading import load_settings

    settings = load_settings(params_path)
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"source_uri": f"models:/{name}@champion"})})
    trigger = deployment_options(settings, params_path)["triggers"][0]
    assert trigger.match["prefect.resource.id"] == [f"mlflow.model.{name}"]  # fires for this model only
    return (trigger.parameters["model_uri"].replace("{{ event.payload.name }}", name)
            .replace("{{ event.payload.version }}", version))


@pytest.fixture(scope="module")
def promoted(hf_project, prefect_server):
    """Each architecture registered as a transformers-flavor version, then requantized by the flow."""
    from flows.requantize import requantize

    project, folders = hf_project
    runs = {}
    for arch in ARCHITECTURES:
        params = params_for(project, arch)
        version = register(params, folders[arch], f"tiny-{arch}")
        runs[arch] = (params, requantize(params_path=params, model_uri=triggered_model_uri(params, f"tiny-{arch}", version)))
    return runs


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_transformers_flavor_version_is_requantized_and_promoted_as_a_text_model(hf_project, promoted, arch):
    import mlflow
    from mlflow import MlflowClient
    from transformers import pipeline

    from tasks.config.loading import load_settings

    params, summary = promoted[arch]
    assert summary.outcome == "promoted", summary.report
    assert summary.decision["candidates"]["int8"]["error"] is None  # recipes ran on this architecture's graph
    uri = load_settings(params).registry.tracking_uri
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(f"models:/tiny-{arch}-serving@production")
    answers = served.predict(TEXTS)  # one {"label", "score"} per text
    assert len(answers) == len(TEXTS) and all(set(a) == {"label", "score"} for a in answers)
    assert {a["label"] for a in answers} <= set(TINY_LABELS) and all(0 < a["score"] <= 1 for a in answers)
    # The FP32 candidate, as logged, answers exactly like the source model's own pipeline.
    fp32 = mlflow.pyfunc.load_model(candidate_model_uri(MlflowClient(uri), summary.parent_run_id, "fp32")).predict(TEXTS)
    expected = pipeline("text-classification", model=str(hf_project[1][arch]), device="cpu")(TEXTS)
    assert [a["label"] for a in fp32] == [e["label"] for e in expected]
    np.testing.assert_allclose([a["score"] for a in fp32], [e["score"] for e in expected], atol=1e-4)
    # The raw graph is kept for teams that serve with ONNX Runtime directly.
    local = mlflow.artifacts.download_artifacts(f"models:/tiny-{arch}-serving@production")
    assert os.path.isfile(os.path.join(local, "artifacts", "model.onnx"))


def test_promoted_model_answers_raw_text_over_http(hf_project, promoted, tmp_path):
    from tasks.config.loading import load_settings

    params, _ = promoted["bert"]
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    # `mlflow models serve` starts uvicorn by name: the venv's bin folder must be on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": load_settings(params).registry.tracking_uri,
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    mlflow_cli = os.path.join(bin_dir, "mlflow")
    command = [mlflow_cli, "models", "serve", "-m", "models:/tiny-bert-serving@production", "--env-manager", "local",
               "-h", HOST, "-p", str(port), "--workers", "1"]
    with background(command, tmp_path / "serve.log", env) as server:
        wait_until_answering(f"http://{HOST}:{port}/ping", server, tmp_path / "serve.log", 120)
        request = urllib.request.Request(f"http://{HOST}:{port}/invocations", data=json.dumps({"inputs": TEXTS}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=60) as reply:
            predictions = json.loads(reply.read())["predictions"]
    assert len(predictions) == len(TEXTS)
    assert all(p["label"] in TINY_LABELS and 0 < p["score"] <= 1 for p in predictions)
