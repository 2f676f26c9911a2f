"""Sensitivity ranking on a tiny BERT where one layer is made deliberately fragile."""

import pandas as pd

from tasks.build.reference import prepare_reference
from tasks.config.settings import EvaluateSettings, ModelSettings
from tasks.measure.sensitivity import display_name, plot_ranking, rank_groups
from tasks.models.io import (
    ENCODER_DIR,
    HEAD_FILE,
    ModelCard,
    read_model_card,
    save_model_folder,
)
from tests.test_recipes import TEXTS


def fragile_copy(tiny_model_folder, tmp_path):
    """The tiny model with a huge weight column in layer.1's FFN up-projection.

    The column reads an input channel that the preceding LayerNorm zeroes (gamma = beta = 0), so the
    FP32 function is unchanged, but INT8 scales of that matrix now span the outlier and round every
    real weight to almost nothing.
    """
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(tiny_model_folder / ENCODER_DIR))
    layer = encoder.encoder.layer[1]
    with torch.no_grad():
        # Make this feed-forward block matter (random init leaves it tiny next to the residual)...
        layer.intermediate.dense.weight *= 20
        layer.output.dense.weight *= 20
        # ...then make its up-projection fragile.
        layer.attention.output.LayerNorm.weight[0] = 0.0
        layer.attention.output.LayerNorm.bias[0] = 0.0
        layer.intermediate.dense.weight[:, 0] = layer.intermediate.dense.weight.abs().max() * 1000
    encoder_dir = tmp_path / "fragile-encoder"
    encoder.save_pretrained(str(encoder_dir), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        source = tiny_model_folder / ENCODER_DIR / name
        if source.exists():
            (encoder_dir / name).write_bytes(source.read_bytes())
    head = load_file(str(tiny_model_folder / HEAD_FILE))
    card = read_model_card(tiny_model_folder)
    return save_model_folder(tmp_path / "fragile", encoder_dir, head["weight"], head["bias"],
                             ModelCard(card.labels, card.max_length))


def test_rank_groups_puts_the_fragile_layer_first(tiny_model_folder, tmp_path):
    folder = fragile_copy(tiny_model_folder, tmp_path)
    labels = read_model_card(folder).labels
    frame = pd.DataFrame({"text": TEXTS * 4, "label": [labels[i % len(labels)] for i in range(len(TEXTS) * 4)]})
    reference = prepare_reference(folder, frame, frame, tmp_path / "work", ModelSettings(),
                                  EvaluateSettings(latency_runs=10, ), calibration_batch_size=8)
    ranking = rank_groups(reference.inputs.optimized_model, reference.inputs.calibration_feeds, tmp_path / "scratch",
                          per_channel=False, threads=1)
    assert ranking[0].group == "layer.1 ffn-up"
    median = sorted(g.kl_divergence for g in ranking)[len(ranking) // 2]
    assert ranking[0].kl_divergence > 100 * max(median, 1e-12)
    assert len({g.node for g in ranking}) == len(ranking) >= 9  # 2 layers x 4 groups + embeddings (+ head)
    assert plot_ranking(ranking, tmp_path / "s.png").stat().st_size > 5_000


def test_display_name_reads_like_the_model():
    assert display_name("/encoder/encoder/layer.3/intermediate/dense/MatMul", "MatMul") == "layer.3 ffn-up"
    assert display_name("/encoder/encoder/layer.3/output/dense/MatMul", "MatMul") == "layer.3 ffn-down"
    assert display_name("Attention_2", "Attention") == "layer.2 attention"
    assert display_name("EmbedLayerNormalization_0", "EmbedLayerNormalization") == "embeddings"


def test_spread_rows_samples_every_length_not_the_shortest():
    import numpy as np

    from tasks.measure.sensitivity import spread_rows

    # 10 length-sorted batches of 32 rows, sequence lengths 8, 16, ..., 80.
    feeds = [{"input_ids": np.zeros((32, 8 * (i + 1)), dtype=np.int64)} for i in range(10)]
    taken = spread_rows(feeds, 96)
    lengths = [f["input_ids"].shape[1] for f in taken]
    assert sum(len(f["input_ids"]) for f in taken) >= 96
    assert lengths[0] == 8 and lengths[-1] == 80  # both ends of the length range
    assert spread_rows(feeds, 10_000) == feeds


def test_a_quarter_of_the_samples_ranks_the_top_groups_as_the_full_sweep(tiny_model_folder, tmp_path):
    """The default search.sensitivity_samples (64) against every calibration row (256 here)."""
    from tasks.measure.sensitivity import ranking_agreement, spread_rows

    folder = fragile_copy(tiny_model_folder, tmp_path)
    labels = read_model_card(folder).labels
    from tests.conftest import banking77_slice

    train_csv, _ = banking77_slice(tmp_path / "data", intents=4, train_per_intent=64, test_per_intent=1)
    frame = pd.read_csv(train_csv).rename(columns={"category": "label"})
    frame["label"] = frame["label"].map(dict(zip(sorted(frame["label"].unique()), labels)))
    reference = prepare_reference(folder, frame, frame, tmp_path / "work", ModelSettings(),
                                  EvaluateSettings(latency_runs=10), calibration_batch_size=16)
    feeds = reference.inputs.calibration_feeds
    full = rank_groups(reference.inputs.optimized_model, feeds, tmp_path / "full", per_channel=True, threads=1)
    cheap = rank_groups(reference.inputs.optimized_model, spread_rows(feeds, 64), tmp_path / "cheap",
                        per_channel=True, threads=1)
    agreement = ranking_agreement(cheap, full, top_k=3)
    assert sum(len(f["input_ids"]) for f in spread_rows(feeds, 64)) <= 64 < sum(len(f["input_ids"]) for f in feeds)
    assert cheap[0].node == full[0].node  # the fragile group
    assert agreement["top_k_overlap"] >= 2 / 3 and agreement["spearman"] >= 0.8
