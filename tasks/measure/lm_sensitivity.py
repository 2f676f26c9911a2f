"""Which blocks of a decoder hurt quality when quantized: one block at a time, on calibration windows.

The decoder counterpart of sensitivity.py. A group is one transformer block's weight MatMuls (its
attention projections and feed-forward, `layer.i`), or `head`: every weight MatMul outside the
blocks (the LM head when it is not tied to the embedding table). Each group alone is quantized with
the search's base recipe (a weight-only one, say), by leaving every other weight MatMul out, and
FP32's and the graph's next-token distributions are compared on the calibration windows (never the
text that decides): mean KL(FP32 || quantized) per token, and the share of top-1 flips. The ranking
feeds the same search as the classifiers' (tasks/decide/mixed_search.py), which keeps the most
sensitive blocks in FP32.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

from tasks.measure.lm_quality import score_window
from tasks.measure.sensitivity import GroupSensitivity, weight_nodes
from tasks.models.graph import onnx_session
from tasks.recipes.base import QuantizeInputs, parse_config, recipe_class

_BLOCK = re.compile(r"layers?\.(\d+)[./]")


def decoder_groups(model_path: Path) -> dict[str, list[str]]:
    """The weight MatMuls of a decoder graph by block, in graph order: {"layer.0": [...], ..., "head": [...]}."""
    groups: dict[str, list[str]] = {}
    for _, node, op_type in weight_nodes(model_path):
        if op_type != "MatMul":
            continue
        block = _BLOCK.search(node)
        groups.setdefault(f"layer.{block.group(1)}" if block else "head", []).append(node)
    return groups


def rank_decoder_groups(inputs: QuantizeInputs, recipe: str, base_config: dict, work_dir: Path, threads: int = 2,
                        progress: Callable[[int, int], None] | None = None) -> list[GroupSensitivity]:
    """Quantize each block alone with `recipe` (`base_config`) and rank the blocks, most sensitive (largest KL) first.

    Args:
        inputs: the FP32 decoder graph and its calibration window feeds.
        recipe: the search's base recipe (one that takes `nodes_to_exclude`).
        base_config: its config; nodes it already excludes stay excluded.
    """
    groups = decoder_groups(inputs.fp32_model)
    every = {node for nodes in groups.values() for node in nodes}
    fp32 = onnx_session(inputs.fp32_model, threads)
    feeds = inputs.calibration_feeds
    reference = [fp32.run(["logits"], feed)[0] for feed in feeds]
    cls = recipe_class(recipe)
    work_dir.mkdir(parents=True, exist_ok=True)
    ranked = []
    for i, (group, nodes) in enumerate(groups.items()):
        left_out = sorted((every - set(nodes)) | set(base_config.get("nodes_to_exclude", [])))
        config = parse_config(recipe, {**base_config, "nodes_to_exclude": left_out}, f"sensitivity-{group}")
        out_dir = work_dir / f"only-{i}"
        out_dir.mkdir(parents=True, exist_ok=True)
        session = onnx_session(cls().run(inputs, config, out_dir), threads)
        total = None
        for feed, ref in zip(feeds, reference):
            scored = score_window(ref, session.run(["logits"], feed)[0], feed["input_ids"])
            total = scored if total is None else total + scored
        del session
        shutil.rmtree(out_dir, ignore_errors=True)
        tokens = max(total.tokens, 1)
        ranked.append(GroupSensitivity(group, nodes[0], "MatMul", total.kl / tokens, 1 - total.agree / tokens,
                                       nodes=tuple(nodes)))
        if progress:
            progress(i + 1, len(groups))
    shutil.rmtree(work_dir, ignore_errors=True)
    return sorted(ranked, key=lambda g: (g.kl_divergence, g.top1_flip_rate), reverse=True)
