"""Choosing the hardware too: two work pools whose workers emulate a 1-core and a 2-core instance by
CPU affinity (taskset), a real Prefect server, the requantize flow on a tiny model. Each profile's
worker times and load-tests the contenders; the cheapest (candidate, profile) pair wins; a worker
killed mid-measurement and a pool with no worker leave their profile out, with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import REPO, tiny_project
from tests.servers import venv_executable

pytestmark = pytest.mark.e2e

HEARTBEAT_S = 5  # workers' heartbeat: one silent for 3 of them (15 s) is gone
PROFILES = [
    # 1 core at a fiftieth of the 2-core price: whatever the two measure, the 1-core pair is cheaper.
    {"name": "emu-1core", "usd_per_hour": 0.02, "work_pool": "test-1core", "description": "1 core of this host"},
    {"name": "emu-2core", "usd_per_hour": 1.0, "work_pool": "test-2core", "description": "2 cores of this host"},
    {"name": "emu-ghost", "usd_per_hour": 0.01, "work_pool": "test-ghost", "description": "a pool nobody serves"},
]


class Workers:
    """Prefect process workers, one per pool, each under its own CPU affinity; stopped by PID."""

    def __init__(self, root: Path, api_url: str) -> None:
        self.root, self.api_url, self.processes = root, api_url, {}

    def start(self, pool: str, cpus: str) -> None:
        home = self.root / f"home-{pool}"
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(home),
               "PREFECT_WORKER_HEARTBEAT_SECONDS": str(HEARTBEAT_S), "PYTHONPATH": str(REPO)}
        with open(self.root / f"{pool}.log", "w") as log:
            self.processes[pool] = subprocess.Popen(
                ["taskset", "-c", cpus, str(venv_executable("prefect")), "worker", "start", "--pool", pool,
                 "--type", "process"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=REPO, start_new_session=True)

    def kill(self, pool: str) -> None:
        """The machine is lost: the worker and its flow-run process die at once, nothing reports."""
        worker = psutil.Process(self.processes[pool].pid)
        for process in [*worker.children(recursive=True), worker]:
            process.kill()

    def log(self, pool: str) -> str:
        return (self.root / f"{pool}.log").read_text()[-3000:]

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                for child in psutil.Process(process.pid).children(recursive=True):
                    child.kill()
                process.kill()
                process.wait()


def wait_online(pool: str, workers: Workers, timeout_s: float = 90) -> None:
    from prefect.client.orchestration import get_client

    from flows.fleet import live_workers

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if live_workers(client, pool):
                return
            time.sleep(1)
    raise AssertionError(f"worker of {pool} not online:\n{workers.log(pool)}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model_folder, prefect_server):
    """A tiny project whose cost section lists three pooled profiles, the measurement deployed on all
    three pools, and live workers on two of them (CPU 0; CPUs 0-1)."""
    from prefect.settings import PREFECT_API_URL

    from flows.fleet import deploy
    from tasks.config.loading import load_settings

    root = tmp_path_factory.mktemp("fleet")
    project = tiny_project(root, tiny_model_folder, serving={"price_from": "served", "step_seconds": 1, "max_seconds": 8},
                           loadtest={"warmup_requests": 5, "max_connections": 32})
    params = project / "params.yaml"
    config = yaml.safe_load(params.read_text())
    config["cost"]["hardware_profiles"] += PROFILES
    config["cost"]["fleet"] = ["emu-1core", "emu-2core"]
    config["cost"]["traffic"]["peak_requests_per_second"] = 400
    params.write_text(yaml.safe_dump(config, sort_keys=False))
    deploy(load_settings(params), REPO)
    workers = Workers(root / "workers", PREFECT_API_URL.value())
    (root / "workers").mkdir()
    workers.start("test-1core", "0")
    workers.start("test-2core", "0,1")
    try:
        for pool in ("test-1core", "test-2core"):
            wait_online(pool, workers)
        yield project, params, workers
    finally:
        workers.stop()


def _flow_runs_of(flow_run_id: str, name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)))


def test_both_profiles_measured_and_the_cheaper_pair_is_promoted_with_its_instance_type(fleet, tiny_model_folder):
    from flows.requantize import requantize
    from tasks.config.loading import load_settings
    from tasks.track import TAG_INSTANCE_TYPE, Tracker

    project, params, workers = fleet
    summary = requantize(params_path=str(params), model_uri=str(tiny_model_folder), work_dir=str(project / "work"),
                         force=True)
    record = summary.decision["fleet"]
    profiles = {p["profile"]: p for p in record["profiles"]}
    assert set(profiles) == {"emu-1core", "emu-2core"}
    for name, cores in (("emu-1core", "1"), ("emu-2core", "2")):
        p = profiles[name]
        assert p["measured"], (p["not_measured_because"], workers.log("test-1core"), workers.log("test-2core"))
        assert p["host"]["cores_available"] == cores and p["host"]["onnxruntime"] and p["host"]["cpu_model"]
        # Every candidate sent is priced on that profile's own figures; the contenders were load-tested there.
        assert set(p["candidates"]) == {"fp32", "int8"}
        assert any("served:" in c["priced_from"] for c in p["candidates"].values())
        assert p["winner"] in p["candidates"] and p["monthly_cost_usd"] > 0

    # The cheaper pair given the prices: each profile's winner at its own price, the lower one chosen.
    cheapest = min(("emu-1core", "emu-2core"), key=lambda n: profiles[n]["monthly_cost_usd"])
    assert cheapest == "emu-1core"  # 2-core costs 50x per hour; 1 core cannot be 50x slower
    assert record["choice"]["profile"] == "emu-1core" and record["choice"]["candidate"] == profiles["emu-1core"]["winner"]
    assert summary.outcome == "promoted" and summary.winner == profiles["emu-1core"]["winner"]
    assert summary.decision["hardware_profile"] == "emu-1core"
    assert "serve on emu-1core" in summary.report and "emu-2core ($1.0/h, work pool test-2core)" in summary.report

    # Quality was computed once, here: one evaluate task per candidate in the requantize flow run, and
    # the candidates' speeds come from the chosen profile's worker (no timing task ran here).
    evaluated = _flow_runs_of(summary.flow_run_id, "evaluate")
    assert sorted(r.name.split("-")[0] for r in evaluated) == ["evaluate", "evaluate"], [r.name for r in evaluated]
    assert not _flow_runs_of(summary.flow_run_id, "timing")
    chosen = profiles["emu-1core"]["candidates"]
    for name, candidate in summary.decision["candidates"].items():
        assert candidate["throughput_per_s"] == pytest.approx(chosen[name]["throughput_per_s"])

    tracker = Tracker(load_settings(params).registry)
    version = tracker.client.get_model_version(tracker.settings.serving_model_name, summary.promoted_version)
    assert version.tags[TAG_INSTANCE_TYPE] == "emu-1core"
    tags = tracker.client.get_run(summary.parent_run_id).data.tags
    assert tags["fleet.emu-1core.cores_available"] == "1" and tags["fleet.emu-2core.cores_available"] == "2"
    assert tags["requant.hardware_profile"] == "emu-1core"
    # Each candidate's run holds its figures on both profiles, to compare in the MLflow UI.
    runs = tracker.client.search_runs([tracker.experiment_id()], f"tags.mlflow.parentRunId = '{summary.parent_run_id}'")
    assert sorted(run.data.tags["requant.candidate"] for run in runs) == ["fp32", "int8"]
    for run in runs:
        for name in ("emu-1core", "emu-2core"):
            assert run.data.metrics[f"fleet.{name}.monthly_cost_usd"] == \
                profiles[name]["candidates"][run.data.tags["requant.candidate"]]["monthly_cost_usd"]


def test_a_killed_worker_and_a_pool_without_one_leave_their_profiles_out_and_the_run_still_decides(fleet,
                                                                                                  tiny_model_folder):

    from flows.requantize import requantize

    project, params, workers = fleet
    config = yaml.safe_load(params.read_text())
    config["cost"]["fleet"] = ["emu-1core", "emu-2core", "emu-ghost"]
    params.write_text(yaml.safe_dump(config, sort_keys=False))
    killed = threading.Event()
    log = workers.root / "test-1core.log"
    already = len(log.read_text())  # the first test's measurement is in the log too

    def kill_when_measuring() -> None:
        # The 1-core worker dies once its measurement has begun (the flow-run process logs it through
        # the worker): its timing rounds and load tests, tens of seconds, are still to come.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if "candidates as emu-1core" in log.read_text()[already:]:
                workers.kill("test-1core")
                killed.set()
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_measuring, daemon=True)
    killer.start()
    summary = requantize(params_path=str(params), model_uri=str(tiny_model_folder), work_dir=str(project / "work"),
                         force=True)
    killer.join(timeout=5)
    assert killed.is_set()
    profiles = {p["profile"]: p for p in summary.decision["fleet"]["profiles"]}
    assert not profiles["emu-1core"]["measured"] and "went silent while measuring" in profiles["emu-1core"]["not_measured_because"]
    assert not profiles["emu-ghost"]["measured"] and "no live worker in work pool test-ghost" in \
        profiles["emu-ghost"]["not_measured_because"]
    assert profiles["emu-2core"]["measured"]
    # The run still decides, on the one profile measured; production (priced on emu-1core) moves with it.
    choice = summary.decision["fleet"]["choice"]
    assert choice["profile"] == "emu-2core" and [p["profile"] for p in choice["pairs"]] == ["emu-2core"]
    assert "move from emu-1core to emu-2core" in summary.report
    assert "emu-ghost ($0.01/h, work pool test-ghost): NOT MEASURED, never ranked" in summary.report
    assert summary.outcome in ("promoted", "kept-production")
    shutil.rmtree(project / "work" / "fleet", ignore_errors=True)
