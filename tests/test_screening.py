"""Screening stops clear failures early and never costs a candidate that would pass more than alpha."""

import numpy as np
import onnx
import pandas as pd
import pytest

from tasks.decide.decision import for_selection
from tasks.measure.screening import (
    Bar,
    loss_lower_bound,
    lower_bound,
    sequential_screen,
    upper_bound,
    wave_rows,
    wave_sizes,
)

BAR = Bar(max_relative_accuracy_loss=0.015, max_hard_slice_relative_loss=0.05)


def test_wave_sizes_start_small_then_double_and_the_last_takes_the_rest():
    assert wave_sizes(2156, 256) == [256, 256, 512, 1132]
    assert wave_sizes(300, 256) == [300]  # too few rows for a look: scored in one go
    waves = wave_rows(2156, 256, seed=0)
    assert sorted(np.concatenate(waves).tolist()) == list(range(2156))  # every row once


def test_kl_bounds_cover_the_truth_at_their_level():
    rng = np.random.default_rng(1)
    misses_low = misses_high = 0
    for _ in range(4000):
        hits = rng.binomial(200, 0.05)
        misses_low += lower_bound(hits, 200, 0.05) > 0.05
        misses_high += upper_bound(hits, 200, 0.05) < 0.05
    assert misses_low / 4000 <= 0.05 and misses_high / 4000 <= 0.05
    assert lower_bound(10, 200, 0.05) < 10 / 200 < upper_bound(10, 200, 0.05)


