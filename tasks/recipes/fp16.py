"""FP16 weights and compute where ONNX Runtime has FP16 kernels; inputs and outputs stay as before."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tasks.recipes.base import QuantizeInputs, Recipe
from tasks.recipes.fp32 import GraphChoice, source_graph


class Fp16Config(GraphChoice):
    """Config of the fp16 recipe."""

    keep_fp32_ops: list[str] = Field(default_factory=list, description="Op types left in FP32 (e.g. Softmax) if FP16 overflows.")


class Fp16(Recipe):
    """FP16 conversion: halves the file; whether it is faster depends on the CPU's FP16 support."""

    id = "fp16"
    precision = "fp16"
    Config = Fp16Config

    def run(self, inputs: QuantizeInputs, config: Fp16Config, out_dir: Path) -> Path:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(source_graph(inputs, config)))
        # keep_io_types: callers keep feeding int64 ids and reading FP32 logits.
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=config.keep_fp32_ops or None)
        out = out_dir / "model.onnx"
        onnx.save(converted, str(out))
        return out
