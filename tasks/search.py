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


class SmallestKeptPrefix:
    """Find the smallest k such that keeping the k most sensitive groups in FP32 passes.

    Keeping more groups in FP32 only makes a model bigger and slower, and (by the sensitivity
    ranking) more accurate: so once k passes, no k' > k can be cheaper, and once k fails, no
    k' < k can pass. It tries k = 0 first, then binary-searches [0, n]; once the bounds cross,
    nothing cheaper can still pass. Proposals are the integers k.
    """

    def __init__(self, n_groups: int) -> None:
        self.n_groups = n_groups

    def propose(self, trials: list[Trial[int]]) -> int | None:
        if not trials:
            return 0  # everything quantized: the cheapest point, and often good enough
        failed = [t.proposal for t in trials if not t.passed]
        passed = [t.proposal for t in trials if t.passed]
        low = max(failed) + 1 if failed else 0  # every k at or below a failed k fails too
        high = min(passed) - 1 if passed else self.n_groups  # only k below the smallest pass is cheaper
        if low > high:
            return None
        return (low + high) // 2