def population(rows: int, fp32_accuracy: float, only_fp32: float, only_candidate: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Per-row correctness of FP32 and a candidate: exact counts of rows only one of them gets right."""
    ref = np.zeros(rows, bool)
    ref[: int(round(fp32_accuracy * rows))] = True
    cand = ref.copy()
    right = np.flatnonzero(ref)
    wrong = np.flatnonzero(~ref)
    cand[rng.choice(right, int(round(only_fp32 * rows)), replace=False)] = False
    cand[rng.choice(wrong, int(round(only_candidate * rows)), replace=False)] = True
    order = rng.permutation(rows)
    return ref[order], cand[order]


def screen_population(ref, cand, alpha, first_rows=256, seed=0, hard_fraction=0.15):
    rows = len(ref)
    y_true = np.zeros(rows, dtype=np.int64)
    predictions = np.where(cand, 0, 1)
    hard_idx = np.arange(int(hard_fraction * rows))
    waves = wave_rows(rows, first_rows, seed)
    outcome, _ = sequential_screen(lambda i: predictions[waves[i]], waves, ref, y_true, hard_idx, BAR, alpha)
    return outcome


@pytest.mark.parametrize("fp32_accuracy, only_fp32, only_candidate", [(0.93, 0.0139, 0.0), (0.93, 0.05, 0.0361),
                                                                     (0.7, 0.2, 0.1896)])
def test_false_screen_outs_stay_below_alpha_over_many_seeded_simulations(fp32_accuracy, only_fp32, only_candidate):
    """Candidates exactly at the bar (the worst case that still passes): at most alpha screened out."""
    alpha, runs, screened = 0.05, 400, 0
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        ref, cand = population(2156, fp32_accuracy, only_fp32, only_candidate, rng)
        loss = (ref.sum() - cand.sum()) / ref.sum()
        assert loss <= BAR.max_relative_accuracy_loss  # the full gate's point test would pass it
        screened += screen_population(ref, cand, alpha, seed=seed).screened_out
    assert screened / runs <= alpha


def test_a_candidate_that_clearly_fails_is_screened_out_on_the_first_waves():
    rng = np.random.default_rng(0)
    ref, cand = population(2156, 0.93, 0.12, 0.01, rng)  # ~12% relative loss against a 1.5% bar
    outcome = screen_population(ref, cand, 0.01)
    assert outcome.screened_out and outcome.rows_used <= 512
    assert outcome.bound > outcome.limit and "screened out after" in outcome.reason


@pytest.mark.parametrize("only_fp32, only_candidate", [(0.019, 0.0106), (0.03, 0.011)])
def test_a_candidate_near_the_bar_is_left_to_the_full_measurement(only_fp32, only_candidate):
    """0.9% loss (the default grid's per-tensor INT8) and 2% loss (just over the bar): never screened out."""
    for seed in range(50):
        ref, cand = population(2156, 0.93, only_fp32, only_candidate, np.random.default_rng(seed))
        assert not screen_population(ref, cand, 0.05, seed=seed).screened_out


def test_loss_bound_is_below_the_observed_loss():
    ref = np.array([True] * 90 + [False] * 10)
    cand = ref.copy()
    cand[:9] = False
    assert loss_lower_bound(ref, cand, 0.05) < 9 / 100


# On a real (tiny) model: a candidate graph whose head is scrambled, scored by the real code.

@pytest.fixture(scope="module")
def reference(tiny_model_folder, tmp_path_factory):
    from tasks.build.reference import prepare_reference
    from tasks.config.settings import EvaluateSettings, ModelSettings, ScreeningSettings
    from tasks.models.io import read_model_card
    from tests.conftest import banking77_slice

    labels = read_model_card(tiny_model_folder).labels
    tmp = tmp_path_factory.mktemp("screen")
    _, test_csv = banking77_slice(tmp / "data", intents=4, train_per_intent=1, test_per_intent=40)
    frame = pd.read_csv(test_csv).rename(columns={"category": "label"})
    frame["label"] = frame["label"].map(dict(zip(sorted(frame["label"].unique()), labels)))
    evaluate = EvaluateSettings(latency_runs=10, throughput_batches=1, throughput_batch_size=4, warmup_runs=1,
                                timing_rounds=3, confirmation_fraction=0.0, batch_size=16,
                                screening=ScreeningSettings(first_rows=32))
    first = prepare_reference(tiny_model_folder, frame, frame, tmp / "work", ModelSettings(), evaluate,
                              calibration_batch_size=8)
    # A random model has no accuracy to lose: label the rows with its own FP32 predictions, so FP32
    # is right everywhere and a broken candidate visibly loses.
    frame["label"] = [first.card.labels[i] for i in first.predictions]
    return prepare_reference(tiny_model_folder, frame, frame, tmp / "work", ModelSettings(), evaluate,
                             calibration_batch_size=8), evaluate


def scrambled_head(fp32_model, out, classes: int):
    """The FP32 graph with its logits rotated by one class: wrong wherever FP32 is right."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(fp32_model))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["raw_logits" if o == "logits" else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(np.roll(np.arange(classes), 1).astype(np.int64), "rotation"))
    graph.node.append(helper.make_node("Gather", ["raw_logits", "rotation"], ["logits"], axis=1))
    onnx.save(model, str(out))
    return out


def test_a_clearly_failing_candidate_is_screened_out_after_the_first_rows_and_never_timed(reference, tmp_path):
    from tasks.build.candidates import BuiltCandidate
    from tasks.config.settings import HardwareProfile, QualityBar, TrafficSettings
    from tasks.evaluate.candidates import score_candidate, time_candidates

    ref, evaluate = reference
    assert ref.waves is not None and len(ref.waves) >= 3 and len(ref.waves[0]) == 32
    path = scrambled_head(ref.inputs.fp32_model, tmp_path / "scrambled.onnx", len(ref.card.labels))
    # Not the FP32 baseline (recipe fp32 is always timed: savings are priced against it).
    bad = score_candidate(BuiltCandidate("scrambled", "int8-dynamic", "int8", {}, "h", model_path=path, model_sha256="s"),
                          ref, evaluate, QualityBar())
    good = score_candidate(BuiltCandidate("fp32", "fp32", "fp32", {}, "h", model_path=ref.inputs.fp32_model,
                                          model_sha256="f"), ref, evaluate, QualityBar())
    assert bad.screened_out and bad.rows_scored < len(ref.y_true) and bad.quality is None
    assert "screened out after" in for_selection(bad).error
    assert not good.screened_out and good.rows_scored == len(ref.y_true) and good.quality.agreement_with_fp32 > 0.95
    time_candidates([bad, good], ref, evaluate, HardwareProfile(name="h", usd_per_hour=0.1),
                    TrafficSettings(requests_per_month=1e6, peak_requests_per_second=10), measure_memory=False)
    assert bad.speed is None and bad.cost is None and good.speed is not None  # never timed


def test_a_candidate_failing_the_bar_on_its_scores_is_not_timed_and_keeps_its_quality_reason(reference, tmp_path):
    from tasks.build.candidates import BuiltCandidate
    from tasks.config.settings import (
        HardwareProfile,
        QualityBar,
        ScreeningSettings,
        TrafficSettings,
    )
    from tasks.decide.decision import passes_quality
    from tasks.decide.selection import Reference as QualityReference
    from tasks.decide.selection import select
    from tasks.evaluate.candidates import (
        UNTIMED_FAILING,
        score_candidate,
        time_candidates,
    )

    ref, evaluate = reference
    full = evaluate.model_copy(update={"screening": ScreeningSettings(enabled=False)})  # scored on every row
    bar = QualityBar()
    path = scrambled_head(ref.inputs.fp32_model, tmp_path / "scrambled.onnx", len(ref.card.labels))
    # Not the FP32 baseline (recipe fp32 is always timed: savings are priced against it).
    bad = score_candidate(BuiltCandidate("scrambled", "int8-dynamic", "int8", {}, "h", model_path=path, model_sha256="s"),
                          ref, full, bar)
    good = score_candidate(BuiltCandidate("fp32", "fp32", "fp32", {}, "h", model_path=ref.inputs.fp32_model,
                                          model_sha256="f"), ref, full, bar)
    assert bad.quality is not None and not bad.screened_out  # a full score, and it fails the bar
    time_candidates([bad, good], ref, full, HardwareProfile(name="h", usd_per_hour=0.1),
                    TrafficSettings(requests_per_month=1e6, peak_requests_per_second=10), measure_memory=False,
                    passes=lambda m: passes_quality(m, ref, bar))
    assert bad.speed is None and bad.cost is None and bad.untimed_because == UNTIMED_FAILING
    assert good.speed is not None and good.cost is not None and good.untimed_because is None
    decision = select([for_selection(m, ref.y_true) for m in (bad, good)],
                      QualityReference(ref.quality.accuracy, ref.quality.hard_slice_accuracy), bar)
    assert decision.winner == "fp32"
    # The record says why it failed (its accuracy), not that it was untimed.
    assert decision.verdicts["scrambled"].reason.startswith("accuracy ") and "not timed" not in decision.verdicts["scrambled"].reason
    assert "throughput_per_s" not in bad.metrics(ref) and bad.metrics(ref)["accuracy"] == bad.quality.accuracy
    from tasks.decide.decision import candidate_record

    assert candidate_record(bad, ref)["untimed_because"] == UNTIMED_FAILING  # decision.json says why


def test_screening_off_scores_every_row_with_the_same_predictions(reference):
    from tasks.build.candidates import BuiltCandidate
    from tasks.config.settings import QualityBar, ScreeningSettings
    from tasks.evaluate.candidates import score_candidate

    ref, evaluate = reference
    built = BuiltCandidate("fp32", "fp32", "fp32", {}, "h", model_path=ref.inputs.fp32_model, model_sha256="f")
    on = score_candidate(built, ref, evaluate, QualityBar())
    off = score_candidate(built, ref, evaluate.model_copy(update={"screening": ScreeningSettings(enabled=False)}),
                          QualityBar())
    assert on.predictions == off.predictions and on.quality == off.quality
