"""The quantize fan-out on a local multi-process Dask cluster, against a running Prefect server."""

import json
import os
import subprocess
import sys

import httpx
import pandas as pd
import pytest

from tests.conftest import banking77_slice, make_project
from tests.servers import prefect_api_server

pytestmark = pytest.mark.e2e


def test_requantize_fans_out_on_dask_workers(tmp_path, monkeypatch, tiny_model_folder):
    from tasks.model_io import read_model_card

    train_csv, test_csv = banking77_slice(tmp_path / "data", intents=4, train_per_intent=30, test_per_intent=25)
    # Real Banking77 text, relabelled with the tiny model's 4 class names.
    labels = read_model_card(tiny_model_folder).labels
    for path in (train_csv, test_csv):
        frame = pd.read_csv(path)
        frame["category"] = frame["category"].map(dict(zip(sorted(frame["category"].unique()), labels)))
        frame.to_csv(path, index=False)
    project = make_project(tmp_path / "project", {
        "data": {"train_csv": str(train_csv), "test_csv": str(test_csv), "train_sha256": None, "test_sha256": None,
                 "calibration_size": 32, "min_calibration_rows": 8, "min_eval_rows": 50},
        "evaluate": {"latency_runs": 20, "latency_repeats": 2, "warmup_runs": 2, "throughput_batches": 1,
                     "throughput_repeats": 2, "throughput_batch_size": 8},
        "search": {"enabled": False},
        "operations": {"task_runner": "dask", "dask_workers": 2},
        "registry": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_location": str(tmp_path / "art")},
        "quantize": {"max_parallel": 2, "candidates": [
            {"name": "fp32", "recipe": "fp32"},
            {"name": "int8-dynamic", "recipe": "int8-dynamic", "config": {"per_channel": True}}]},
    })
    # The flow runs in its own process, as `requant run` would: this test process keeps no Prefect
    # client state pointing at a server that is stopped when the test ends.
    with prefect_api_server(tmp_path / "prefect-home") as api:
        env = {**os.environ, "PREFECT_API_URL": api}
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--params", str(project / "params.yaml"),
                               "--model", str(tiny_model_folder), "--json"], capture_output=True, text=True, env=env,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout)
        builders = {c["built_by"] for c in summary["decision"]["candidates"].values()}
        assert summary["outcome"] in {"promoted", "no-candidate-passed"}
        # Built by Dask worker processes: neither this process nor the flow's.
        flow_pid = summary["decision"]["flow_pid"]
        assert len(builders) >= 1 and all(not b.endswith(f":{flow_pid}") for b in builders), (builders, flow_pid)
        task_runs = httpx.post(f"{api}/task_runs/filter", json={"limit": 50}, timeout=10).json()
        quantize = [r for r in task_runs if r["name"].startswith("quantize")]
        assert len(quantize) == 2 and all(r["state_type"] == "COMPLETED" for r in quantize)
