"""Every recipe on a tiny random BERT: it builds, runs, stays finite, and really lowers precision."""

import hashlib

import numpy as np
import onnx
import pandas as pd
import pytest

from tasks.build.candidates import build_candidate
from tasks.build.reference import prepare_reference
from tasks.config.settings import CandidateSpec, EvaluateSettings, ModelSettings
from tasks.core.errors import RecipeError
from tasks.decide.decision import for_selection
from tasks.models.graph import (
    check_external_data,
    lowered_precision_count,
    prove_candidate,
)
from tasks.recipes.base import describe_recipes, parse_config

TEXTS = ["I lost my card", "how do I top up", "I want a refund for this", "what is the exchange rate today",
         "my card is gone", "top up failed again", "refund still not here", "rate for euros please"]


@pytest.fixture(scope="module")
def reference(tiny_model_folder, tmp_path_factory):
    from tasks.models.io import read_model_card

    labels = read_model_card(tiny_model_folder).labels
    frame = pd.DataFrame({"text": TEXTS, "label": [labels[i % len(labels)] for i in range(len(TEXTS))]})
    evaluate = EvaluateSettings(latency_runs=10, throughput_batches=1, throughput_batch_size=4)
    return prepare_reference(tiny_model_folder, frame, frame, tmp_path_factory.mktemp("work"), ModelSettings(),
                             evaluate, calibration_batch_size=4)


@pytest.mark.parametrize("recipe, config", [
    ("fp16", {}),
    ("int8-dynamic", {"per_channel": False}),
    ("int8-dynamic", {"per_channel": True}),
    # The tiny model is mostly embedding table, so static recipes quantize the Gather too.
    ("int8-static", {"calibration_method": "minmax", "op_types": ["MatMul", "Gemm", "Gather"]}),
    ("int8-static", {"calibration_method": "entropy", "op_types": ["MatMul", "Gather"]}),
    ("int8-static", {"calibration_method": "minmax", "graph": "optimized", "op_types": ["MatMul", "Gather"]}),
    ("int4-weight-only", {"block_size": 32, "quantize_embeddings": True}),
    ("int8-weight-only", {"block_size": 32, "quantize_embeddings": True}),
    ("mixed", {"keep_fp32": ["*/intermediate/dense/MatMul"]}),
])
def test_recipe_builds_a_smaller_model_with_quantized_nodes(reference, tmp_path, recipe, config):
    built = build_candidate(CandidateSpec(name=recipe, recipe=recipe, config=config), reference, "tiny", tmp_path)
    assert built.error is None, built.error
    assert built.lowered_nodes > 0
    assert built.size_ratio < 1.0


def test_int4_with_embeddings_is_smaller_than_without(reference, tmp_path):
    sizes = {}
    for flag in (True, False):
        spec = CandidateSpec(name="int4", recipe="int4-weight-only", config={"quantize_embeddings": flag})
        sizes[flag] = build_candidate(spec, reference, "tiny", tmp_path).size_ratio
    assert sizes[True] < sizes[False]


def test_mixed_keeps_the_named_nodes_in_fp32(reference, tmp_path):
    spec = CandidateSpec(name="m", recipe="mixed", config={"keep_fp32": ["*/intermediate/dense/MatMul"]})
    built = build_candidate(spec, reference, "tiny", tmp_path)
    nodes = onnx.load(str(built.model_path)).graph.node
    kept = [n for n in nodes if n.name.endswith("/intermediate/dense/MatMul")]
    assert kept and all(n.op_type == "MatMul" for n in kept)
    assert any(n.op_type == "MatMulInteger" for n in nodes)


def test_mixed_pattern_matching_nothing_is_a_clear_failure(reference, tmp_path):
    spec = CandidateSpec(name="m", recipe="mixed", config={"keep_fp32": ["*no-such-layer*"]})
    built = build_candidate(spec, reference, "tiny", tmp_path)
    assert "matches no node" in built.error


def test_build_candidate_reuses_a_proven_folder(reference, tmp_path):
    spec = CandidateSpec(name="d", recipe="int8-dynamic", config={})
    first = build_candidate(spec, reference, "tiny", tmp_path)
    again = build_candidate(spec, reference, "tiny", tmp_path)
    assert not first.reused and again.reused and again.model_path == first.model_path


