"""The quantize fan-out on a local multi-process Dask cluster, against a running Prefect server."""

import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.conftest import tiny_project
from tests.servers import prefect_api_server

pytestmark = pytest.mark.e2e


def test_requantize_fans_out_on_dask_workers(tmp_path, tiny_model_folder):
    project = tiny_project(tmp_path, tiny_model_folder, operations={"task_runner": "dask", "dask_workers": 2},
                           quantize={"max_parallel": 2})
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
