"""INT8 weight-only: MatMul weights in 8-bit blocks (ONNX Runtime MatMulNBits with 8 bits), activations
left in FP32 (or computed in int8 with accuracy_level 4). The decoders' safe step down from FP32: no
activation is quantized, so outlier activations cost nothing, unlike dynamic INT8."""

from __future__ import annotations

from tasks.recipes.int4_weight_only import Int4Config, Int4WeightOnly


class Int8WeightOnly(Int4WeightOnly):
    """INT8 weight-only via MatMulNBits (bits=8); the same config as int4-weight-only."""

    id = "int8-weight-only"
    precision = "int8"
    Config = Int4Config
    bits = 8