def test_prove_candidate_rejects_a_silent_no_op(reference):
    # The FP32 graph claimed as a quantized candidate: nothing was lowered.
    with pytest.raises(RecipeError, match="no node was quantized"):
        prove_candidate(reference.inputs.optimized_model, 1e9, reference.proof_feeds, must_lower_precision=True)


def test_prove_candidate_rejects_non_finite_outputs(reference, tmp_path):
    model = onnx.load(str(reference.inputs.fp32_model))
    head = next(i for i in model.graph.initializer if i.name.endswith("head.bias") or "head" in i.name)
    values = onnx.numpy_helper.to_array(head).copy()
    values[...] = np.inf
    head.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), head.name))
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    with pytest.raises(RecipeError, match="NaN/inf"):
        prove_candidate(path, 1e9, reference.proof_feeds, must_lower_precision=False)


def test_check_external_data_refuses_paths_outside_the_model_folder(reference, tmp_path):
    model = onnx.load(str(reference.inputs.fp32_model))
    init = model.graph.initializer[0]
    init.data_location = onnx.TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    path = tmp_path / "evil.onnx"
    path.write_bytes(model.SerializeToString())  # onnx.save itself refuses such a model
    with pytest.raises(RecipeError, match="escapes the model folder"):
        check_external_data(path)


def test_lowered_precision_count_is_zero_for_fp32(reference):
    assert lowered_precision_count(reference.inputs.fp32_model) == 0


def test_every_recipe_lists_its_config_fields():
    listed = {r["id"]: r for r in describe_recipes()}
    assert {"fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight-only", "int8-weight-only", "mixed"} <= set(listed)
    assert "calibration_method" in listed["int8-static"]["config"]


def test_parse_config_refuses_a_typo_with_the_field_list():
    with pytest.raises(RecipeError, match="per_chanel.*fields: .*per_channel"):
        parse_config("int8-dynamic", {"per_chanel": True})


