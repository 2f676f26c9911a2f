"""Static INT8 (QDQ): activation ranges calibrated ahead of time on the DVC calibration set."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.core.errors import RecipeError
from tasks.recipes.base import QuantizeInputs, Recipe
from tasks.recipes.fp32 import GraphChoice

_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


class Int8StaticConfig(GraphChoice):
    """Config of the int8-static recipe.

    Measured on the default model: quantizing every op type collapses accuracy to ~29%, while
    MatMul/Gemm with U8 activations keeps ~91-92%. Entropy and Percentile keep histograms of every
    calibrated tensor (~16 GB at 1,000 samples); MinMax needs ~1 GB.
    """

    graph: Literal["optimized", "plain"] = Field("plain", description="Start graph; 'plain' calibrates every MatMul.")
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="How activation ranges are chosen.")
    op_types: list[str] = Field(["MatMul", "Gemm"], min_length=1, description="Op types quantized statically.")
    per_channel: bool = Field(True, description="Per-channel weight scales.")
    activation_type: Literal["QUInt8", "QInt8"] = Field("QUInt8", description="Activation type (U8 keeps accuracy here).")
    weight_type: Literal["QInt8", "QUInt8"] = Field("QInt8", description="Weight type.")
    percentile: float = Field(99.999, gt=90, le=100, description="Percentile kept, for calibration_method: percentile.")


class Int8Static(Recipe):
    """Static QDQ INT8 with MinMax, Entropy or Percentile calibration."""

    id = "int8-static"
    precision = "int8"
    Config = Int8StaticConfig
    uses_calibration = True

    def run(self, inputs: QuantizeInputs, config: Int8StaticConfig, out_dir: Path) -> Path:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        if not inputs.calibration_feeds:
            raise RecipeError("int8-static needs calibration data: the calibration set is empty")
        feeds = inputs.calibration_feeds
        if config.calibration_method != "minmax":
            # Histogram calibrators stack every batch's activations into one array, so all
            # batches must share one sequence length.
            feeds = _pad_to_common_length(feeds)

        class Feeds(CalibrationDataReader):
            def __init__(self) -> None:
                self.rewind()

            def get_next(self):
                return next(self._it, None)

            def rewind(self) -> None:
                self._it = iter(feeds)

        # A private copy: the quantizer writes temporary files beside its input, and candidates
        # built in parallel from one source graph would race on them.
        src = out_dir / "input.onnx"
        if config.graph == "optimized":
            # The fused graph hides activation types from the quantizer; infer them first.
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            onnx.save(SymbolicShapeInference.infer_shapes(onnx.load(str(inputs.optimized_model)), auto_merge=True), str(src))
        else:
            shutil.copyfile(inputs.fp32_model, src)
        out = out_dir / "model.onnx"
        quantize_static(
            str(src), str(out), Feeds(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType[config.activation_type],
            weight_type=QuantType[config.weight_type],
            op_types_to_quantize=config.op_types,
            per_channel=config.per_channel,
            calibrate_method=CalibrationMethod[_METHODS[config.calibration_method]],
            # CalibMaxIntermediateOutputs is not used: in onnxruntime 1.32 it drops collected batches.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "CalibPercentile": config.percentile},
        )
        src.unlink()
        return out


def _pad_to_common_length(feeds: list[dict]) -> list[dict]:
    """Right-pad every batch (token id 0, attention mask 0) to the longest batch's length."""
    import numpy as np

    longest = max(f["input_ids"].shape[1] for f in feeds)
    return [{name: np.pad(array, ((0, 0), (0, longest - array.shape[1]))) for name, array in f.items()} for f in feeds]
