"""A new model version registered in MLflow starts a requantize run by itself, which moves the alias.

Real servers on 127.0.0.1, started and stopped here: Prefect server, MLflow server (which sends the
webhook), requant's webhook receiver, and `requant serve` with the deployment's event trigger.
"""

import os
import sys
import time
import urllib.error
import urllib.request

import httpx
import pytest
from mlflow import MlflowClient

from tests.conftest import tiny_project
from tests.servers import (
    background,
    free_port,
    mlflow_tracking_server,
    prefect_api_server,
    wait_until_answering,
)

pytestmark = pytest.mark.e2e
# From registering a version to a completed run and a moved alias. Measured here: about 60-90 s
# (deployment trigger ~10 s, a flow-run process start, the run itself on a tiny model).
BOUND_SECONDS = 300
SECRET = "test-secret-not-for-production"


def completed_runs(api: str, model_uri: str) -> list[dict]:
    runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 50}, timeout=10).json()
    return [r for r in runs if r["parameters"].get("model_uri") == model_uri and r["state_type"] == "COMPLETED"]


def test_new_model_version_triggers_requantize_and_moves_the_alias(tmp_path, tiny_model_folder):
    from tasks.config.settings import RegistrySettings
    from tasks.track import Tracker

    with prefect_api_server(tmp_path / "prefect") as api, mlflow_tracking_server(tmp_path / "mlflow") as mlflow_url:
        project = tiny_project(tmp_path, tiny_model_folder, model={"source_uri": "models:/tiny-src@champion"},
                               train={"registered_model_name": "tiny-src"},
                               registry={"tracking_uri": mlflow_url, "artifact_location": None})
        env = {**os.environ, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_url, "REQUANT_WEBHOOK_SECRET": SECRET,
               "PREFECT_HOME": str(tmp_path / "prefect")}
        receiver_port = free_port()
        receiver_url = f"http://127.0.0.1:{receiver_port}/mlflow"
        cli = [sys.executable, "-m", "flows.cli"]
        with background(cli + ["webhook-receiver", "--port", str(receiver_port)], tmp_path / "receiver.log", env) as receiver, \
                background(cli + ["serve", "--params", str(project / "params.yaml")], tmp_path / "serve.log", env):
            wait_until_answering(receiver_url, receiver, tmp_path / "receiver.log", 60)
            # An unsigned delivery is refused and triggers nothing.
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(receiver_url, data=b'{"entity": "model_version"}', method="POST"))
            assert refused.value.code == 401

            tracker = Tracker(RegistrySettings(tracking_uri=mlflow_url, artifact_location=None, serving_model_name="minilm-banking77-serving"))
            tracker.register_webhook(receiver_url, SECRET)
            time.sleep(15)  # `requant serve` registers the deployment and its trigger
            start = time.monotonic()
            version = tracker.register_source(tiny_model_folder, "tiny-src", "champion", "train", {}, {"test_accuracy": 0.5})
            model_uri = f"models:/tiny-src/{version}"
            client = MlflowClient(mlflow_url)
            moved = None
            while time.monotonic() - start < BOUND_SECONDS and not moved:
                time.sleep(3)
                try:
                    current = client.get_model_version_by_alias("minilm-banking77-serving", "production")
                    moved = current if current.tags.get("requant.source_version") == version else None
                except Exception:  # alias not set yet
                    pass
            elapsed = time.monotonic() - start
            logs = (tmp_path / "serve.log").read_text()[-3000:] + (tmp_path / "receiver.log").read_text()[-1500:]
            assert moved, f"alias did not move within {BOUND_SECONDS} s; logs:\n{logs}"
            assert moved.tags["requant.source_uri"] == model_uri
            deadline = time.monotonic() + 60
            while not completed_runs(api, model_uri) and time.monotonic() < deadline:
                time.sleep(2)
            assert completed_runs(api, model_uri), logs
            print(f"new version -> completed run and moved alias in {elapsed:.0f} s")
