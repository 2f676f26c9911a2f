"""Mixed precision: dynamic INT8 everywhere except the nodes the config keeps in FP32."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from pydantic import Field

from tasks.core.errors import RecipeError
from tasks.recipes.base import QuantizeInputs, Recipe
from tasks.recipes.fp32 import source_graph
from tasks.recipes.int8_dynamic import Int8DynamicConfig, quantize_dynamic_int8


class MixedConfig(Int8DynamicConfig):
    """Config of the mixed recipe."""

    per_channel: bool = Field(True, description="One scale per output channel instead of per tensor.")
    keep_fp32: list[str] = Field(
        min_length=1,
        description="Glob patterns of node names kept in FP32, e.g. '*/intermediate/dense/MatMul' (the FFN up-projections).",
    )


def matching_nodes(model_path: Path, patterns: list[str]) -> list[str]:
    """Names of the graph's nodes that match any glob pattern."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [n.name for n in graph.node if any(fnmatch.fnmatchcase(n.name, p) for p in patterns)]


class Mixed(Recipe):
    """INT8 with named layers kept in FP32 (the sensitive ones)."""

    id = "mixed"
    precision = "mixed"
    Config = MixedConfig

    def run(self, inputs: QuantizeInputs, config: MixedConfig, out_dir: Path) -> Path:
        src = source_graph(inputs, config)
        kept = matching_nodes(src, config.keep_fp32)
        if not kept:
            raise RecipeError(
                f"mixed: keep_fp32 {config.keep_fp32} matches no node of the {config.graph} graph; "
                "list node names with `python -c \"import onnx; print([n.name for n in onnx.load('MODEL').graph.node])\"`"
            )
        settings = config.model_copy(update={"nodes_to_exclude": sorted(set(config.nodes_to_exclude) | set(kept))})
        return quantize_dynamic_int8(src, out_dir / "model.onnx", settings)
