"""Quantization simulated in PyTorch: what a recipe will do to a Linear layer, with straight-through gradients.

Used by quantization-aware fine-tuning (tasks/train/qat.py). Each recipe's ONNX Runtime quantizer is
mirrored as closely as a Linear layer allows:

    int8-dynamic   weights: symmetric INT8 (per tensor or per output channel, 7-bit with reduce_range,
                   asymmetric UINT8 for weight_type QUInt8); activations: UINT8, range of each batch
    int8-static    weights as above; activations: UINT8 (or symmetric INT8), range tracked over
                   training (ONNX Runtime calibrates the exported model's ranges afterwards)
    int4-weight-only  weights: 4-bit blocks of `block_size` along the input dimension, ONNX Runtime's
                   formula (signed abs-max / -8, clip to [-8, 7]); activations stay FP32

What is not simulated, and so is left to the recipe alone: the activation-by-activation MatMuls of
attention (static INT8 on the plain graph quantizes them too) and the INT4 embedding table.
After training, `strip_fake_quant` writes each weight back *on its grid*, so the recipe's own
min-max scale finds the grid the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tasks.core.errors import RequantError


class QatUnsupported(RequantError):
    """The target recipe has no quantization-aware counterpart here."""


@dataclass(frozen=True)
class QuantScheme:
    """A recipe's quantization of Linear layers, in the terms the simulation needs."""

    bits: int = 8
    per_channel: bool = False
    symmetric: bool = True
    block_size: int | None = None  # INT4 blocks along the input dimension
    activations: Literal["dynamic", "static"] | None = None
    activation_symmetric: bool = False  # QInt8 activations (static) are symmetric; QUInt8 are not
    reduce_range: bool = False

    def describe(self) -> str:
        """One line for the record."""
        weights = (f"INT{self.bits} weights in blocks of {self.block_size}" if self.block_size else
                   f"INT{self.bits - self.reduce_range} {'per-channel' if self.per_channel else 'per-tensor'} "
                   f"{'symmetric' if self.symmetric else 'asymmetric'} weights")
        acts = {None: "FP32 activations", "dynamic": "8-bit activations (range per batch)",
                "static": "8-bit activations (range tracked in training)"}[self.activations]
        return f"{weights}, {acts}, straight-through gradients"


def scheme_for(recipe: str, config: dict) -> QuantScheme:
    """The simulation of one recipe config.

    Raises:
        QatUnsupported: the recipe keeps full precision (fp32, fp16) or has no Linear-level counterpart (mixed).
    """
    if recipe == "int8-dynamic":
        return QuantScheme(bits=8, per_channel=bool(config.get("per_channel")), symmetric=config.get("weight_type", "QInt8") == "QInt8",
                           activations="dynamic", reduce_range=bool(config.get("reduce_range")))
    if recipe == "int8-static":
        if not {"MatMul", "Gemm"} & set(config.get("op_types") or ["MatMul", "Gemm"]):
            raise QatUnsupported("int8-static quantizes no MatMul or Gemm in this config: nothing to simulate")
        return QuantScheme(bits=8, per_channel=bool(config.get("per_channel", True)),
                           symmetric=config.get("weight_type", "QInt8") == "QInt8", activations="static",
                           activation_symmetric=config.get("activation_type", "QUInt8") == "QInt8")
    if recipe == "int4-weight-only":
        return QuantScheme(bits=4, block_size=int(config.get("block_size", 32)), symmetric=bool(config.get("is_symmetric", True)))
    raise QatUnsupported(f"recipe {recipe} has no quantization-aware counterpart (supported: int8-dynamic, int8-static, "
                         "int4-weight-only)")


def _ste(x, quantized):
    """Forward the quantized value, pass the gradient straight through to x."""
    return x + (quantized - x).detach()


def _affine(x, lo, hi, levels: int, symmetric: bool):
    """Quantize-dequantize x to `levels` steps over [lo, hi] (broadcast), as ONNX Runtime's min-max does."""
    import torch

    if symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        half = (levels - 1) // 2  # 127 for INT8 (ONNX Runtime's symmetric range is [-127, 127])
        scale = torch.where(absmax > 0, absmax / half, torch.ones_like(absmax))
        return torch.clamp(torch.round(x / scale), -half, half) * scale
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = torch.where(hi > lo, (hi - lo) / (levels - 1), torch.ones_like(hi))
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, levels - 1) - zero) * scale


