"""Bad input through the real `requant` command: one clear line, exit 2, production untouched."""

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, make_project


def requant(*args, cwd=None):
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    return done, errors


def assert_one_clear_error(done, errors, *fragments):
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_cli_missing_params_file(tmp_path):
    assert_one_clear_error(*requant("run", "--params", str(tmp_path / "nope.yaml")), "not found", "--params")


def test_cli_invalid_params_value(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["latency_runs"] = "many"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert_one_clear_error(*requant("run", "--params", str(tmp_path / "params.yaml")), "evaluate.latency_runs")


def test_cli_unknown_recipe(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["quantize"]["candidates"] = [{"name": "int2", "recipe": "int2-magic"}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert_one_clear_error(*requant("run", "--params", str(tmp_path / "params.yaml")), "unknown recipe 'int2-magic'")


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "project", {
        "data": {"train_csv": str(REPO.parent / "shared/data/banking77/train.csv"),
                 "test_csv": str(REPO.parent / "shared/data/banking77/test.csv")},
        "registry": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_location": str(tmp_path / "art")},
    })


def test_cli_model_path_that_does_not_exist(project, tmp_path):
    done, errors = requant("run", "--params", str(project / "params.yaml"), "--model", str(tmp_path / "missing"))
    assert_one_clear_error(done, errors, "does not exist")
    assert "is not set yet" in requant("status", "--params", str(project / "params.yaml"))[0].stdout


def test_cli_model_path_that_is_not_a_model(project, tmp_path):
    assert_one_clear_error(*requant("run", "--params", str(project / "params.yaml"), "--model", str(tmp_path)),
                           "not a requant model folder")


def test_cli_data_file_with_wrong_hash(project, tiny_model_folder):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["test_sha256"] = "0" * 64
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    done, errors = requant("run", "--params", str(project / "params.yaml"), "--model", str(tiny_model_folder))
    assert_one_clear_error(done, errors, "sha256", "expected 000000000000")
    assert "is not set yet" in requant("status", "--params", str(project / "params.yaml"))[0].stdout


def test_cli_unknown_registered_model(project):
    assert_one_clear_error(*requant("run", "--params", str(project / "params.yaml")), "requant train")


def test_cli_lists_recipes():
    done, _ = requant("recipes")
    assert done.returncode == 0
    assert "int8-static (int8)" in done.stdout and "calibration_method" in done.stdout
