"""Which parts of the graph hurt quality when quantized: one group at a time, measured end to end.

Each group (one weight-bearing node: an attention block, a feed-forward MatMul, the embedding, the
head) is quantized alone with dynamic INT8, and the model's output on calibration data is compared
with FP32: mean KL divergence of the class distributions, and the share of top-1 flips. The
ranking feeds the mixed-precision search, which keeps the most sensitive groups in FP32.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tasks.models.graph import onnx_session
from tasks.recipes.int8_dynamic import Int8DynamicConfig, quantize_dynamic_int8

# Node types whose weights dynamic INT8 quantizes (fused ones included).
WEIGHT_OPS = {"MatMul", "Gemm", "Attention", "EmbedLayerNormalization"}


@dataclass(frozen=True)
class GroupSensitivity:
    """How far the model's output moves when only this group is quantized."""

    group: str
    node: str
    op_type: str
    kl_divergence: float
    top1_flip_rate: float
    nodes: tuple[str, ...] = ()  # every node of the group, when it has several (a decoder's block)

    @property
    def node_names(self) -> tuple[str, ...]:
        """The nodes a trial keeps in FP32 for this group."""
        return self.nodes or (self.node,)

    def as_dict(self) -> dict:
        """Plain dict for the MLflow artifact."""
        return {**asdict(self), "nodes": list(self.nodes)}


def weight_nodes(model_path: Path) -> list[tuple[str, str, str]]:
    """(display name, node name, op type) of every node with a constant weight input."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type in WEIGHT_OPS and any(name in initializers for name in node.input[1:]):
            out.append((display_name(node.name, node.op_type), node.name, node.op_type))
    return out


def display_name(node_name: str, op_type: str) -> str:
    """A readable group name: 'layer.3 ffn-up', 'layer.0 attention', 'embeddings', 'head'."""
    layer = re.search(r"layer\.(\d+)", node_name)
    fused = re.fullmatch(r"Attention_(\d+)", node_name)
    if fused:
        return f"layer.{fused.group(1)} attention"
    if op_type == "EmbedLayerNormalization" or "embeddings" in node_name:
        return "embeddings"
    roles = (("attention/output", "attention-out"), ("attention/self", "attention-proj"),
             ("intermediate", "ffn-up"), ("output/dense", "ffn-down"))
    role = next((label for key, label in roles if key in node_name), op_type)
    return f"layer.{layer.group(1)} {role}" if layer else ("head" if "head" in node_name else node_name)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _logits(model_path: Path, feeds: list[dict[str, np.ndarray]], threads: int) -> np.ndarray:
    session = onnx_session(model_path, threads)
    return np.concatenate([session.run(["logits"], f)[0] for f in feeds])


def rank_groups(model_path: Path, feeds: list[dict[str, np.ndarray]], work_dir: Path, per_channel: bool = True,
                threads: int = 2, progress: Callable[[int, int], None] | None = None) -> list[GroupSensitivity]:
    """Quantize each weight node alone and rank them, most sensitive (largest KL) first."""
    reference = _softmax(_logits(model_path, feeds, threads))
    reference_top1 = reference.argmax(axis=1)
    work_dir.mkdir(parents=True, exist_ok=True)
    nodes = weight_nodes(model_path)
    ranked = []
    for i, (group, node, op_type) in enumerate(nodes):
        out = work_dir / f"only-{i}.onnx"
        quantize_dynamic_int8(model_path, out, Int8DynamicConfig(per_channel=per_channel, nodes_to_quantize=[node]))
        probs = _softmax(_logits(out, feeds, threads))
        kl = np.sum(reference * (np.log(reference + 1e-12) - np.log(probs + 1e-12)), axis=1).mean()
        flips = float((probs.argmax(axis=1) != reference_top1).mean())
        ranked.append(GroupSensitivity(group, node, op_type, float(kl), flips))
        out.unlink()
        if progress:
            progress(i + 1, len(nodes))
    shutil.rmtree(work_dir, ignore_errors=True)
    return sorted(ranked, key=lambda g: (g.kl_divergence, g.top1_flip_rate), reverse=True)


def cached_ranking(cache_dir: Path, identity: list, compute: Callable[[], list[GroupSensitivity]]) -> list[GroupSensitivity]:
    """Reuse a ranking computed for the same identity (source model, config, samples); it is slow."""
    import hashlib
    import json

    cache = cache_dir / f"{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]}.json"
    if cache.is_file():
        return [GroupSensitivity(**{**g, "nodes": tuple(g.get("nodes", ()))}) for g in json.loads(cache.read_text())]
    ranking = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps([g.as_dict() for g in ranking]))
    return ranking


def spread_rows(feeds: list[dict[str, np.ndarray]], rows: int) -> list[dict[str, np.ndarray]]:
    """Whole batches spread evenly over `feeds` until at least `rows` rows are taken.

    Calibration feeds are length-sorted batches; taking them from the front would measure
    sensitivity on the shortest texts only. Evenly spaced batches keep every length represented.
    """
    total = sum(len(f["input_ids"]) for f in feeds)
    if total <= rows:
        return list(feeds)
    per_batch = total / len(feeds)
    wanted = min(len(feeds), int(np.ceil(rows / per_batch)))
    picks = np.unique(np.linspace(0, len(feeds) - 1, wanted).round().astype(int))
    return [feeds[i] for i in picks]


def ranking_agreement(cheap: list[GroupSensitivity], full: list[GroupSensitivity], top_k: int = 5) -> dict[str, float]:
    """How far a cheaper ranking (fewer samples) agrees with the full sweep's.

    Returns the Spearman rank correlation over all groups and the overlap of the top-k groups
    (|top_k(cheap) & top_k(full)| / k): the search keeps the top groups in FP32, so their overlap
    is what matters most.
    """
    order_full = [g.node for g in full]
    order_cheap = [g.node for g in cheap]
    if sorted(order_full) != sorted(order_cheap):
        raise ValueError("the two rankings are over different groups")
    rank_cheap = {node: i for i, node in enumerate(order_cheap)}
    d = np.array([rank_cheap[node] - i for i, node in enumerate(order_full)], dtype=np.float64)
    n = len(order_full)
    spearman = 1 - 6 * float((d ** 2).sum()) / (n * (n ** 2 - 1)) if n > 1 else 1.0
    k = min(top_k, n)
    overlap = len(set(order_full[:k]) & set(order_cheap[:k])) / k if k else 1.0
    return {"spearman": spearman, "top_k": float(k), "top_k_overlap": overlap}


def plot_ranking(ranking: list[GroupSensitivity], path: Path) -> Path:
    """Horizontal bar chart of KL divergence per group, most sensitive on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(ranking))))
    ax.barh([g.group for g in reversed(ranking)], [g.kl_divergence for g in reversed(ranking)], color="#4C72B0")
    ax.set_xlabel("mean KL(FP32 || quantized) on calibration data")
    ax.set_title("Sensitivity: each group quantized alone (dynamic INT8)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
