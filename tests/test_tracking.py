"""The MLflow adapter against a real sqlite tracking store and file artifact store."""

import threading
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tasks import track
from tasks.config.settings import RegistrySettings
from tasks.core.errors import ModelSourceError, RequantError
from tasks.core.hashing import folder_digest
from tasks.track import Tracker


@pytest.fixture
def tracker(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Tracker(RegistrySettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                    artifact_location=str(tmp_path / "artifacts"), serving_model_name="serving"))


def tiny_onnx(path, classes=3):
    """logits = mean(input_ids) * w: enough graph to log, register and load."""
    w = numpy_helper.from_array(np.arange(classes, dtype=np.float32).reshape(1, classes), "w")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["f", "axes"], ["m"], keepdims=1),
         helper.make_node("MatMul", ["m", "w"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", classes])],
        [w, axes],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def logged_candidate(tracker, tmp_path, name="int8"):
    parent = tracker.client.create_run(tracker.experiment_id()).info.run_id
    run_id = tracker.candidate_run(parent, name, {})
    return tracker.log_onnx_model(run_id, tiny_onnx(tmp_path / f"{name}.onnx"), classes=3)


def tags(key, accuracy="0.92", cost="195.00"):
    return {track.TAG_KEY: key, track.TAG_ACCURACY: accuracy, track.TAG_MONTHLY_COST: cost,
            track.TAG_RECIPE: "int8-dynamic"}


def test_register_source_then_fetch_it_by_alias_and_version(tracker, tiny_model_folder, tmp_path):
    version = tracker.register_source(tiny_model_folder, "src", "champion", "train", {"C": 1}, {"test_accuracy": 0.9})
    by_alias = tracker.fetch_source("models:/src@champion", tmp_path / "dl")
    by_version = tracker.fetch_source(f"models:/src/{version}", tmp_path / "dl")
    assert by_alias.version == version and by_alias.folder == by_version.folder
    assert by_alias.digest == folder_digest(tiny_model_folder)


def test_fetch_source_unknown_model_says_how_to_fix(tracker, tmp_path):
    with pytest.raises(ModelSourceError, match="requant train"):
        tracker.fetch_source("models:/nope@champion", tmp_path)


def test_fetch_source_unknown_alias_or_version_lists_what_the_registry_has(tracker, tiny_model_folder, tmp_path):
    tracker.register_source(tiny_model_folder, "src", "champion", "train", {"C": 1}, {"test_accuracy": 0.9})
    with pytest.raises(ModelSourceError, match=r"'src' has no alias 'nope' \(aliases: champion\)"):
        tracker.fetch_source("models:/src@nope", tmp_path)
    with pytest.raises(ModelSourceError, match=r"'src' has no version 7 \(versions: 1\)"):
        tracker.fetch_source("models:/src/7", tmp_path)


@pytest.mark.parametrize("uri, parsed", [
    ("models:/m/3", ("m", "3", None)),
    ("models:/m@champion", ("m", None, "champion")),
    ("/abs/model-folder", None),
    ("relative/folder", None),
])
def test_parse_model_uri_reads_registry_forms_and_local_paths(uri, parsed):
    assert track.parse_model_uri(uri) == parsed


@pytest.mark.parametrize("uri, message", [
    ("models:/m", "names no version"),
    ("models:/m/", "names no version"),
    ("models:/m/latest", "not a registry URI"),
    ("models:/@alias", "not a registry URI"),
    ("runs:/abc/model", "runs: scheme"),
    ("s3://bucket/model", "s3: scheme"),
])
def test_parse_model_uri_refuses_other_forms_in_one_line(uri, message):
    with pytest.raises(ModelSourceError, match=message):
        track.parse_model_uri(uri)


def test_tracker_on_a_closed_port_fails_in_one_line_within_bounded_retries(monkeypatch):
    from flows import runtime
    from tests.servers import free_port

    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(key, runtime.DEFAULTS[key])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(RequantError, match=r"cannot be used \(Connection refused\).*registry.tracking_uri"):
        Tracker(RegistrySettings(tracking_uri=uri))
    assert time.monotonic() - start < 30  # MLflow's own defaults: ~4 minutes


def test_fetch_source_rejects_a_folder_that_is_not_a_model(tracker, tmp_path):
    with pytest.raises(ModelSourceError, match="not a requant model folder"):
        tracker.fetch_source(str(tmp_path), tmp_path / "dl")


def test_promote_moves_the_alias_and_tags_the_version(tracker, tmp_path):
    uri = logged_candidate(tracker, tmp_path)
    version = tracker.promote(uri, tags("k1"), tmp_path / "locks")
    current = tracker.production()
    assert str(current.version) == version
    assert current.tags[track.TAG_KEY] == "k1" and float(current.tags[track.TAG_ACCURACY]) == pytest.approx(0.92)


def test_promote_same_decision_key_twice_registers_one_version(tracker, tmp_path):
    uri = logged_candidate(tracker, tmp_path)
    first = tracker.promote(uri, tags("k1"), tmp_path / "locks")
    second = tracker.promote(logged_candidate(tracker, tmp_path, "again"), tags("k1"), tmp_path / "locks")
    assert first == second
    assert len(tracker.client.search_model_versions("name = 'serving'")) == 1


def test_concurrent_promotions_are_serialised_and_alias_matches_a_registered_version(tracker, tmp_path):
    uris = [logged_candidate(tracker, tmp_path, f"c{i}") for i in range(3)]
    results, errors = [], []

    def promote(i):
        try:
            results.append(tracker.promote(uris[i], tags(f"key{i}"), tmp_path / "locks"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results, key=int) == ["1", "2", "3"]
    assert str(tracker.production().version) in results


def test_production_is_none_before_any_promotion(tracker):
    assert tracker.production() is None


def dead_process_identity():
    """The identity of a process that has ended (a short-lived child)."""
    import socket
    import subprocess
    import sys

    import psutil

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    started = psutil.Process(child.pid).create_time()
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:{started:.0f}"


def killed_parent(tracker, extra_tags):
    """A parent run left RUNNING by a process that died, with one RUNNING candidate run."""
    run_id = tracker.client.create_run(tracker.experiment_id(),
                                       tags={track.TAG_PROCESS: dead_process_identity(), **extra_tags}).info.run_id
    child = tracker.candidate_run(run_id, "int8", {})
    return run_id, child


def test_reconcile_completes_a_promotion_whose_alias_had_moved(tracker, tmp_path):
    version = tracker.promote(logged_candidate(tracker, tmp_path), tags("k1"), tmp_path / "locks")
    run_id, child = killed_parent(tracker, {track.TAG_KEY: "k1", track.TAG_PROMOTED_VERSION: version,
                                            track.TAG_PROMOTION: "pending"})
    closed = {c["run_id"]: c for c in tracker.reconcile_stale_runs()}
    assert closed[run_id]["status"] == "FINISHED"
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[track.TAG_PROMOTION] == "done"
    assert tracker.previous_decision("k1")["run_id"] == run_id  # the promotion now counts as decided
    assert tracker.client.get_run(child).info.status == "FAILED"


def test_reconcile_fails_a_decision_whose_alias_never_moved_so_it_is_redone(tracker, tmp_path):
    version = tracker.register_winner(logged_candidate(tracker, tmp_path), tags("k2"), tmp_path / "locks")
    run_id, _ = killed_parent(tracker, {track.TAG_KEY: "k2", track.TAG_PROMOTED_VERSION: version,
                                        track.TAG_PROMOTION: "pending"})
    tracker.reconcile_stale_runs()
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED" and "before the alias moved" in run.data.tags[track.TAG_FAILURE]
    assert tracker.previous_decision("k2") is None and tracker.production() is None
    # The registered version is kept, and a redo for the same key reuses it.
    assert tracker.register_winner(logged_candidate(tracker, tmp_path, "again"), tags("k2"), tmp_path / "locks") == version


def test_reconcile_leaves_runs_of_live_processes_alone(tracker):
    live = tracker.client.create_run(tracker.experiment_id(),
                                     tags={track.TAG_PROCESS: track.process_identity()}).info.run_id
    dead, _ = killed_parent(tracker, {})
    closed = {c["run_id"] for c in tracker.reconcile_stale_runs()}
    assert dead in closed and live not in closed
    assert tracker.client.get_run(live).info.status == "RUNNING"
    assert "died before the run finished" in tracker.client.get_run(dead).data.tags[track.TAG_FAILURE]


def test_fetch_production_downloads_the_graph_to_measure(tracker, tmp_path):
    assert tracker.fetch_production(tmp_path / "prod") is None
    version = tracker.promote(logged_candidate(tracker, tmp_path), tags("k1"), tmp_path / "locks")
    production = tracker.fetch_production(tmp_path / "prod")
    assert production.version == version and production.model_path.suffix == ".onnx"
    assert onnx.load(str(production.model_path)).graph.output[0].name == "logits"
