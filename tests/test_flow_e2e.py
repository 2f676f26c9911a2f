"""The real flow, end to end: a Banking77 slice, the real MiniLM encoder, DVC in a git repo, MLflow
on sqlite, Prefect's temporary server. Asserts what a user checks in the MLflow UI afterwards."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks import track
from tasks.core.errors import DataError
from tests.conftest import banking77_slice, make_project

pytestmark = pytest.mark.e2e

FAST_EVALUATE = {"latency_runs": 20, "warmup_runs": 3, "throughput_batches": 2,
                 "timing_rounds": 3, "throughput_batch_size": 16}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    train_csv, test_csv = banking77_slice(tmp / "data", intents=8, train_per_intent=40, test_per_intent=25)
    root = make_project(tmp / "project", {
        "data": {"train_csv": str(train_csv), "test_csv": str(test_csv), "train_sha256": None, "test_sha256": None,
                 "calibration_size": 64, "min_calibration_rows": 16, "min_eval_rows": 50},
        "evaluate": FAST_EVALUATE,
        "registry": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "artifact_location": str(tmp / "artifacts")},
    })
    return root, MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")


@pytest.fixture(scope="module")
def first_run(project, prefect_server):
    from flows.requantize import requantize
    from flows.train import train_and_register

    root, _ = project
    trained = train_and_register(params_path=str(root / "params.yaml"))
    assert trained.version == "1" and trained.test_accuracy > 0.8
    return requantize(params_path=str(root / "params.yaml"))


def test_flow_logs_every_candidate_as_a_nested_run_with_the_same_metrics(project, first_run):
    _, client = project
    parent = client.get_run(first_run.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    from tasks.config.loading import load_settings
    from tasks.config.search_space import expand_all

    names = {r.data.tags[track.TAG_CANDIDATE] for r in children}  # run names are short; the full spec is a tag
    grid = {c.name for c in expand_all(load_settings(project[0] / "params.yaml").quantize.candidates)}
    assert len(grid) == 9 and "int8-dynamic[per_channel=true,graph=plain]" in grid  # the declared grid, expanded
    assert grid <= names and all(n.startswith("search-keep-fp32-k") for n in names - grid)
    # Fully measured: passing (a clear failure stops after a sample of the rows; a candidate deferred by the
    # speed screen is never scored or timed; one that fails the bar on its scores is not timed).
    measured = [r for r in children if r.info.status == "FINISHED" and r.data.tags["requant.verdict"] in {"winner", "pass"}]
    for failed in (r for r in children if r.data.tags["requant.verdict"] == "fail" and "accuracy" in r.data.metrics):
        assert "monthly_cost_usd" not in failed.data.metrics and "below FP32" in failed.data.tags["requant.reason"]
    # Same names side by side in the UI (only the winner adds its confirmation on held-out rows).
    assert len({frozenset(k for k in r.data.metrics if not k.startswith("confirmation_")) for r in measured}) == 1
    assert {"accuracy", "macro_f1", "hard_slice_accuracy", "hard_slice_relative_loss", "hard_slice_relative_loss_high",
            "latency_p95_ms", "throughput_per_s", "size_mb", "peak_memory_mb", "monthly_cost_usd", "passed_bar",
            "is_winner"} <= set(measured[0].data.metrics)
    verdicts = {r.data.tags[track.TAG_CANDIDATE]: r.data.tags["requant.verdict"] for r in children}
    assert verdicts[first_run.winner] == "winner" and set(verdicts.values()) <= {"winner", "pass", "fail", "screened out", "deferred"}
    # Memory is each model's own: the FP32 graph (~90 MB) needs more than dynamic INT8 (~23 MB).
    memory = {r.data.tags[track.TAG_CANDIDATE]: r.data.metrics["peak_memory_mb"] for r in measured}
    if "fp32" in memory:
        assert memory["fp32"] > memory["int8-dynamic[per_channel=true,graph=plain]"] + 20
    else:  # the speed screen found FP32 clearly slower than a passing INT8 rival: never timed, no memory probe
        assert "fp32" in first_run.decision["screening"]["speed_screened_out"]
    assert all(r.inputs.dataset_inputs and r.inputs.dataset_inputs[0].dataset.name == "evaluation" for r in children)
    assert parent.data.tags[track.TAG_DATA_VERSION] == children[0].data.tags[track.TAG_DATA_VERSION]


def test_decision_record_agrees_with_the_logged_metrics(project, first_run):
    _, client = project
    path = client.download_artifacts(first_run.parent_run_id, track.DECISION_FILE)
    record = json.loads(Path(path).read_text())
    children = {r.data.tags[track.TAG_CANDIDATE]: r for r in client.search_runs(
        [client.get_run(first_run.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{first_run.parent_run_id}'")}
    winner = record["winner"]
    assert winner == first_run.winner and record["verdicts"][winner]["passed_bar"]
    for name, numbers in record["candidates"].items():
        if numbers["error"] is None and "accuracy" in numbers:  # not screened out or deferred
            assert children[name].data.metrics["accuracy"] == pytest.approx(numbers["accuracy"])
    passing = [n for n, v in record["verdicts"].items() if v["passed_bar"]]
    cheaper = [n for n in passing if record["candidates"][n]["monthly_cost_usd"] < record["candidates"][winner]["monthly_cost_usd"]]
    # A cheaper passing candidate may only lose when its throughput is within noise of the winner's.
    for name in cheaper:
        assert record["verdicts"][name]["on_speed_frontier"]
        assert "within measured noise" in record["verdicts"][name]["reason"]
    # The winner was confirmed on rows that took no part in choosing it; both numbers are on record.
    confirmation = record["confirmation"]
    assert confirmation["candidate"] == winner and confirmation["passed_bar"]
    assert confirmation["rows"] == record["rows"]["confirmation"] > 0
    assert record["rows"]["selection"] + record["rows"]["confirmation"] == 8 * 25
    assert len(record["hard_slice_intents"]) == 5


def test_production_alias_points_at_the_winner_with_its_lineage(project, first_run):
    _, client = project
    assert first_run.outcome == "promoted"
    version = client.get_model_version_by_alias("minilm-banking77-serving", "production")
    assert str(version.version) == first_run.promoted_version
    assert version.tags[track.TAG_CANDIDATE] == first_run.winner
    assert version.tags[track.TAG_SOURCE_URI] == "models:/minilm-banking77@champion"
    assert version.tags[track.TAG_SOURCE_VERSION] == "1"
    assert version.tags[track.TAG_DATA_VERSION] == client.get_run(first_run.parent_run_id).data.tags[track.TAG_DATA_VERSION]


def test_the_decision_is_recorded_before_the_alias_moves(project, first_run):
    _, client = project
    parent = client.get_run(first_run.parent_run_id)
    assert parent.data.tags[track.TAG_PROMOTED_VERSION] == first_run.promoted_version
    assert parent.data.tags[track.TAG_PROMOTION] == "done"
    version = client.get_model_version("minilm-banking77-serving", first_run.promoted_version)
    assert version.tags[track.TAG_PARENT_RUN] == first_run.parent_run_id


def test_running_again_with_the_same_inputs_changes_nothing(project, first_run):
    from flows.requantize import requantize

    root, client = project
    before = client.search_model_versions("name = 'minilm-banking77-serving'")
    again = requantize(params_path=str(root / "params.yaml"))
    assert again.outcome == "already-decided" and again.parent_run_id == first_run.parent_run_id
    assert len(client.search_model_versions("name = 'minilm-banking77-serving'")) == len(before)
    assert str(client.get_model_version_by_alias("minilm-banking77-serving", "production").version) == first_run.promoted_version


def test_data_that_fails_validation_stops_the_run_and_leaves_production(project, first_run):
    from flows.requantize import requantize

    root, client = project
    test_csv = Path(root.parent / "data" / "test.csv")
    original = test_csv.read_text()
    try:
        # An intent the model was never trained on appears in the evaluation set.
        test_csv.write_text(original + "how do I close my account?,close_account_unknown_intent\n")
        with pytest.raises(DataError, match="expect_column_values_to_be_in_set"):
            requantize(params_path=str(root / "params.yaml"))
    finally:
        test_csv.write_text(original)
    failed = client.search_runs([client.get_run(first_run.parent_run_id).info.experiment_id],
                                filter_string="attributes.status = 'FAILED'")
    assert any("data validation failed" in r.data.tags.get(track.TAG_FAILURE, "") for r in failed)
    assert str(client.get_model_version_by_alias("minilm-banking77-serving", "production").version) == first_run.promoted_version


# Last: it makes a newer decision for the same key than first_run's.
def test_forced_rerun_measures_production_side_by_side_and_keeps_it_unless_beaten_beyond_noise(project, first_run):
    from flows.requantize import requantize

    root, client = project
    before = client.search_model_versions("name = 'minilm-banking77-serving'")
    again = requantize(params_path=str(root / "params.yaml"), force=True)
    production = f"production-v{first_run.promoted_version}"
    assert production in again.decision["candidates"]
    assert again.decision["candidates"][production]["is_production"]
    assert again.decision["candidates"][production]["throughput_per_s"] > 0  # measured in this run, not read from tags
    after = client.search_model_versions("name = 'minilm-banking77-serving'")
    # The INT8 variants of this slice are near-ties: on some hosts a rerun finds production's graph slower
    # beyond the noise than another variant (a new session of a graph can run ~10% slower for its life).
    # Then it is replaced, for that measured reason; otherwise it is kept and nothing new is registered.
    if again.outcome == "promoted":
        assert f"production {production} is replaced: slower beyond the noise" in again.decision["summary"] or \
            "more accurate beyond noise" in again.decision["summary"], again.decision["summary"]
        assert again.promoted_version != first_run.promoted_version and len(after) == len(before) + 1
    else:
        assert again.outcome == "kept-production", again.decision["summary"]
        assert len(after) == len(before)
