"""ONNX graph helpers: transformer fusion, and the proof that a quantize step did something."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.core.errors import RecipeError

# Ops that only appear once a precision was lowered (INT8 QOperator/QDQ, INT4 weight-only).
QUANTIZED_OPS = frozenset({
    "DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "QLinearMatMul",
    "QGemm", "QuantizeLinear", "DequantizeLinear", "MatMulNBits", "GatherBlockQuantized", "QEmbedLayerNormalization",
})


def encoder_shape(encoder_dir: Path) -> tuple[int, int]:
    """(num_attention_heads, hidden_size) of a Hugging Face encoder, for the fusion optimizer."""
    config = json.loads((Path(encoder_dir) / "config.json").read_text())
    return int(config["num_attention_heads"]), int(config["hidden_size"])


def optimize_graph(fp32_model: Path, out_path: Path, num_heads: int, hidden_size: int, model_type: str = "bert") -> Path:
    """Fuse attention, layer norms and GELU with ONNX Runtime's transformer optimizer (still FP32)."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(fp32_model), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(out_path))
    return out_path


def lowered_precision_count(model_path: Path) -> int:
    """Quantized nodes plus FP16 initializers: zero means the recipe silently did nothing."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    nodes = sum(1 for node in model.graph.node if node.op_type in QUANTIZED_OPS)
    fp16 = sum(1 for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT16)
    return nodes + fp16


def check_external_data(model_path: Path) -> None:
    """Refuse a model whose external data points outside its folder (CVE-2022-25882, CVE-2024-27318).

    Raises:
        RecipeError: an external-data location escapes the model's folder.
    """
    import onnx

    folder = Path(model_path).resolve().parent
    model = onnx.load(str(model_path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and not (folder / entry.value).resolve().is_relative_to(folder):
                raise RecipeError(f"{model_path}: external data '{entry.value}' escapes the model folder; refusing to load it")


@dataclass(frozen=True)
class Proof:
    """Evidence that a candidate is real: it ran, its outputs are finite, and it is smaller."""

    lowered_nodes: int
    size_ratio: float


def prove_candidate(model_path: Path, reference_size_mb: float, feeds: list[dict[str, np.ndarray]],
                    must_lower_precision: bool, threads: int = 1) -> Proof:
    """Open an inference session, run every feed, and check what a quantize step must deliver.

    `feeds` should hold a real batch and a stress batch (longest sequence), since FP16 overflow
    shows up on large activations first.

    Raises:
        RecipeError: non-finite outputs, nothing quantized, or not smaller than FP32.
    """

    check_external_data(model_path)
    session = onnx_session(model_path, threads)
    for feed in feeds:
        logits = session.run(["logits"], feed)[0]
        if not np.isfinite(logits).all():
            raise RecipeError(f"{model_path.name}: outputs are NaN/inf on a {feed['input_ids'].shape} batch; candidate ineligible")
    lowered = lowered_precision_count(model_path)
    ratio = file_size_mb(model_path) / reference_size_mb
    if must_lower_precision and lowered == 0:
        raise RecipeError(f"{model_path.name}: no node was quantized (silent no-op); check the recipe's op types")
    if must_lower_precision and ratio >= 1.0:
        raise RecipeError(f"{model_path.name}: size ratio {ratio:.2f} vs FP32 is not < 1; nothing was saved")
    return Proof(lowered_nodes=lowered, size_ratio=ratio)


def onnx_session(model_path: Path, threads: int):
    """Open a CPU InferenceSession with fixed thread counts (benchmarks depend on it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def file_size_mb(model_path: Path) -> float:
    """Size of the model file plus any external-data files beside it, in MB (1e6 bytes)."""
    model_path = Path(model_path)
    total = model_path.stat().st_size
    total += sum(p.stat().st_size for p in model_path.parent.glob(model_path.name + ".data"))
    return total / 1e6
