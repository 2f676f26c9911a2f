"""The search loop with scripted evaluations: no model, no quantizer."""

import itertools

from tasks.search import Budget, SmallestKeptPrefix, Trial, run_search

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


def monotone_table(n, smallest_passing, cost_per_group=10.0):
    return {k: (k >= smallest_passing, 100 + cost_per_group * k, 0.90 + 0.001 * k) for k in range(n + 1)}


def test_smallest_kept_prefix_finds_the_smallest_passing_k_in_log_trials():
    evaluate, calls = scripted(monotone_table(26, smallest_passing=5))
    result = run_search(SmallestKeptPrefix(26), evaluate, BIG)
    assert result.best.proposal == 5
    assert calls[0] == 0 and len(calls) <= 7  # k=0, then a binary search over 26
    assert result.stop_reason == "no cheaper candidate can still pass"


def test_smallest_kept_prefix_stops_after_one_trial_when_everything_quantized_passes():
    evaluate, calls = scripted(monotone_table(26, smallest_passing=0))
    assert run_search(SmallestKeptPrefix(26), evaluate, BIG).best.proposal == 0 and calls == [0]


def test_smallest_kept_prefix_when_nothing_passes():
    evaluate, _ = scripted(monotone_table(8, smallest_passing=99))
    result = run_search(SmallestKeptPrefix(8), evaluate, BIG)
    assert result.best is None and len(result.trials) <= 5
