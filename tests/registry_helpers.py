"""Serving-model versions for tests: tiny ONNX graphs logged as requant's text-in pyfunc and registered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tasks import track
from tasks.serve.serving import ServingAssets, ServingLimits

LABELS = ["card_lost", "top_up", "refund", "exchange_rate"]


def constant_label_graph(path: Path, label_index: int, classes: int = len(LABELS)) -> Path:
    """logits = mean(input_ids) * w with w peaking at `label_index`: every text gets that label (token ids are > 0)."""
    w = np.full((1, classes), -1.0, dtype=np.float32)
    w[0, label_index] = 1.0
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["f", "axes"], ["m"], keepdims=1),
         helper.make_node("MatMul", ["m", "w"], ["logits"])],
        "constant-label",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", classes])],
        [numpy_helper.from_array(w, "w"), axes],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def register_serving_version(tracker: track.Tracker, work: Path, tokenizer_dir: Path, label_index: int, key: str,
                             throughput_per_s: float = 400.0, limits: ServingLimits | None = None) -> str:
    """Log a constant-label text classifier on a candidate run (with the throughput and cost the flow
    would have logged) and register it as a version of the serving model; return the version."""
    work.mkdir(parents=True, exist_ok=True)
    parent = tracker.client.create_run(tracker.experiment_id(), run_name=f"decision-{key}").info.run_id
    run_id = tracker.candidate_run(parent, key, {})
    tracker.log_metrics(run_id, {"throughput_per_s": throughput_per_s * 1.1, "throughput_low_per_s": throughput_per_s,
                                 "monthly_cost_usd": 222.0})
    graph = constant_label_graph(work / f"{key}.onnx", label_index)
    assets = ServingAssets(Path(tokenizer_dir), LABELS, 32, limits or ServingLimits())
    uri = tracker.log_serving_model(run_id, graph, assets, key)
    tracker.finish(run_id)
    return tracker.register_winner(uri, {track.TAG_KEY: key, track.TAG_CONFIG_HASH: f"hash-{key}"}, work / "locks")
