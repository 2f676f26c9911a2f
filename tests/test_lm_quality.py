"""Decoder language-model quality: window scoring, pooled perplexity with paired intervals, the verdict.

The perplexity is checked against PyTorch's own loss of a tiny random Llama on the same tokens;
the rest runs on hand-made logits, so each number a test asserts can be worked out by hand.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.special import log_softmax as scipy_log_softmax

from tasks.measure.lm_quality import (
    DocumentScores,
    GreedyAgreement,
    LmBar,
    LmQuality,
    WindowScore,
    greedy_agreement,
    judge_lm,
    log_softmax,
    score_window,
    summarise,
)

VOCAB = 256


@pytest.fixture(scope="module")
def tiny_llama():
    """A random 2-layer Llama over a 256-token vocabulary (built from a config, no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def _logits_and_loss(model, ids: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The model's logits [T, V] for one window and its mean next-token loss, straight from PyTorch."""
    import torch

    with torch.inference_mode():
        tokens = torch.from_numpy(ids)[None]
        out = model(tokens, labels=tokens if labels is None else torch.from_numpy(labels)[None])
    return out.logits[0].float().numpy(), float(out.loss)


def _identical_documents(count: int, windows: int = 2, length: int = 24, seed: int = 0) -> list[DocumentScores]:
    """Documents whose candidate logits are FP32's own: nothing may differ."""
    rng = np.random.default_rng(seed)
    documents = []
    for d in range(count):
        scores = []
        for _ in range(windows):
            logits = rng.normal(size=(length, 32)).astype(np.float32)
            scores.append(score_window(logits, logits, rng.integers(0, 32, size=length)))
        documents.append(DocumentScores.from_windows(f"doc-{d}", scores))
    return documents


def _noisy_documents(count: int, seed: int = 0) -> list[DocumentScores]:
    """Per-document sums drawn as a real evaluation would give them: documents differ in length and difficulty."""
    rng = np.random.default_rng(seed)
    documents = []
    for d in range(count):
        tokens = int(rng.integers(100, 400))
        nll_reference = tokens * rng.normal(3.0, 0.3)
        nll_candidate = nll_reference + tokens * rng.normal(0.02, 0.01)
        documents.append(DocumentScores(f"doc-{d}", nll_reference, nll_candidate, int(rng.binomial(tokens, 0.95)),
                                        tokens * rng.gamma(2.0, 0.01), tokens))
    return documents


def _flipping_documents(documents: int = 8, windows: int = 2, length: int = 41, vocab: int = 16):
    """FP32 logits whose top two tokens are 0.02 apart, and a candidate that swaps them on 30% of positions.

    Positions t with t % 10 < 3 are swapped: 12 of the 40 predicted positions of a 41-token window.
    The next token is FP32's top token on even positions and a third token on odd ones, so the swap
    moves the NLL by at most 0.02 nats on a few positions: perplexity barely changes, the top-1 does.
    """
    rng = np.random.default_rng(7)
    scores = []
    for d in range(documents):
        parts = []
        for _ in range(windows):
            reference = rng.normal(size=(length, vocab))
            ids = np.zeros(length, dtype=np.int64)
            candidate = reference.copy()
            for t in range(length):
                top, second, third = rng.permutation(vocab)[:3]
                reference[t, top], reference[t, second] = 6.0, 5.98
                candidate[t] = reference[t]
                if t % 10 < 3:
                    candidate[t, top], candidate[t, second] = 5.98, 6.0
                if t + 1 < length:
                    ids[t + 1] = top if t % 2 == 0 else third
            parts.append(score_window(reference, candidate, ids))
        scores.append(DocumentScores.from_windows(f"doc-{d}", parts))
    return scores


def test_log_softmax_matches_scipy_and_stays_finite_for_huge_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=5, size=(3, 7, 11))
    np.testing.assert_allclose(log_softmax(logits), scipy_log_softmax(logits, axis=-1), rtol=1e-12, atol=1e-12)
    huge = np.array([[1000.0, 999.0, -1000.0]], dtype=np.float32)
    result = log_softmax(huge)
    assert np.isfinite(result).all()
    np.testing.assert_allclose(np.exp(result).sum(axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(result[0, :2], scipy_log_softmax(np.array([1.0, 0.0])), rtol=1e-5)


def test_summarise_perplexity_matches_pytorch_loss_on_a_tiny_llama(tiny_llama):
    rng = np.random.default_rng(0)
    lengths = [16, 40, 64, 33, 128, 9]  # unequal windows: the pooled perplexity weights each by its tokens
    losses, predicted, windows = [], [], []
    for length in lengths:
        ids = rng.integers(0, VOCAB, size=length)
        logits, loss = _logits_and_loss(tiny_llama, ids)
        losses.append(loss)
        predicted.append(length - 1)
        windows.append(score_window(logits, logits, ids))
    documents = [DocumentScores.from_windows(f"doc-{i}", windows[i:i + 2]) for i in range(0, len(windows), 2)]

    quality = summarise(documents)

    direct = float(np.exp(np.average(losses, weights=predicted)))
    assert quality.reference_perplexity == pytest.approx(direct, rel=1e-5)
    assert quality.candidate_perplexity == pytest.approx(direct, rel=1e-5)
    assert quality.tokens == sum(predicted)
    assert quality.documents == 3


def test_score_window_ignores_masked_positions_as_pytorch_ignores_labels_of_minus_100(tiny_llama):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, size=48)
    mask = np.ones(48, dtype=np.int64)
    mask[:16] = 0  # the context an overlapping window has already scored
    mask[30:33] = 0
    labels = np.where(mask == 1, ids, -100)
    logits, loss = _logits_and_loss(tiny_llama, ids, labels)
    # The candidate is FP32 except where it predicts a masked token, and there it is garbage.
    candidate = logits.copy()
    masked_predictions = np.flatnonzero(mask[1:] == 0)
    candidate[masked_predictions] = rng.normal(scale=50, size=(len(masked_predictions), VOCAB))

    score = score_window(logits, candidate, ids, mask)

    assert score.tokens == int(mask[1:].sum()) == 29  # 47 predictions less 15 and 3 masked
    assert score.nll_reference == pytest.approx(loss * score.tokens, rel=1e-5)
    assert score.nll_candidate == pytest.approx(score.nll_reference, rel=1e-12)
    assert score.agree == score.tokens
    assert score.kl == pytest.approx(0.0, abs=1e-12)


def test_score_window_batched_and_chunked_equals_one_window_at_a_time():
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(3, 20, 50)).astype(np.float32)
    candidate = reference + rng.normal(scale=0.5, size=reference.shape).astype(np.float32)
    ids = rng.integers(0, 50, size=(3, 20))
    mask = (rng.random(size=(3, 20)) > 0.2).astype(np.int64)

    batched = score_window(reference, candidate, ids, mask)
    chunked = score_window(reference, candidate, ids, mask, chunk_elements=7)  # one position at a time
    single = sum((score_window(reference[b], candidate[b], ids[b], mask[b]) for b in range(3)), WindowScore())

    for other in (chunked, single):
        assert other.tokens == batched.tokens == int(mask[:, 1:].sum())
        assert other.agree == batched.agree
        for name in ("nll_reference", "nll_candidate", "kl"):
            assert getattr(other, name) == pytest.approx(getattr(batched, name), rel=1e-12)
    assert 0 < batched.agree < batched.tokens
    assert batched.kl > 0


def test_score_window_counts_agreement_and_kl_on_a_window_worked_by_hand():
    # Two predicted positions over a 2-token vocabulary; position 0 agrees, position 1 flips.
    reference = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]]))
    candidate = np.log(np.array([[0.8, 0.2], [0.4, 0.6], [0.5, 0.5]]))
    ids = np.array([1, 0, 1])

    score = score_window(reference, candidate, ids)

    assert score.tokens == 2
    assert score.agree == 1
    assert score.nll_reference == pytest.approx(-np.log(0.9) - np.log(0.4))
    assert score.nll_candidate == pytest.approx(-np.log(0.8) - np.log(0.6))
    kl = 0.9 * np.log(0.9 / 0.8) + 0.1 * np.log(0.1 / 0.2) + 0.6 * np.log(0.6 / 0.4) + 0.4 * np.log(0.4 / 0.6)
    assert score.kl == pytest.approx(kl)


