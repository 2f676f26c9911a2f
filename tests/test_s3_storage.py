"""DVC and MLflow against a real S3-compatible server (moto), through boto3: no mocks.

Each test starts its own moto server (about 1 s) so buckets never leak between tests. DVC runs as
the CLI a user would type, in a fresh git repo; MLflow tracks to sqlite and stores artifacts in S3.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from tests.conftest import banking77_slice, make_project
from tests.servers import moto_s3_server

BUCKET = "requant-test"
REMOTE = "storage"
CALIBRATION = "data/prepared/calibration.csv"
EVALUATION = "data/prepared/evaluation.csv"


@pytest.fixture
def s3_endpoint(tmp_path, monkeypatch) -> str:
    """A fresh moto S3 server with dummy credentials in the environment; yields its endpoint URL."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # A developer's own AWS profile, session or endpoint must not leak into the test.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    # DVC would otherwise spawn an analytics daemon per command; there is no network to send to.
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    with moto_s3_server() as endpoint_url:
        yield endpoint_url


def s3_client(endpoint_url: str):
    """A boto3 S3 client for the test server (credentials and region come from the environment)."""
    return boto3.client("s3", endpoint_url=endpoint_url)


def stored_keys(endpoint_url: str, prefix: str) -> list[str]:
    """Every object key in the test bucket under `prefix`."""
    listing = s3_client(endpoint_url).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [entry["Key"] for entry in listing.get("Contents", [])]


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the DVC CLI in `repo` as a user would; the caller checks the outcome."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=False,
                          capture_output=True, text=True)


def dvc_ok(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """Run DVC and fail the test with DVC's own output if it does not succeed."""
    result = dvc(repo, *args)
    assert result.returncode == 0, f"dvc {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def pushed_project(root: Path, endpoint_url: str) -> Path:
    """A requant project whose prepare_data stage ran (on a Banking77 slice) and was pushed to S3."""
    from tasks.data.version import reproduce

    train_csv, test_csv = banking77_slice(root.parent / "slice", intents=4, train_per_intent=30, test_per_intent=10)
    project = make_project(root, {"data": {"train_csv": str(train_csv), "test_csv": str(test_csv), "train_sha256": None,
                                           "test_sha256": None, "calibration_size": 40, "min_calibration_rows": 8,
                                           "min_eval_rows": 8}})
    reproduce(project, project / "data" / "prepared")
    dvc_ok(project, "remote", "add", "--default", REMOTE, f"s3://{BUCKET}/dvc")
    dvc_ok(project, "remote", "modify", REMOTE, "endpointurl", endpoint_url)
    s3_client(endpoint_url).create_bucket(Bucket=BUCKET)
    dvc_ok(project, "push")
    return project


def forget_local_copies(project: Path) -> None:
    """Delete the prepared sets and DVC's local cache, so the next pull must read the remote."""
    for name in (CALIBRATION, EVALUATION):
        (project / name).unlink()
    shutil.rmtree(project / ".dvc" / "cache")


def calibration_key(project: Path, endpoint_url: str) -> str:
    """The bucket key DVC stored the calibration set under (named by its md5 in dvc.lock)."""
    from tasks.data.version import read_lock

    md5 = read_lock(project, project / "data" / "prepared").calibration_md5
    return next(k for k in stored_keys(endpoint_url, "dvc/") if k.endswith(f"{md5[:2]}/{md5[2:]}"))


def altered(data: bytes) -> bytes:
    """Same length, one byte changed: only a content hash can tell."""
    i = data.index(b"\n") + 1
    return data[:i] + (b"X" if data[i:i + 1] != b"X" else b"Y") + data[i + 1:]


def test_dvc_push_pull_round_trips_the_calibration_set_through_s3(tmp_path, s3_endpoint):
    project = pushed_project(tmp_path / "project", s3_endpoint)
    original = (project / CALIBRATION).read_bytes()
    assert len(stored_keys(s3_endpoint, "dvc/")) == 2, "dvc push should store the calibration and evaluation sets"

    forget_local_copies(project)
    dvc_ok(project, "pull")

    assert (project / CALIBRATION).read_bytes() == original


def test_dvc_pull_fails_clearly_when_a_stored_object_was_altered(tmp_path, s3_endpoint):
    project = pushed_project(tmp_path / "project", s3_endpoint)
    key = calibration_key(project, s3_endpoint)
    s3_client(s3_endpoint).put_object(Bucket=BUCKET, Key=key, Body=altered((project / CALIBRATION).read_bytes()))
    dvc_ok(project, "remote", "modify", REMOTE, "verify", "true")
    forget_local_copies(project)

    result = dvc(project, "pull")

    output = result.stdout + result.stderr
    assert result.returncode != 0, f"dvc pull accepted an altered object:\n{output}"
    # DVC 3.67.1 drops the object whose md5 mismatches, then fails the checkout of the target.
    assert "failed to pull data from the cloud" in output and CALIBRATION in output, output
    assert not (project / CALIBRATION).exists(), "the altered bytes were written to the workspace"


def test_dvc_pull_without_verify_accepts_an_altered_object(tmp_path, s3_endpoint):
    """Why `verify true` matters: DVC's default trusts the remote and checks out altered bytes."""
    project = pushed_project(tmp_path / "project", s3_endpoint)
    bad = altered((project / CALIBRATION).read_bytes())
    s3_client(s3_endpoint).put_object(Bucket=BUCKET, Key=calibration_key(project, s3_endpoint), Body=bad)
    forget_local_copies(project)

    dvc_ok(project, "pull")

    # If this starts failing, DVC verifies by default and the explicit setting became redundant.
    assert (project / CALIBRATION).read_bytes() == bad


def test_mlflow_artifacts_land_in_the_s3_bucket(tmp_path, s3_endpoint, monkeypatch):
    import mlflow.artifacts
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s3_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment("s3-artifacts", artifact_location=f"s3://{BUCKET}/mlflow")
    run_id = client.create_run(experiment_id).info.run_id
    decision = {"winner": "int8-dynamic", "accuracy": 0.91}

    client.log_param(run_id, "recipe", "int8-dynamic")
    client.log_dict(run_id, decision, "decision.json")
    client.set_terminated(run_id)

    keys = stored_keys(s3_endpoint, "mlflow/")
    assert any(key.endswith(f"{run_id}/artifacts/decision.json") for key in keys), keys
    downloaded = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="decision.json",
                                                     dst_path=str(tmp_path / "download"), tracking_uri=tracking_uri)
    assert json.loads(Path(downloaded).read_text()) == decision
    assert client.get_run(run_id).data.params == {"recipe": "int8-dynamic"}
