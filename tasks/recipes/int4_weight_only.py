"""INT4 weight-only: MatMul weights (and optionally the embedding table) in 4-bit blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.recipes.base import QuantizeInputs, Recipe
from tasks.recipes.fp32 import GraphChoice, source_graph

# Reduce ops whose `axes` became an input in opset 18; the Gather quantizer raises the opset to 21.
_AXES_TO_INPUT = {"ReduceL1", "ReduceL2", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                  "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"}


class Int4Config(GraphChoice):
    """Config of the int4-weight-only recipe.

    The embedding lookup (47 MB of the 90 MB FP32 file) is only reachable on the plain graph: the
    optimized graph fuses it into EmbedLayerNormalization, which the INT4 quantizer skips.
    """

    graph: Literal["optimized", "plain"] = Field("plain", description="Start graph; 'plain' lets the embedding be quantized.")
    block_size: int = Field(32, ge=16, description="Weights per quantization block (power of two).")
    is_symmetric: bool = Field(True, description="Symmetric blocks (no zero point).")
    accuracy_level: int = Field(4, ge=0, le=4, description="MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8.")
    quantize_embeddings: bool = Field(True, description="Also quantize the word-embedding Gather (GatherBlockQuantized).")
    nodes_to_exclude: list[str] = Field(
        default_factory=list, description="Exact node names left in FP32 (a decoder's rotary-embedding MatMul, its LM head).")

    def model_post_init(self, __context) -> None:
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")


class Int4WeightOnly(Recipe):
    """INT4 weight-only via ONNX Runtime MatMulNBits (and GatherBlockQuantized for embeddings)."""

    id = "int4-weight-only"
    precision = "int4"
    Config = Int4Config
    bits = 4  # MatMulNBits' weight width (int8-weight-only.py sets 8)

    def run(self, inputs: QuantizeInputs, config: Int4Config, out_dir: Path) -> Path:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        op_types = ("MatMul", "Gather") if config.quantize_embeddings else ("MatMul",)
        axes = (("MatMul", 0), ("Gather", 1)) if config.quantize_embeddings else (("MatMul", 0),)
        algo = DefaultWeightOnlyQuantConfig(
            block_size=config.block_size, is_symmetric=config.is_symmetric, accuracy_level=config.accuracy_level,
            op_types_to_quantize=op_types, quant_axes=axes, bits=self.bits,
        )
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source_graph(inputs, config))), algo_config=algo,
                                         nodes_to_exclude=config.nodes_to_exclude or None)
        quantizer.process()
        model = quantizer.model.model
        _reduce_axes_to_inputs(model)
        out = out_dir / "model.onnx"
        onnx.save(model, str(out))
        return out


def _reduce_axes_to_inputs(model) -> None:
    """Move Reduce* `axes` attributes to inputs, as opset >= 18 requires (else INVALID_GRAPH on load)."""
    import numpy as np
    from onnx import numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 18:
        return
    for node in model.graph.node:
        axes = [a for a in node.attribute if a.name == "axes"]
        if node.domain in ("", "ai.onnx") and node.op_type in _AXES_TO_INPUT and axes:
            name = f"{node.name or node.output[0]}_axes"
            model.graph.initializer.append(numpy_helper.from_array(np.array(axes[0].ints, dtype=np.int64), name))
            node.attribute.remove(axes[0])
            node.input.append(name)
