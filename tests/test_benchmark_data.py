"""Benchmarks given `--params other.yaml` read that file's data, as `requant run --params` does.

A second params file gets a DVC stage of its own (`stages/<name>/`, tasks/data/version.py); a
benchmark that reads the root `dvc.lock` instead fails or, worse, measures params.yaml's data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.data.version import reproduce_for_params
from tests.conftest import REPO, tiny_project


def _second_params(project: Path, model_folder: Path, calibration_size: int) -> Path:
    """other.yaml: the project's params with its own output folder and calibration size."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update({"output_dir": "data/prepared-other", "calibration_size": calibration_size})
    params["model"]["source_uri"] = str(model_folder)
    path = project / "other.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def two_params_project(tmp_path, tiny_model_folder) -> tuple[Path, Path]:
    """A tiny project whose params.yaml was prepared, plus other.yaml with different data settings."""
    project = tiny_project(tmp_path, tiny_model_folder)
    reproduce_for_params(project / "params.yaml")  # the root stage exists, as after a first `requant run`
    return project, _second_params(project, tiny_model_folder, calibration_size=16)


def test_reproduce_for_params_reads_the_second_params_files_own_stage(two_params_project):
    project, other = two_params_project
    default_calibration = len(pd.read_csv(project / "data" / "prepared" / "calibration.csv"))

    data = reproduce_for_params(other)

    assert data.calibration_path == project / "data" / "prepared-other" / "calibration.csv"
    assert len(pd.read_csv(data.calibration_path)) == 16 != default_calibration
    lock = yaml.safe_load((project / "stages" / "other" / "dvc.lock").read_text())
    recorded = {Path(o["path"]).name: o["md5"] for o in lock["stages"]["prepare_data"]["outs"]}
    assert recorded["calibration.csv"] == data.calibration_md5
    assert data.version != reproduce_for_params(project / "params.yaml").version


def test_decision_stability_benchmark_runs_with_a_second_params_file(two_params_project):
    project, other = two_params_project
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decision_stability.py"), "--params", "other.yaml",
                           "--runs", "1", "--rounds", "1", "--throughput-batches", "1", "--latency-runs", "2"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "winner frequency:" in done.stdout and "same winner in 1 of 1 runs" in done.stdout
    assert (project / "stages" / "other" / "dvc.lock").is_file()
