"""The nightly flow with a challenger stage and after a rollback: the real flow on the tiny model.

One story, in order: the flow promotes its winner to @challenger (production untouched);
`requant rollout` makes it production; an on-call engineer rolls it back; the flow, forced to
decide again on the same model, data and params, finds the same winner and does not promote it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from flows.cli import main
from tasks import track
from tasks.config.loading import load_settings
from tasks.track import Tracker
from tests.conftest import tiny_project

pytestmark = pytest.mark.e2e


def unmeasurable_graph(path):
    """A graph whose only input is named `tokens`: the flow cannot feed it, so as production it fails its measurement."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["tokens"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["f", "w"], ["logits"])], "old",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["b", 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 4])],
        [numpy_helper.from_array(np.ones((1, 4), np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_challenger_rollout_then_rollback_and_no_repromotion(tmp_path, tiny_model_folder, prefect_server, monkeypatch,
                                                              capsys):
    from flows.requantize import requantize

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # One candidate, so the winner of both runs is the same configuration.
    project = tiny_project(tmp_path, tiny_model_folder, registry={"rollout": "challenger"},
                           quantize={"candidates": [{"name": "int8", "recipe": "int8-dynamic",
                                                     "config": {"per_channel": True}}]})
    params = str(project / "params.yaml")
    tracker = Tracker(load_settings(params).registry)

    first = requantize(params_path=params, model_uri=str(tiny_model_folder))
    assert first.outcome == "promoted" and first.decision["promoted_alias"] == "challenger"
    assert tracker.production() is None and str(tracker.challenger().version) == first.promoted_version

    assert main(["rollout", "--params", params]) == 0  # no production yet: the challenger becomes the first
    assert str(tracker.production().version) == first.promoted_version and tracker.challenger() is None

    # An older version to go back to (one the flow cannot measure, so the rolled-back winner is the only candidate).
    run_id = tracker.client.create_run(tracker.experiment_id(), run_name="older").info.run_id
    older = tracker.register_winner(tracker.log_onnx_model(run_id, unmeasurable_graph(tmp_path / "old.onnx"), 4),
                                    {track.TAG_KEY: "older"}, tmp_path / "locks")
    monkeypatch.setenv("REQUANT_USER", "oncall-ana")
    assert main(["rollback", "--params", params, "--to", older, "--reason", "support tickets doubled"]) == 0
    assert str(tracker.production().version) == older

    settings = yaml.safe_load((project / "params.yaml").read_text())
    settings["registry"]["rollout"] = "direct"  # not part of the decision key
    (project / "params.yaml").write_text(yaml.safe_dump(settings))
    capsys.readouterr()
    again = requantize(params_path=params, model_uri=str(tiny_model_folder), force=True)
    assert again.decision_key == first.decision_key and again.winner == first.winner
    assert again.outcome == "kept-production" and again.promoted_version is None
    assert f"repeats version {first.promoted_version}, rolled back on" in again.decision["summary"]
    assert "oncall-ana" in again.decision["summary"] and "support tickets doubled" in again.decision["summary"]
    assert str(tracker.production().version) == older and tracker.challenger() is None
