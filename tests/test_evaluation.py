import numpy as np

from tasks.evaluation import hard_slice, quality_metrics


def test_hard_slice_takes_smallest_margins_and_worst_class():
    # Rows 0-3 are class 0 (all right), rows 4-7 class 1 (half wrong: the worst class).
    logits = np.array([[5, 0], [4, 0], [3, 2.9], [6, 0], [0, 5], [2, 0], [0, 3], [1, 0.95]], dtype=np.float32)
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    idx = hard_slice(logits, y, margin_fraction=0.25, worst_classes=1)
    # The two smallest margins are rows 2 (0.1) and 7 (0.05); class 1 adds rows 4-7.
    assert idx.tolist() == [2, 4, 5, 6, 7]


def test_quality_metrics_agreement_and_accuracy():
    y = np.array([0, 1, 1, 0])
    reference = np.array([0, 1, 0, 0])
    logits = np.eye(2, dtype=np.float32)[[0, 1, 1, 1]]
    q = quality_metrics(logits, y, reference, np.array([2, 3]))
    assert q.accuracy == 0.75
    assert q.agreement_with_fp32 == 0.5
    assert q.hard_slice_accuracy == 0.5
    assert 0 < q.macro_f1 < 1
