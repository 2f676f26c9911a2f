"""A bounded search for the cheapest candidate that passes, with evaluation passed in.

The loop is small on purpose (after Neural Compressor's autotune): a strategy proposes, the
injected `evaluate` builds and measures, the loop records the trial and checks its stop rules.
Unlike a first-pass-wins tuner it keeps going until the strategy says no cheaper candidate can
still pass, or the budget (trials or minutes) runs out, and returns the cheapest passing trial.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Generic, Protocol, TypeVar

P = TypeVar("P")


@dataclass(frozen=True)
class Trial(Generic[P]):
    """One evaluated proposal."""

    proposal: P
    passed: bool
    cost: float
    accuracy: float


@dataclass
class SearchResult(Generic[P]):
    """The cheapest passing trial (or None), every trial in order, and why the loop stopped."""

    best: Trial[P] | None
    trials: list[Trial[P]] = field(default_factory=list)
    stop_reason: str = ""


@dataclass(frozen=True)
class Budget:
    """How much search a run may spend."""

    max_trials: int
    max_seconds: float


class Strategy(Protocol[P]):
    """Proposes the next configuration given what was tried; None means nothing cheaper can pass."""

    def propose(self, trials: list[Trial[P]]) -> P | None: ...


def run_search(strategy: Strategy[P], evaluate: Callable[[P], Trial[P]], budget: Budget,
               clock: Callable[[], float] = time.monotonic) -> SearchResult[P]:
    """Evaluate proposals until the strategy is done or the budget is spent; keep the cheapest pass.

    Ties on cost go to the more accurate trial.
    """
    result: SearchResult[P] = SearchResult(best=None)
    start = clock()
    while True:
        if len(result.trials) >= budget.max_trials:
            result.stop_reason = f"trial budget spent ({budget.max_trials} trials)"
            break
        if clock() - start >= budget.max_seconds:
            result.stop_reason = f"time budget spent ({budget.max_seconds:.0f} s)"
            break
        proposal = strategy.propose(result.trials)
        if proposal is None:
            result.stop_reason = "no cheaper candidate can still pass"
            break
        trial = evaluate(proposal)
        result.trials.append(trial)
        if trial.passed and (result.best is None or (trial.cost, -trial.accuracy) < (result.best.cost, -result.best.accuracy)):
            result.best = trial
    return result


class SmallestPassingK:
    """Find the smallest k such that keeping the k most sensitive groups in FP32 passes.

    Cost grows with k (each group kept in FP32 makes the model bigger and slower), so the cheapest
    passing trial is the passing trial with the smallest k. Passing itself need not be monotone in
    k: quantization noise can make k=2 pass while k=3 fails, and a failed build says nothing about
    any other k. So nothing is pruned on a failure: the strategy probes k = 0, 1, 2, 4, 8, ... (a
    passing k is usually found in a few trials), and once some k passes it tries every untried
    k below it, smallest first. The first pass of that fill-in, or the probed pass when every k
    below it failed, is the answer. Only the budget can stop it early (the caller reports which k
    were left untried). Proposals are the integers k.

    Example, passing k = {2, 6, 7, 8} of 26 groups: tries 0 (fail), 1 (fail), 2 (pass); nothing
    below 2 is untried, so the answer is 2 in 3 trials.
    """

    def __init__(self, n_groups: int) -> None:
        self.n_groups = n_groups

    def probes(self) -> list[int]:
        """k = 0, then powers of two up to n, then n itself."""
        probes, k = [0], 1
        while k < self.n_groups:
            probes.append(k)
            k *= 2
        return probes + [self.n_groups] if self.n_groups not in probes else probes

    def untried_below_best(self, trials: list[Trial[int]]) -> list[int]:
        """Every k below the smallest passing k that no trial has tried (empty when the answer is proven)."""
        tried = {t.proposal for t in trials}
        passed = [t.proposal for t in trials if t.passed]
        limit = min(passed) if passed else self.n_groups + 1
        return [k for k in range(limit) if k not in tried]

    def propose(self, trials: list[Trial[int]]) -> int | None:
        tried = {t.proposal for t in trials}
        if any(t.passed for t in trials):
            below = self.untried_below_best(trials)
            return below[0] if below else None
        return next((k for k in self.probes() if k not in tried),
                    next((k for k in range(self.n_groups + 1) if k not in tried), None))
