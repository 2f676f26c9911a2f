"""FP32 reference candidate: the exported graph, optionally with ONNX Runtime's transformer fusions."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.recipes.base import QuantizeInputs, Recipe, RecipeConfig


class GraphChoice(RecipeConfig):
    """Which FP32 graph a recipe starts from."""

    graph: Literal["optimized", "plain"] = Field(
        "optimized", description="'optimized': fused Attention/LayerNorm/GELU graph; 'plain': the exported graph."
    )


def source_graph(inputs: QuantizeInputs, config: GraphChoice) -> Path:
    """The FP32 graph a recipe's config asks for."""
    return inputs.optimized_model if config.graph == "optimized" else inputs.fp32_model


class Fp32(Recipe):
    """FP32 with ONNX Runtime graph optimisation: the speed reference (PyTorch eager is the quality reference)."""

    id = "fp32"
    precision = "fp32"
    Config = GraphChoice
    lowers_precision = False

    def run(self, inputs: QuantizeInputs, config: GraphChoice, out_dir: Path) -> Path:
        out = out_dir / "model.onnx"
        shutil.copyfile(source_graph(inputs, config), out)
        return out