@pytest.mark.parametrize("call, message", [
    (lambda: score_window(np.zeros((4, 8)), np.zeros((4, 9)), np.zeros(4, dtype=int)), "differ in shape"),
    (lambda: score_window(np.zeros((4, 8)), np.zeros((4, 8)), np.zeros(5, dtype=int)), "do not match"),
    (lambda: score_window(np.zeros((4, 8)), np.zeros((4, 8)), np.array([0, 1, 8, 2])), "must lie in"),
    (lambda: score_window(np.zeros((4, 8)), np.zeros((4, 8)), np.zeros(4, dtype=int), np.ones(3)), "mask"),
    (lambda: summarise([]), "no documents"),
    (lambda: summarise([DocumentScores("empty", 0.0, 0.0, 0, 0.0, 0)]), "without scored tokens"),
    (lambda: greedy_agreement([[1]], [[1], [2]]), "reference continuations"),
])
def test_bad_inputs_are_refused_with_a_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_summarise_identical_logits_give_no_increase_full_agreement_and_degenerate_intervals():
    quality = summarise(_identical_documents(6))

    assert quality.relative_perplexity_increase == 0.0
    assert quality.candidate_perplexity == quality.reference_perplexity
    assert quality.token_agreement == 1.0
    assert quality.mean_kl == 0.0
    assert quality.perplexity_increase_interval == (0.0, 0.0)
    assert quality.agreement_interval == (1.0, 1.0)
    assert quality.kl_interval == (0.0, 0.0)
    verdict = judge_lm(quality, greedy_agreement([[1, 2, 3]], [[1, 2, 3]]), LmBar())
    assert verdict.passed
    assert verdict.reason.startswith("passes on 6 documents (276 tokens):")


