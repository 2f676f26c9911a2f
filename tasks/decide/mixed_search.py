"""Mixed precision by search: the fewest most-sensitive groups kept in FP32 that still pass the bar.

The same search serves classifiers (groups are weight nodes, the base recipe int8-dynamic) and
decoders (groups are transformer blocks, the base recipe a weight-only one: tasks/measure/lm_sensitivity.py);
the caller says which recipe, how to build and judge a trial, and which quality figure to record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tasks.config.settings import CandidateSpec
from tasks.decide.search import Budget, SmallestPassingK, Trial, run_search
from tasks.measure.sensitivity import GroupSensitivity

STRATEGY = ("smallest k most-sensitive groups kept in FP32 (probe k = 0, 1, 2, 4, ...; then every untried k below the "
            "first pass; no monotonicity assumed)")


@dataclass
class MixedSearchResult:
    """The record for decision.json, every candidate the search measured, in order, and the sensitivity
    ranking (None when the search stopped at k = 0 without computing it)."""

    record: dict
    measured: list[Any] = field(default_factory=list)  # MeasuredCandidate, or DecoderCandidate for decoders
    ranking: list[GroupSensitivity] | None = None


def trial_spec(ranking: list[GroupSensitivity], k: int, base_config: dict, recipe: str = "int8-dynamic") -> CandidateSpec:
    """The `recipe` candidate that keeps the k most sensitive groups (every node of each) in FP32."""
    kept = {node for g in ranking[:k] for node in g.node_names}
    config = {**base_config, "nodes_to_exclude": sorted(kept | set(base_config.get("nodes_to_exclude", [])))}
    return CandidateSpec(name=f"search-keep-fp32-k{k}", recipe=recipe, config=config)


def _accuracy(measured) -> float:
    return measured.quality.accuracy if measured.quality else float("nan")


BASE_PASSES = ("k = 0 (the base config, no group kept in FP32) passes the bar; every k > 0 keeps groups in FP32 "
               "and is slower, so it cannot win: sensitivity not computed")


def search_kept_fp32(rank: Callable[[], list[GroupSensitivity]], base_config: dict,
                     measure_spec: Callable[[CandidateSpec], Any], passes: Callable[[Any], bool], budget: Budget,
                     recipe: str = "int8-dynamic", quality_of: Callable[[Any], float] = _accuracy,
                     quality_name: str = "accuracy") -> MixedSearchResult:
    """Run the bounded search over k; `measure_spec` builds and scores one candidate (or reuses one).

    Each trial is a `recipe` candidate; `quality_of` gives the figure recorded for it under
    `quality_name` (a classifier's accuracy, a decoder's token agreement).

    Trials are judged on quality alone (`passes`); every trial is timed later, side by side with
    the other candidates, and the final choice among them is selection's. The search's cost of a
    trial is k, which orders trials as their price does (more FP32 groups, bigger and slower).

    The base config (k = 0) needs no ranking and is tried first. When it passes, the search stops
    there and `rank` (the sensitivity sweep, the slow part) is never called: a trial with k > 0 is
    the same graph with groups left in FP32, slower and bigger, so it could not be chosen over
    k = 0. Only when k = 0 fails is the ranking computed and the search run.
    """
    base = measure_spec(trial_spec([], 0, base_config, recipe))
    if passes(base):
        record = {"strategy": STRATEGY, "recipe": recipe, "stop_reason": BASE_PASSES, "best_k": 0,
                  "best_candidate": base.built.name, "kept_fp32": [], "untried_below_best": [],
                  "sensitivity_computed": False,
                  "trials": [{"k": 0, "candidate": base.built.name, "passed": True, quality_name: quality_of(base),
                              "error": base.error}]}
        return MixedSearchResult(record, [base], ranking=None)
    ranking = rank()
    trials: dict[int, Any] = {0: base}
    strategy = SmallestPassingK(len(ranking))

    def evaluate(k: int) -> Trial[int]:
        measured = trials[k] if k in trials else measure_spec(trial_spec(ranking, k, base_config, recipe))
        trials[k] = measured
        passed = passes(measured)
        return Trial(k, passed, float(k), quality_of(measured))

    result = run_search(strategy, evaluate, budget)
    best = result.best.proposal if result.best else None
    record = {
        "strategy": STRATEGY,
        "recipe": recipe,
        "stop_reason": result.stop_reason,
        "best_k": best,
        "best_candidate": trials[best].built.name if best is not None else None,
        "kept_fp32": [g.group for g in ranking[:best]] if best is not None else None,
        # k below the answer that the budget left untried: empty means the answer is the true smallest.
        "untried_below_best": strategy.untried_below_best(result.trials),
        "sensitivity_computed": True,
        "trials": [{"k": t.proposal, "candidate": trials[t.proposal].built.name, "passed": t.passed,
                    quality_name: t.accuracy, "error": trials[t.proposal].error} for t in result.trials],
    }
    return MixedSearchResult(record, [trials[t.proposal] for t in result.trials], ranking)