def test_build_candidate_rebuilds_a_truncated_cached_model(reference, tmp_path):
    spec = CandidateSpec(name="d", recipe="int8-dynamic", config={})
    first = build_candidate(spec, reference, "tiny", tmp_path)
    data = first.model_path.read_bytes()
    first.model_path.write_bytes(data[: len(data) // 3])
    again = build_candidate(spec, reference, "tiny", tmp_path)
    assert not again.reused and again.error is None
    assert "sha256" in again.rebuilt_because
    assert again.model_path.read_bytes() == data


def test_build_candidate_rebuilds_when_an_fp32_graph_is_swapped_into_an_int8_folder(reference, tmp_path):
    import shutil

    spec = CandidateSpec(name="d", recipe="int8-dynamic", config={})
    first = build_candidate(spec, reference, "tiny", tmp_path)
    shutil.copy(reference.inputs.fp32_model, first.model_path)
    again = build_candidate(spec, reference, "tiny", tmp_path)
    assert not again.reused and again.lowered_nodes > 0
    assert again.model_sha256 != hashlib.sha256(reference.inputs.fp32_model.read_bytes()).hexdigest()


def test_candidate_hash_follows_the_calibration_set_only_for_calibrated_recipes(reference):
    from dataclasses import replace

    from tasks.recipes.base import config_hash, parse_config

    other = replace(reference.inputs, calibration_feeds=reference.inputs.calibration_feeds[:1])
    assert other.calibration_digest() != reference.inputs.calibration_digest()
    for recipe, changes in (("int8-static", True), ("int8-dynamic", False)):
        config = parse_config(recipe, {})
        hashes = {config_hash(recipe, config, "src", inputs.calibration_digest()) for inputs in (reference.inputs, other)}
        assert (len(hashes) == 2) is changes


def test_time_candidates_interleaves_rounds_and_a_failing_session_fails_alone(reference, tmp_path):
    from tasks.config.settings import EvaluateSettings
    from tasks.measure.timing import time_interleaved

    class Broken:
        def run(self, *_):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : boom")

    from tasks.models.graph import onnx_session

    settings = EvaluateSettings(latency_runs=12, warmup_runs=1, throughput_batches=1, throughput_batch_size=4, timing_rounds=3)
    sessions = {"fp32": onnx_session(reference.inputs.fp32_model, 1), "broken": Broken()}
    samples = time_interleaved(sessions, reference.latency_feeds, reference.throughput_feeds, settings)
    assert len(samples["fp32"].throughput_per_s) == 3 and len(samples["fp32"].latency_ms) == 3
    assert samples["fp32"].error is None and "RUNTIME_EXCEPTION" in samples["broken"].error


def test_peak_memory_is_the_models_own_not_the_parents(reference):
    import numpy as np

    from tasks.measure.timing import peak_memory_mb

    ballast = np.ones(400 * 2**20 // 8)  # 400 MB in this process: a probe inheriting it would report more
    memory = peak_memory_mb(reference.inputs.fp32_model, reference.throughput_feeds[0], 1)
    assert 0 < memory < 200 and ballast.sum() > 0


def test_two_builds_of_the_same_config_at_once_share_one_folder(reference, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    specs = [CandidateSpec(name=f"twin{i}", recipe="int8-dynamic", config={"per_channel": True}) for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        built = list(pool.map(lambda spec: build_candidate(spec, reference, "tiny", tmp_path), specs))
    assert all(b.error is None for b in built)
    assert built[0].model_path == built[1].model_path and sorted(b.reused for b in built) == [False, True]


def test_an_onnxruntime_failure_is_the_candidates_error_not_the_runs(reference, tmp_path):
    from onnx import TensorProto, helper

    from tasks.build.candidates import BuiltCandidate
    from tasks.config.settings import QualityBar
    from tasks.evaluate.candidates import score_candidate

    # A valid graph without a "logits" output: ONNX Runtime raises its own exception type.
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["out"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
                               helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("out", TensorProto.INT64, ["b", "s"])])
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    measured = score_candidate(BuiltCandidate("odd", "fp32", "fp32", {}, "h", model_path=path), reference,
                               EvaluateSettings(), QualityBar())
    assert measured.error and measured.quality is None
    assert not for_selection(measured).accuracy  # selection sees a failed candidate


def test_memory_probe_failure_is_one_clear_error(reference, tmp_path):
    from tasks.core.errors import RequantError
    from tasks.measure.timing import peak_memory_mb

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(RequantError, match="memory probe failed on garbage.onnx"):
        peak_memory_mb(garbage, reference.throughput_feeds[0], 1)


def test_nan_logits_on_evaluation_rows_fail_the_candidate_closed(reference, tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from tasks.build.candidates import BuiltCandidate
    from tasks.config.settings import QualityBar
    from tasks.evaluate.candidates import score_candidate

    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["f", "axes"], ["m"], keepdims=1),
         helper.make_node("Neg", ["m"], ["n"]), helper.make_node("Log", ["n"], ["logits"])],  # log of a negative: NaN
        "nan", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
                helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 1])], [axes])
    path = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    measured = score_candidate(BuiltCandidate("nan", "fp32", "fp32", {}, "h", model_path=path), reference,
                               EvaluateSettings(), QualityBar())
    assert "logits are NaN/inf" in measured.error


def test_weight_only_excluded_nodes_stay_fp32_and_int8_is_between_int4_and_fp32(reference, tmp_path):
    import onnx

    config = {"block_size": 32, "quantize_embeddings": False}
    int4 = build_candidate(CandidateSpec(name="i4", recipe="int4-weight-only", config=config), reference, "tiny",
                           tmp_path / "i4")
    int8 = build_candidate(CandidateSpec(name="i8", recipe="int8-weight-only", config=config), reference, "tiny",
                           tmp_path / "i8")
    assert int4.size_ratio < int8.size_ratio < 1.0
    graph = onnx.load(str(int8.model_path)).graph
    bits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {8}
    first = next(n.name for n in onnx.load(str(reference.inputs.fp32_model)).graph.node if n.op_type == "MatMul")
    kept = build_candidate(CandidateSpec(name="i4k", recipe="int4-weight-only",
                                         config={**config, "nodes_to_exclude": [first]}), reference, "tiny", tmp_path / "k")
    assert first in {n.name for n in onnx.load(str(kept.model_path)).graph.node if n.op_type == "MatMul"}
