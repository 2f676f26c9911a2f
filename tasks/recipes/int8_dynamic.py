"""Dynamic INT8: weights quantized ahead of time, activations quantized per batch at run time."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.recipes.base import QuantizeInputs, Recipe
from tasks.recipes.fp32 import GraphChoice, source_graph


class Int8DynamicConfig(GraphChoice):
    """Config of the int8-dynamic recipe."""

    per_channel: bool = Field(False, description="One scale per output channel instead of per tensor.")
    weight_type: Literal["QInt8", "QUInt8"] = Field("QInt8", description="Signed or unsigned 8-bit weights.")
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs whose u8s8 kernels overflow (onnxruntime#6004).")
    op_types: list[str] | None = Field(None, description="Op types to quantize; null = ONNX Runtime's default set.")
    nodes_to_exclude: list[str] = Field(default_factory=list, description="Exact node names left in FP32.")
    nodes_to_quantize: list[str] | None = Field(None, description="Exact node names to quantize; null = every node of op_types.")


def quantize_dynamic_int8(src: Path, out: Path, config: Int8DynamicConfig) -> Path:
    """Run ONNX Runtime's dynamic quantizer with the given config."""
    import shutil

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer writes a shape-inferred copy beside its input; candidates built in parallel
    # from one source graph would race on that file, so each quantizes a private copy.
    private = out.parent / "input.onnx"
    shutil.copyfile(src, private)
    quantize_dynamic(
        str(private), str(out),
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        weight_type=QuantType[config.weight_type],
        op_types_to_quantize=config.op_types,
        nodes_to_exclude=config.nodes_to_exclude or None,
        nodes_to_quantize=config.nodes_to_quantize,
        # Shape inference cannot see through the fused com.microsoft ops of the optimized graph;
        # without a default type the quantizer stops on "Unable to find data type for weight_name".
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    private.unlink()
    return out


class Int8Dynamic(Recipe):
    """Dynamic INT8 (MatMulInteger/QAttention), per-tensor or per-channel."""

    id = "int8-dynamic"
    precision = "int8"
    Config = Int8DynamicConfig

    def run(self, inputs: QuantizeInputs, config: Int8DynamicConfig, out_dir: Path) -> Path:
        return quantize_dynamic_int8(source_graph(inputs, config), out_dir / "model.onnx", config)