def test_judge_lm_fails_on_agreement_when_perplexity_passes_but_many_tokens_flip():
    # The case: "A candidate that passes perplexity but flips many tokens fails".
    quality = summarise(_flipping_documents())

    assert quality.token_agreement == pytest.approx(0.7)
    assert quality.perplexity_increase_interval[1] < 0.005  # far inside the 5% bar
    assert quality.kl_interval[1] < LmBar().max_mean_kl
    verdict = judge_lm(quality, None, LmBar())
    assert not verdict.passed
    assert verdict.reason == "token agreement 70.0% (lower bound 70.0%) is below the bar 90%"


@pytest.mark.parametrize("bar, greedy, starts, ends", [
    (LmBar(max_relative_perplexity_increase=0.01), None, "relative perplexity increase +", "is above the bar 1%"),
    (LmBar(min_token_agreement=0.97), None, "token agreement ", "is below the bar 97%"),
    (LmBar(max_mean_kl=0.01), None, "mean KL ", "is above the bar 0.01"),
    (LmBar(), GreedyAgreement(identical=0.25, mean_prefix=0.6, prompts=8),
     "greedy answers identical to FP32 on 25.0% of 8 prompts, below the bar 50%", ""),
    (LmBar(), GreedyAgreement(identical=0.75, mean_prefix=0.9, prompts=8), "passes on 40 documents (10030 tokens): relative",
     "greedy answers identical on 75.0% of 8 prompts (bar 50%)"),
])
def test_judge_lm_names_the_first_failed_check(bar, greedy, starts, ends):
    # The noisy documents: perplexity +1.9% (upper +2.3%), agreement 94.8% (lower 94.4%), KL 0.0195 (upper 0.0237).
    verdict = judge_lm(summarise(_noisy_documents(40)), greedy, bar)
    assert verdict.passed == starts.startswith("passes")
    assert verdict.reason.startswith(starts) and verdict.reason.endswith(ends), verdict.reason


def test_judge_lm_fails_a_candidate_whose_numbers_are_nan():
    quality = dataclasses.replace(summarise(_identical_documents(3)), perplexity_increase_interval=(np.nan, np.nan))
    assert not judge_lm(quality, None, LmBar()).passed


