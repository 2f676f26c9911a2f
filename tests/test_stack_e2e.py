"""The production stack, for real: `infra/stack.sh up` (PostgreSQL, S3, MLflow with auth, Prefect with a
work-pool worker, Dask, the webhook receiver) on 127.0.0.1, and requant driven through it end to end.

The stack is started once for this module and stopped by PID at the end, even when a test fails.
Tests run in file order and build on each other's registry state (versions 1, 2, 3, 4 of the
source model), as an operator's day would.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from tests.conftest import REPO, tiny_project
from tests.servers import free_port

pytestmark = pytest.mark.e2e
SOURCE = "tiny-src"
SERVING = "minilm-banking77-serving"
# From registering a version to the moved alias, through webhook, receiver, Prefect event trigger,
# the worker starting a flow-run process, and the run itself (tiny model; 2 cores shared with other work).
ALIAS_BOUND_S = 600
# Heartbeats every 30 s, a run silent for 75 s is crashed; the trigger service evaluates every few seconds.
CRASH_BOUND_S = 240
TIMINGS: dict[str, float] = {}
VERSION_FOLDERS: list[Path] = []


def stack_cli(state: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "infra" / "stack.py"), *args, "--state", str(state)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)},
                          check=False)


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value.strip("'") for key, value in pairs}


class Stack:
    """Handles on a running stack for the tests: its URLs, clients and state folder."""

    def __init__(self, state: Path, project: Path) -> None:
        self.state, self.project = state, project
        self.env = read_env(state / "env")
        self.secrets = read_env(state / "secrets.env")
        self.api = self.env["PREFECT_API_URL"]
        self.mlflow_url = self.env["MLFLOW_TRACKING_URI"]
        user, _, password = self.env["PREFECT_API_AUTH_STRING"].partition(":")
        self.prefect = httpx.Client(base_url=self.api, auth=(user, password), timeout=30)

    def pid(self, service: str) -> int:
        return int((self.state / "pids" / f"{service}.pid").read_text())

    def log(self, service: str, chars: int = 3000) -> str:
        return (self.state / "logs" / f"{service}.log").read_text(errors="replace")[-chars:]

    def logs(self) -> str:
        return "\n".join(f"--- {s}\n{self.log(s, 2000)}" for s in ("prefect-worker", "webhook-receiver", "mlflow"))

    def deployment(self) -> dict:
        return self.prefect.get("/deployments/name/requantize/requantize").raise_for_status().json()

    def flow_runs(self, model_uri: str) -> list[dict]:
        body = {"flow_runs": {"deployment_id": {"any_": [self.deployment()["id"]]}}, "limit": 100}
        runs = self.prefect.post("/flow_runs/filter", json=body).raise_for_status().json()
        return [r for r in runs if r["parameters"].get("model_uri") == model_uri]

    def wait_for_runs(self, model_uri: str, state_types: set[str], count: int, timeout_s: float) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            runs = [r for r in self.flow_runs(model_uri) if r["state_type"] in state_types]
            if len(runs) >= count:
                return runs
            time.sleep(2)
        raise AssertionError(f"no {count} run(s) of {model_uri} in {state_types} within {timeout_s:.0f} s: "
                             f"{[(r['name'], r['state_type']) for r in self.flow_runs(model_uri)]}\n{self.logs()}")


def production_source_version(client) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(SERVING, "production").tags.get("requant.source_version")
    except MlflowException:  # the alias is not set yet
        return None


def wait_for_alias(stack: Stack, client, version: str, start: float) -> float:
    while time.monotonic() - start < ALIAS_BOUND_S:
        if production_source_version(client) == version:
            return time.monotonic() - start
        time.sleep(2)
    raise AssertionError(f"@production did not move to source version {version} within {ALIAS_BOUND_S} s\n{stack.logs()}")


def serving_versions_of(client, version: str) -> list:
    return [v for v in client.search_model_versions(f"name = '{SERVING}'") if v.tags.get("requant.source_version") == version]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_folder):
    # PostgreSQL runs as the `postgres` user, which must reach its data folder: not under pytest's 0700 tmp.
    state = Path(tempfile.mkdtemp(prefix="requant-stack-"))
    state.chmod(0o755)
    dask_port = free_port()
    root = tmp_path_factory.mktemp("stack")
    project = tiny_project(root, tiny_model_folder, model={"source_uri": f"models:/{SOURCE}@champion"},
                           train={"registered_model_name": SOURCE},
                           registry={"artifact_location": None},
                           # The quantize fan-out runs on the stack's Dask workers, in the shared work folder.
                           operations={"task_runner": "dask", "dask_address": f"tcp://127.0.0.1:{dask_port}"})
    # The repository's deployment, for this project: its params file and its source model.
    deployment = (REPO / "prefect.yaml").read_text()
    deployment = deployment.replace("mlflow.model.minilm-banking77", f"mlflow.model.{SOURCE}")
    deployment = deployment.replace("params_path: params.yaml", f"params_path: {project / 'params.yaml'}")
    (project / "prefect.yaml").write_text(deployment)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["STACK_DASK_PORT"] = str(dask_port)
    try:
        start = time.monotonic()
        up = stack_cli(state, "up", "--project", str(project))
        TIMINGS["stack up"] = time.monotonic() - start
        assert up.returncode == 0, up.stdout + up.stderr
        running = Stack(state, project)
        # requant's own user, never the admin.
        os.environ.update({k: running.env[k] for k in saved})
        yield running
    finally:
        os.environ.pop("STACK_DASK_PORT", None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        down = stack_cli(state, "down", timeout=120)
        print(down.stdout + down.stderr)
        if down.returncode == 0:
            shutil.rmtree(state, ignore_errors=True)
        for folder in VERSION_FOLDERS:
            shutil.rmtree(folder, ignore_errors=True)
        print("stack timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def tracker(stack):
    from tasks.config.settings import RegistrySettings
    from tasks.track import Tracker

    return Tracker(RegistrySettings(tracking_uri=stack.mlflow_url, artifact_location=None, serving_model_name=SERVING))


def retire_production(stack: Stack) -> None:
    """Unset @production, as the admin (requant's user may move the alias, not delete it).

    Each phase below registers a new version of a tiny random model; with a production model to
    beat, such a version rarely wins beyond noise and production is rightly kept. Without one, the
    winner is promoted, so the alias moving shows the whole path ran.
    """
    admin = (os.environ.get("MLFLOW_ADMIN_USERNAME", "admin"), stack.secrets["MLFLOW_ADMIN_PASSWORD"])
    httpx.request("DELETE", f"{stack.mlflow_url}/api/2.0/mlflow/registered-models/alias", auth=admin, timeout=30,
                  json={"name": SERVING, "alias": "production"}).raise_for_status()


def register_source(tracker, tiny_model_folder) -> str:
    """Register a new source version whose content differs from every earlier one.

    The same bytes would be "already decided" (the decision key covers the model's content), so each
    version gets its own head: the tiny model's, nudged by a seed.
    """
    from safetensors.numpy import load_file, save_file

    from tasks.models.io import HEAD_FILE

    seed = len(VERSION_FOLDERS) + 1
    folder = Path(tempfile.mkdtemp(prefix=f"tiny-src-{seed}-"))
    shutil.copytree(tiny_model_folder, folder, dirs_exist_ok=True)
    head = load_file(str(tiny_model_folder / HEAD_FILE))
    head["weight"] = head["weight"] + np.random.default_rng(seed).normal(scale=0.01, size=head["weight"].shape).astype(np.float32)
    save_file(head, str(folder / HEAD_FILE))
    VERSION_FOLDERS.append(folder)
    return tracker.register_source(folder, SOURCE, "champion", "train", {}, {"test_accuracy": 0.5})


def test_stack_refuses_anonymous_clients_and_requant_is_not_admin(stack):
    assert httpx.get(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get-by-name",
                     params={"experiment_name": "requant"}).status_code == 401
    requant = (stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])
    assert requant[0] == "requant"
    assert httpx.get(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "requant"},
                     auth=requant).status_code == 200
    # Webhooks are the admin's: requant cannot list, create or delete them.
    assert httpx.get(f"{stack.mlflow_url}/api/2.0/mlflow/webhooks", auth=requant).status_code == 403
    assert httpx.get(f"{stack.api}/health").status_code == 200
    assert httpx.post(f"{stack.api}/deployments/filter", json={}).status_code == 401


def test_nightly_schedule_and_concurrency_limit_are_on_the_server(stack):
    deployment = stack.deployment()
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    assert deployment["schedules"][0]["schedule"]["timezone"] == "UTC" and deployment["schedules"][0]["active"]
    assert deployment["work_pool_name"] == "requant-pool"
    assert deployment["global_concurrency_limit"]["limit"] == 1
    # The server's scheduler creates the upcoming nightly runs (it wakes up every minute or so).
    deadline, scheduled = time.monotonic() + 120, []
    while not scheduled and time.monotonic() < deadline:
        scheduled = stack.prefect.post("/flow_runs/filter", json={"flow_runs": {
            "deployment_id": {"any_": [deployment["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}}).json()
        time.sleep(0 if scheduled else 3)
    assert scheduled and all("T02:00:00" in r["expected_start_time"] for r in scheduled), scheduled[:2]
    workers = stack.prefect.post("/work_pools/requant-pool/workers/filter", json={}).json()
    assert any(w["status"] == "ONLINE" for w in workers), workers


def test_the_fleet_pools_have_a_worker_each_under_its_cpu_affinity_and_the_measurement_deployed(stack):
    for service, pool, cpus in (("fleet-worker-1core", "requant-1core", {0}), ("fleet-worker-2core", "requant-2core", {0, 1})):
        workers = stack.prefect.post(f"/work_pools/{pool}/workers/filter", json={}).json()
        assert any(w["status"] == "ONLINE" for w in workers), (workers, stack.log(service))
        assert set(psutil.Process(stack.pid(service)).cpu_affinity()) == cpus
        deployment = stack.prefect.get(f"/deployments/name/measure-profile/measure-emulated-{service.split('-')[-1]}").json()
        assert deployment["work_pool_name"] == pool, deployment


def test_new_source_version_fires_the_webhook_and_the_worker_moves_the_alias(stack, tracker, tiny_model_folder):
    start = time.monotonic()
    version = register_source(tracker, tiny_model_folder)
    TIMINGS["trigger to alias (postgres)"] = wait_for_alias(stack, tracker.client, version, start)
    runs = stack.wait_for_runs(f"models:/{SOURCE}/{version}", {"COMPLETED"}, 1, 120)
    assert runs[0]["work_pool_name"] == "requant-pool"
    # The quantize tasks ran on the stack's Dask cluster, and wrote where the flow reads.
    assert "Receive client connection" in stack.log("dask-scheduler", 100_000)
    assert any((stack.project / "models" / "work" / "candidates").iterdir())
    # Artifacts live in the stack's S3 bucket, behind the MLflow server.
    import boto3

    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{read_env(stack.state / 'ports.env')['s3']}",
                      aws_access_key_id=stack.secrets["S3_ACCESS_KEY_ID"],
                      aws_secret_access_key=stack.secrets["S3_SECRET_ACCESS_KEY"], region_name="us-east-1")
    assert s3.list_objects_v2(Bucket="requant", Prefix="mlflow/").get("KeyCount", 0) > 0


def test_killed_worker_leaves_a_crashed_run_and_the_next_run_promotes_once(stack, tracker, tiny_model_folder):
    from tasks import track

    retire_production(stack)
    version = register_source(tracker, tiny_model_folder)
    model_uri = f"models:/{SOURCE}/{version}"
    stack.wait_for_runs(model_uri, {"RUNNING"}, 1, ALIAS_BOUND_S)
    # Mid-run: the flow has opened its MLflow run for this version.
    experiment = tracker.client.get_experiment_by_name("requant").experiment_id
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not tracker.client.search_runs(
            [experiment], f"tags.`{track.TAG_SOURCE_VERSION}` = '{version}' and attributes.status = 'RUNNING'"):
        time.sleep(0.5)
    # The machine is lost: the worker and its flow-run process die at once, nothing reports.
    worker = psutil.Process(stack.pid("prefect-worker"))
    for process in [*worker.children(recursive=True), worker]:
        process.send_signal(signal.SIGKILL)
    start = time.monotonic()
    crashed = stack.wait_for_runs(model_uri, {"CRASHED"}, 1, CRASH_BOUND_S)
    TIMINGS["killed run marked crashed"] = time.monotonic() - start
    assert production_source_version(tracker.client) is None, "a killed run must not move the alias"

    restarted = stack_cli(stack.state, "restart", "prefect-worker")
    assert restarted.returncode == 0, restarted.stderr
    # The next run for the same version (as the nightly run or an operator's retry would start it).
    deployment = stack.deployment()
    stack.prefect.post(f"/deployments/{deployment['id']}/create_flow_run", json={
        "parameters": {**deployment["parameters"], "model_uri": model_uri}}).raise_for_status()
    start = time.monotonic()
    wait_for_alias(stack, tracker.client, version, start)
    stack.wait_for_runs(model_uri, {"COMPLETED"}, 1, 120)
    assert [r["id"] for r in stack.wait_for_runs(model_uri, {"CRASHED"}, 1, 1)] == [crashed[0]["id"]]
    # Exactly one version registered and one promotion for this source version; the dead run is closed.
    assert len(serving_versions_of(tracker.client, version)) == 1
    parents = tracker.client.search_runs([experiment], f"tags.`{track.TAG_SOURCE_VERSION}` = '{version}'")
    parents = [r for r in parents if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FAILED", "FINISHED"], [(r.info.status, r.data.tags) for r in parents]
    assert [r.data.tags.get(track.TAG_PROMOTION) for r in parents if r.info.status == "FINISHED"] == ["done"]
    assert "died" in next(r for r in parents if r.info.status == "FAILED").data.tags[track.TAG_FAILURE]


def test_restarted_mlflow_server_still_delivers_the_webhook(stack, tracker, tiny_model_folder):
    retire_production(stack)
    start = time.monotonic()
    restarted = stack_cli(stack.state, "restart", "mlflow")
    TIMINGS["mlflow restart"] = time.monotonic() - start
    assert restarted.returncode == 0, restarted.stderr
    start = time.monotonic()
    version = register_source(tracker, tiny_model_folder)
    TIMINGS["trigger to alias after mlflow restart"] = wait_for_alias(stack, tracker.client, version, start)
    assert "emitted mlflow.model_version.created" in stack.log("webhook-receiver", 100_000)


def test_concurrent_runs_of_one_version_are_serialised_and_promote_once(stack, tracker, tiny_model_folder):
    retire_production(stack)
    version = register_source(tracker, tiny_model_folder)  # the webhook starts one run
    model_uri = f"models:/{SOURCE}/{version}"
    deployment = stack.deployment()
    extra = 2  # and two more at once, as a nightly run and a retry colliding with it
    for _ in range(extra):
        stack.prefect.post(f"/deployments/{deployment['id']}/create_flow_run", json={
            "parameters": {**deployment["parameters"], "model_uri": model_uri}}).raise_for_status()
    runs = stack.wait_for_runs(model_uri, {"COMPLETED"}, 1 + extra, ALIAS_BOUND_S + 120 * extra)
    assert production_source_version(tracker.client) == version
    assert len(serving_versions_of(tracker.client, version)) == 1
    # Never two at once: the deployment's limit of 1 queued them.
    spans = sorted((r["start_time"], r["end_time"]) for r in runs)
    assert all(prev_end <= next_start for (_, prev_end), (next_start, _) in itertools.pairwise(spans)), spans
    TIMINGS["concurrent runs serialised"] = len(runs)
