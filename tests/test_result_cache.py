"""Scores are reused for the same graph, rows, host and runtimes; recomputed when any of them changes."""

import json

import numpy as np
import pandas as pd
import pytest

from tasks.measure.result_cache import ResultCache, rows_digest


@pytest.fixture(scope="module")
def reference(tiny_model_folder, tmp_path_factory):
    from tasks.build.reference import prepare_reference
    from tasks.config.settings import EvaluateSettings, ModelSettings, ScreeningSettings
    from tasks.models.io import read_model_card
    from tests.test_recipes import TEXTS

    labels = read_model_card(tiny_model_folder).labels
    frame = pd.DataFrame({"text": TEXTS * 8, "label": [labels[i % len(labels)] for i in range(len(TEXTS) * 8)]})
    evaluate = EvaluateSettings(latency_runs=10, confirmation_fraction=0.0, batch_size=8,
                                screening=ScreeningSettings(first_rows=16))
    return prepare_reference(tiny_model_folder, frame, frame, tmp_path_factory.mktemp("work"), ModelSettings(),
                             evaluate, calibration_batch_size=8), evaluate


HOST = {"cpu_model": "test cpu", "cpu_flags": "avx2", "machine": "x86_64"}


def built(reference):
    from tasks.build.candidates import BuiltCandidate

    return BuiltCandidate("fp32", "fp32", "fp32", {}, "h", model_path=reference.inputs.fp32_model, model_sha256="a" * 64)


def test_a_second_score_of_the_same_graph_runs_no_rows(reference, tmp_path):
    from tasks.config.settings import QualityBar
    from tasks.evaluate.candidates import score_candidate

    ref, evaluate = reference
    cache = ResultCache.for_reference(tmp_path, ref, HOST)
    first = score_candidate(built(ref), ref, evaluate, QualityBar(), cache)
    again = score_candidate(built(ref), ref, evaluate, QualityBar(), ResultCache.for_reference(tmp_path, ref, HOST))
    assert first.rows_scored == len(ref.y_true) and not first.scores_reused
    assert again.rows_scored == 0 and again.scores_reused
    assert again.predictions == first.predictions and again.quality == first.quality


def test_scores_are_recomputed_when_rows_host_or_runtime_change(reference, tmp_path):
    ref, _ = reference
    cache = ResultCache.for_reference(tmp_path, ref, HOST)
    key = cache.key("a" * 64)
    cache.store(key, {0: np.zeros(len(ref.waves[0]), dtype=np.int64)}, "a" * 64)
    sizes = [len(w) for w in ref.waves]
    assert 0 in cache.load(key, sizes)
    # One row's tokens changed: a different set of evaluation rows, a different key.
    changed = [(idx, {k: v.copy() for k, v in feed.items()}) for idx, feed in ref.eval_batches]
    changed[0][1]["input_ids"][0, 1] += 1
    assert rows_digest(changed, ref.wave_batch_ends) != cache.evaluation_rows
    other_rows = ResultCache(tmp_path, rows_digest(changed, ref.wave_batch_ends), HOST, cache.runtime)
    other_host = ResultCache(tmp_path, cache.evaluation_rows, {**HOST, "cpu_flags": "avx512_vnni"}, cache.runtime)
    other_runtime = ResultCache(tmp_path, cache.evaluation_rows, HOST, {**cache.runtime, "onnxruntime": "0.0"})
    for other in (other_rows, other_host, other_runtime):
        assert other.key("a" * 64) != key and other.load(other.key("a" * 64), sizes) == {}


def test_a_corrupted_stored_score_is_recomputed_with_a_warning(reference, tmp_path, caplog):
    from tasks.config.settings import QualityBar
    from tasks.evaluate.candidates import score_candidate

    ref, evaluate = reference
    cache = ResultCache.for_reference(tmp_path, ref, HOST)
    first = score_candidate(built(ref), ref, evaluate, QualityBar(), cache)
    path = cache.path(cache.key("a" * 64))
    stored = json.loads(path.read_text())
    stored["waves"]["0"][0] = (stored["waves"]["0"][0] + 1) % 4  # a flipped prediction: the checksum no longer holds
    path.write_text(json.dumps(stored))
    with caplog.at_level("WARNING", logger="requant"):
        again = score_candidate(built(ref), ref, evaluate, QualityBar(), cache)
    assert "unsound" in caplog.text
    assert again.rows_scored == len(ref.y_true) and again.predictions == first.predictions
    assert cache.load(cache.key("a" * 64), [len(w) for w in ref.waves])  # rewritten sound
    path.write_text("{truncated")
    assert cache.load(cache.key("a" * 64), [len(w) for w in ref.waves]) == {}


def test_reuse_off_reads_and_writes_nothing(reference, tmp_path):
    from tasks.config.settings import QualityBar
    from tasks.evaluate.candidates import score_candidate

    ref, evaluate = reference
    cache = ResultCache.for_reference(tmp_path, ref, HOST, enabled=False)
    for _ in range(2):
        assert score_candidate(built(ref), ref, evaluate, QualityBar(), cache).rows_scored == len(ref.y_true)
    assert not list(tmp_path.glob("*.json"))
