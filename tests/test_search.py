"""The search loop with scripted evaluations: no model, no quantizer."""

import itertools

import numpy as np
import pytest

from tasks.decide.search import Budget, SmallestPassingK, Trial, run_search

BIG = Budget(max_trials=100, max_seconds=1e9)


class Listed:
    """Proposes a fixed list in order (a grid strategy)."""

    def __init__(self, proposals):
        self.proposals = list(proposals)

    def propose(self, trials):
        return self.proposals[len(trials)] if len(trials) < len(self.proposals) else None


def scripted(table):
    """evaluate() from a table: proposal -> (passed, cost, accuracy)."""
    calls = []

    def evaluate(p):
        calls.append(p)
        passed, cost, accuracy = table[p]
        return Trial(p, passed, cost, accuracy)

    return evaluate, calls


def test_run_search_returns_cheapest_passing_not_first_passing():
    evaluate, _ = scripted({"a": (True, 300, 0.93), "b": (False, 100, 0.80), "c": (True, 200, 0.92)})
    result = run_search(Listed("abc"), evaluate, BIG)
    assert result.best.proposal == "c"
    assert [t.proposal for t in result.trials] == ["a", "b", "c"]


def test_run_search_respects_the_trial_budget():
    evaluate, calls = scripted({p: (False, 1, 0.5) for p in "abcdef"})
    result = run_search(Listed("abcdef"), evaluate, Budget(max_trials=3, max_seconds=1e9))
    assert calls == ["a", "b", "c"] and "trial budget" in result.stop_reason


def test_run_search_respects_the_time_budget():
    ticks = itertools.count(0, 10)  # each clock read advances 10 s
    evaluate, calls = scripted({p: (True, 1, 0.9) for p in "abcdef"})
    result = run_search(Listed("abcdef"), evaluate, Budget(max_trials=100, max_seconds=25), clock=lambda: next(ticks))
    assert len(calls) == 2 and "time budget" in result.stop_reason


def test_run_search_nothing_passes_gives_no_best():
    evaluate, _ = scripted({"a": (False, 1, 0.5), "b": (False, 2, 0.6)})
    result = run_search(Listed("ab"), evaluate, BIG)
    assert result.best is None and result.stop_reason == "no cheaper candidate can still pass"


def table_passing(n, passing, cost_per_group=10.0):
    return {k: (k in passing, float(k), 0.90 + 0.001 * k) for k in range(n + 1)}


def test_smallest_passing_k_finds_the_smallest_passing_k_of_a_monotone_table():
    evaluate, calls = scripted(table_passing(26, set(range(5, 27))))
    result = run_search(SmallestPassingK(26), evaluate, BIG)
    assert result.best.proposal == 5
    assert calls == [0, 1, 2, 4, 8, 3, 5]  # probes, then the fill-in below the first pass


def test_smallest_passing_k_is_not_fooled_by_a_non_monotone_table():
    # The script: passing k = {2, 6, 7, 8}; a binary search returned 6.
    evaluate, calls = scripted(table_passing(26, {2, 6, 7, 8}))
    result = run_search(SmallestPassingK(26), evaluate, BIG)
    assert result.best.proposal == 2 and calls == [0, 1, 2]


def test_smallest_passing_k_a_failed_build_prunes_nothing_below_a_later_pass():
    # k=4 "fails" (a build error), k=8 passes, k=3 passes: the answer is 3, not 8.
    evaluate, calls = scripted(table_passing(26, {3, 8, 9}))
    result = run_search(SmallestPassingK(26), evaluate, BIG)
    assert result.best.proposal == 3 and 8 in calls


def test_smallest_passing_k_stops_after_one_trial_when_everything_quantized_passes():
    evaluate, calls = scripted(table_passing(26, set(range(27))))
    assert run_search(SmallestPassingK(26), evaluate, BIG).best.proposal == 0 and calls == [0]


def test_smallest_passing_k_when_nothing_passes_tries_every_k():
    evaluate, calls = scripted(table_passing(8, set()))
    result = run_search(SmallestPassingK(8), evaluate, BIG)
    assert result.best is None and sorted(calls) == list(range(9))


def test_smallest_passing_k_reports_what_an_exhausted_budget_left_untried():
    strategy = SmallestPassingK(26)
    evaluate, _ = scripted(table_passing(26, {5, 16}))
    result = run_search(strategy, evaluate, Budget(max_trials=5, max_seconds=1e9))
    # Tried 0, 1, 2, 4, 8: nothing passed yet, so every other k up to 26 is untried.
    assert result.best is None and strategy.untried_below_best(result.trials)[:3] == [3, 5, 6]


@pytest.mark.parametrize("seed", range(200))
def test_smallest_passing_k_returns_the_true_smallest_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    passing = {k for k in range(n + 1) if rng.random() < rng.uniform(0.05, 0.6)}
    evaluate, calls = scripted(table_passing(n, passing))
    result = run_search(SmallestPassingK(n), evaluate, BIG)
    assert (result.best.proposal if result.best else None) == (min(passing) if passing else None)
    assert len(calls) == len(set(calls))  # no k is tried twice