def quantize_weight(weight, scheme: QuantScheme):
    """The weight [out, in] on the recipe's grid (no gradient trick: callers add the straight-through step)."""
    import torch

    w = weight.detach()
    if scheme.block_size:
        out_features, in_features = w.shape
        pad = (-in_features) % scheme.block_size
        blocks = torch.nn.functional.pad(w, (0, pad)).reshape(out_features, -1, scheme.block_size)
        if scheme.symmetric:
            hi, lo = blocks.amax(-1, keepdim=True), blocks.amin(-1, keepdim=True)
            signed = torch.where(hi.abs() > lo.abs(), hi, lo)
            scale = torch.where(signed != 0, signed / -8.0, torch.ones_like(signed))
            q = torch.clamp(torch.round(blocks / scale), -8, 7) * scale
        else:
            q = _affine(blocks, blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True), 16, symmetric=False)
        return q.reshape(out_features, -1)[:, :in_features]
    levels = 2 ** (scheme.bits - scheme.reduce_range)
    if scheme.per_channel:  # one scale per output channel (axis 1 of the MatMul weight [in, out])
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        lo, hi = w.min(), w.max()
    return _affine(w, lo, hi, levels - (1 if scheme.symmetric else 0), scheme.symmetric)


def _make_linear_class():
    import torch

    class FakeQuantLinear(torch.nn.Module):
        """A Linear layer whose weights (and inputs, where the recipe quantizes them) are fake-quantized."""

        def __init__(self, linear: torch.nn.Linear, scheme: QuantScheme, momentum: float = 0.9) -> None:
            super().__init__()
            self.linear, self.scheme, self.momentum = linear, scheme, momentum
            self.register_buffer("act_min", torch.tensor(float("nan")))
            self.register_buffer("act_max", torch.tensor(float("nan")))

        def forward(self, x):
            if self.scheme.activations is not None:
                x = _ste(x, self._quantize_input(x))
            weight = _ste(self.linear.weight, quantize_weight(self.linear.weight, self.scheme))
            return torch.nn.functional.linear(x, weight, self.linear.bias)

        def _quantize_input(self, x):
            lo, hi = x.detach().min(), x.detach().max()
            if self.scheme.activations == "static":
                # A moving average of the batch ranges, as static calibration will fix one range for all.
                if self.training or torch.isnan(self.act_min):
                    if torch.isnan(self.act_min):
                        self.act_min.copy_(lo), self.act_max.copy_(hi)
                    else:
                        self.act_min.mul_(self.momentum).add_((1 - self.momentum) * lo)
                        self.act_max.mul_(self.momentum).add_((1 - self.momentum) * hi)
                lo, hi = self.act_min, self.act_max
            return _affine(x.detach(), lo, hi, 255 if self.scheme.activation_symmetric else 256,
                           self.scheme.activation_symmetric)

    return FakeQuantLinear


_LINEAR_CLASS = None


def fake_quant_linear_class():
    """The FakeQuantLinear module class (built on first use, so importing this module needs no torch)."""
    global _LINEAR_CLASS
    if _LINEAR_CLASS is None:
        _LINEAR_CLASS = _make_linear_class()
    return _LINEAR_CLASS


def insert_fake_quant(model, scheme: QuantScheme) -> int:
    """Wrap every nn.Linear of `model` in place; return how many were wrapped."""
    import torch

    cls = fake_quant_linear_class()
    wrapped = 0
    for parent in list(model.modules()):
        if isinstance(parent, cls):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, cls(child, scheme))
                wrapped += 1
    return wrapped


def strip_fake_quant(model) -> int:
    """Put the plain Linear layers back, each weight written on its grid; return how many."""
    import torch

    cls = fake_quant_linear_class()
    stripped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, cls):
                with torch.no_grad():
                    child.linear.weight.copy_(quantize_weight(child.linear.weight, child.scheme))
                setattr(parent, name, child.linear)
                stripped += 1
    return stripped
