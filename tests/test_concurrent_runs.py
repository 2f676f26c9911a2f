"""Two requantize runs for the same model started at once: exactly one promotion."""

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import tiny_project

pytestmark = pytest.mark.e2e


def test_two_simultaneous_runs_promote_exactly_once(tmp_path, tiny_model_folder):
    project = tiny_project(tmp_path, tiny_model_folder)
    db = tmp_path / "mlflow.db"
    # The data stage first, so both runs start from the same prepared data, as two schedulers would.
    from tasks.data.version import reproduce

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
