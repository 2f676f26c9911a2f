"""Every recipe on a tiny random BERT: it builds, runs, stays finite, and really lowers precision."""

import numpy as np
import onnx
import pandas as pd
import pytest

from tasks.candidates import build_candidate
from tasks.errors import RecipeError
from tasks.onnx_graph import (
    check_external_data,
    lowered_precision_count,
    prove_candidate,
)
from tasks.recipes.base import describe_recipes, parse_config
from tasks.reference import prepare_reference
from tasks.settings import CandidateSpec, EvaluateSettings, ModelSettings

TEXTS = ["I lost my card", "how do I top up", "I want a refund for this", "what is the exchange rate today",
         "my card is gone", "top up failed again", "refund still not here", "rate for euros please"]


@pytest.fixture(scope="module")
def reference(tiny_model_folder, tmp_path_factory):
    from tasks.model_io import read_model_card

    labels = read_model_card(tiny_model_folder).labels
    frame = pd.DataFrame({"text": TEXTS, "label": [labels[i % len(labels)] for i in range(len(TEXTS))]})
    evaluate = EvaluateSettings(latency_runs=10, latency_repeats=2, throughput_batches=1, throughput_batch_size=4)
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
    assert {"fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight-only", "mixed"} <= set(listed)
    assert "calibration_method" in listed["int8-static"]["config"]


def test_parse_config_refuses_a_typo_with_the_field_list():
    with pytest.raises(RecipeError, match="per_chanel.*fields: .*per_channel"):
        parse_config("int8-dynamic", {"per_chanel": True})