def test_summarise_interval_contains_the_point_estimate():
    quality = summarise(_noisy_documents(40))
    for point, (low, high) in [(quality.relative_perplexity_increase, quality.perplexity_increase_interval),
                               (quality.token_agreement, quality.agreement_interval),
                               (quality.mean_kl, quality.kl_interval)]:
        assert low < point < high


def test_summarise_interval_narrows_with_more_documents():
    few, many = summarise(_noisy_documents(10)), summarise(_noisy_documents(250))

    def width(interval):
        return interval[1] - interval[0]

    for name in ("perplexity_increase_interval", "agreement_interval", "kl_interval"):
        assert width(getattr(many, name)) < width(getattr(few, name)) / 2, name


def test_summarise_same_seed_gives_the_same_interval_and_another_seed_another():
    documents = _noisy_documents(30)
    first, again, other = summarise(documents, seed=3), summarise(documents, seed=3), summarise(documents, seed=4)
    assert first == again
    assert other.perplexity_increase_interval != first.perplexity_increase_interval
    assert other.relative_perplexity_increase == first.relative_perplexity_increase


def test_summarise_is_paired_so_its_interval_is_tighter_than_the_spread_of_either_model():
    # Documents differ a lot in difficulty (NLL per token 3.0 +- 0.3) but the candidate adds a steady
    # 0.02: resampling both with one draw cancels the difficulty, leaving only the 0.01 noise.
    quality = summarise(_noisy_documents(40))
    low, high = quality.perplexity_increase_interval
    assert high - low < 0.02
    assert 0.01 < quality.relative_perplexity_increase < 0.03


def test_lm_quality_as_dict_is_flat_floats_under_lm_names():
    metrics = summarise(_noisy_documents(12)).as_dict()
    assert set(metrics) == {
        "lm_perplexity", "lm_reference_perplexity", "lm_relative_perplexity_increase",
        "lm_relative_perplexity_increase_low", "lm_relative_perplexity_increase_high",
        "lm_token_agreement", "lm_token_agreement_low", "lm_token_agreement_high",
        "lm_mean_kl", "lm_mean_kl_low", "lm_mean_kl_high", "lm_documents", "lm_tokens"}
    assert all(type(value) is float for value in metrics.values())
    assert metrics["lm_documents"] == 12.0


def test_greedy_agreement_on_hand_made_sequences():
    reference = [[5, 6, 7, 8], [1, 2, 3, 4], [9, 9], [3, 1, 4, 1, 5], []]
    candidate = [[5, 6, 7, 8], [1, 2, 0, 4], [0, 9], [3, 1, 4], []]

    agreement = greedy_agreement(reference, candidate)

    assert agreement.prompts == 5
    assert agreement.identical == pytest.approx(2 / 5)  # the first and the empty one
    # Prefixes: 4/4, 2/4, 0/2, 3/5 (the candidate stopped early), and an empty reference counts as whole.
    assert agreement.mean_prefix == pytest.approx((1.0 + 0.5 + 0.0 + 0.6 + 1.0) / 5)
    assert agreement.as_dict() == {"lm_greedy_identical": 0.4, "lm_greedy_mean_prefix": pytest.approx(0.62),
                                   "lm_greedy_prompts": 5.0}


def test_lm_bar_has_the_fields_and_defaults_of_the_settings_section():
    from tasks.config.settings import LmQualityBar

    ours = {f.name: f.default for f in dataclasses.fields(LmBar)}
    settings = {name: field.default for name, field in LmQualityBar.model_fields.items()}
    assert ours == settings
    quality = summarise(_flipping_documents())
    assert judge_lm(quality, None, LmQualityBar()) == judge_lm(quality, None, LmBar())


def test_lm_quality_is_a_plain_record():
    # Built by hand, the record holds what it is given: the adapter can rebuild it from MLflow metrics.
    quality = LmQuality(10.0, 10.5, 0.05, 0.9, 0.1, 2, 100, (0.04, 0.06), (0.88, 0.92), (0.09, 0.11))
    assert quality.as_dict()["lm_relative_perplexity_increase_high"] == 0.06
    assert quality.confidence == 0.95
