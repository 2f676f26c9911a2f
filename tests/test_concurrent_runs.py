"""Two requantize runs for the same model started at once: exactly one promotion."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.conftest import banking77_slice, make_project

pytestmark = pytest.mark.e2e


def test_two_simultaneous_runs_promote_exactly_once(tmp_path, tiny_model_folder):
    from tasks.model_io import read_model_card

    train_csv, test_csv = banking77_slice(tmp_path / "data", intents=4, train_per_intent=30, test_per_intent=25)
    labels = read_model_card(tiny_model_folder).labels
    for path in (train_csv, test_csv):
        frame = pd.read_csv(path)
        frame["category"] = frame["category"].map(dict(zip(sorted(frame["category"].unique()), labels)))
        frame.to_csv(path, index=False)
    db = tmp_path / "mlflow.db"
    project = make_project(tmp_path / "project", {
        "data": {"train_csv": str(train_csv), "test_csv": str(test_csv), "train_sha256": None, "test_sha256": None,
                 "calibration_size": 32, "min_calibration_rows": 8, "min_eval_rows": 50},
        "evaluate": {"latency_runs": 20, "latency_repeats": 2, "warmup_runs": 2, "throughput_batches": 1,
                     "throughput_repeats": 2, "throughput_batch_size": 8},
        "search": {"enabled": False},
        # A bar every candidate of a random tiny model can meet, so that a winner exists to promote.
        "quality_bar": {"max_relative_accuracy_loss": 0.9, "max_hard_slice_relative_loss": 0.9, "gate": "point"},
        "registry": {"tracking_uri": f"sqlite:///{db}", "artifact_location": str(tmp_path / "art")},
        "quantize": {"candidates": [{"name": "fp32", "recipe": "fp32"},
                                    {"name": "int8", "recipe": "int8-dynamic", "config": {"per_channel": True}}]},
    })
    # The data stage first, so both runs start from the same prepared data, as two schedulers would.
    from tasks.data_version import reproduce

    reproduce(project, project / "data" / "prepared")
    command = [sys.executable, "-m", "flows.cli", "run", "--params", str(project / "params.yaml"),
               "--model", str(tiny_model_folder), "--json"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [r.communicate(timeout=600) for r in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
    outcomes = sorted(json.loads(out)["outcome"] for out, _ in outputs)
    assert outcomes == ["already-decided", "promoted"]
    client = MlflowClient(f"sqlite:///{db}")
    versions = client.search_model_versions("name = 'minilm-banking77-serving'")
    assert len(versions) == 1
    assert str(client.get_model_version_by_alias("minilm-banking77-serving", "production").version) == str(versions[0].version)
