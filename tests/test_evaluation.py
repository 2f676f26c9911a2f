import numpy as np

from tasks.measure.scoring import (
    hard_slice,
    least_confident_classes,
    quality_metrics,
    stratified_holdout,
)


def test_hard_slice_takes_the_hard_intents_and_the_length_tails_without_predictions():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    lengths = np.array([5, 9, 7, 30, 8, 6, 12, 10, 3, 11])
    idx = hard_slice(y, lengths, hard_classes=np.array([1]), length_fraction=0.1)
    # Class 1 is rows 4-7; the shortest row is 8 (3 tokens), the longest row 3 (30 tokens).
    assert idx.tolist() == [3, 4, 5, 6, 7, 8]


def test_least_confident_classes_ranks_by_mean_margin_on_the_given_rows():
    # Class 0: confident (margin ~1); class 1: near-ties; class 2: in between.
    logits = np.array([[9, 0, 0], [8, 0, 0], [0, 1, 0.9], [0, 1.1, 1.0], [0, 0, 3], [0, 1, 3]], dtype=np.float32)
    y = np.array([0, 0, 1, 1, 2, 2])
    assert least_confident_classes(logits, y, 1).tolist() == [1]
    assert least_confident_classes(logits, y, 2).tolist() == [1, 2]
    assert least_confident_classes(logits, y, 0).tolist() == []


def test_stratified_holdout_holds_out_each_class_and_never_overlaps():
    labels = ["a"] * 40 + ["b"] * 10 + ["c"] * 1
    kept, held = stratified_holdout(labels, 0.3, seed=0)
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == len(labels)
    held_labels = [labels[i] for i in held]
    assert held_labels.count("a") == 12 and held_labels.count("b") == 3 and "c" not in held_labels
    assert stratified_holdout(labels, 0.3, seed=0)[1].tolist() == held.tolist()  # reproducible


def test_quality_metrics_agreement_and_accuracy():
    y = np.array([0, 1, 1, 0])
    reference = np.array([0, 1, 0, 0])
    logits = np.eye(2, dtype=np.float32)[[0, 1, 1, 1]]
    q = quality_metrics(logits, y, reference, np.array([2, 3]))
    assert q.accuracy == 0.75
    assert q.agreement_with_fp32 == 0.5
    assert q.hard_slice_accuracy == 0.5
    assert 0 < q.macro_f1 < 1


def test_token_budget_batches_cover_every_row_once_within_both_limits_and_pad_less():
    from tasks.models.io import token_budget_batches

    rng = np.random.default_rng(0)
    # Banking77-like: mostly short queries, a long tail, and one text longer than the token budget.
    lengths = np.concatenate([rng.integers(4, 20, 900), rng.integers(20, 90, 100), [300]])
    batches = token_budget_batches(lengths, max_rows=64, max_tokens=1024)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(len(lengths)))  # every row exactly once
    for batch in batches:
        assert len(batch) <= 64
        assert len(batch) * lengths[batch].max() <= 1024 or len(batch) == 1  # the 300-token text stands alone
    padded = sum(len(b) * lengths[b].max() for b in batches)
    fixed = np.sort(lengths)
    padded_fixed = sum(len(fixed[i:i + 64]) * fixed[i:i + 64].max() for i in range(0, len(fixed), 64))
    assert padded < padded_fixed  # the long tail no longer pads whole 64-row batches
    assert [b.tolist() for b in token_budget_batches([5, 5, 5], max_rows=2, max_tokens=1000)] == [[0, 1], [2]]
