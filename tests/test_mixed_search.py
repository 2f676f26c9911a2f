"""The mixed-precision search wired to candidates, with scripted measurements (no model)."""

from tasks.build.candidates import BuiltCandidate
from tasks.decide.mixed_search import search_kept_fp32, trial_spec
from tasks.decide.search import Budget
from tasks.evaluate.candidates import MeasuredCandidate
from tasks.measure.cost import CostEstimate
from tasks.measure.scoring import QualityMetrics
from tasks.measure.sensitivity import GroupSensitivity
from tasks.measure.timing import SpeedMetrics

RANKING = [GroupSensitivity(f"layer.{i} ffn-up", f"node{i}", "MatMul", 1.0 / (i + 1), 0.0) for i in range(6)]


def scripted(spec) -> MeasuredCandidate:
    """Accuracy grows and cost grows with every group kept in FP32."""
    k = len(spec.config["nodes_to_exclude"])
    speed = SpeedMetrics(1, 2, 1, 1, 600 - 40 * k, 590 - 40 * k, 610 - 40 * k, 100, 23 + 4 * k)
    return MeasuredCandidate(
        BuiltCandidate(spec.name, spec.recipe, "int8", spec.config, f"h{k}"),
        quality=QualityMetrics(0.90 + 0.005 * k, 0.9, 0.9, 0.7, 100, 10), speed=speed,
        cost=CostEstimate("p", 3 + k, 100.0 + 10 * k, 0.1))


def test_trial_spec_keeps_the_k_most_sensitive_nodes_in_fp32():
    spec = trial_spec(RANKING, 2, {"per_channel": True})
    assert spec.recipe == "int8-dynamic" and spec.config["nodes_to_exclude"] == ["node0", "node1"]
    assert spec.config["per_channel"] is True


def test_search_kept_fp32_returns_the_smallest_passing_k_and_records_trials():
    result = search_kept_fp32(lambda: RANKING, {"per_channel": True}, scripted,
                              passes=lambda m: m.quality.accuracy >= 0.915, budget=Budget(10, 1e9))
    assert result.record["best_k"] == 3
    assert result.record["kept_fp32"] == ["layer.0 ffn-up", "layer.1 ffn-up", "layer.2 ffn-up"]
    assert result.record["stop_reason"] == "no cheaper candidate can still pass"
    assert [t["k"] for t in result.record["trials"]][0] == 0
    assert len(result.measured) == len(result.record["trials"])


class Counting:
    """Counts how often the search asks for the sensitivity ranking and measures each k."""

    def __init__(self) -> None:
        self.rankings, self.measured = 0, []

    def rank(self):
        self.rankings += 1
        return RANKING

    def measure(self, spec):
        self.measured.append(len(spec.config["nodes_to_exclude"]))
        return scripted(spec)


def test_search_stops_at_k0_without_the_sensitivity_sweep_when_the_base_config_passes():
    calls = Counting()
    result = search_kept_fp32(calls.rank, {"per_channel": True}, calls.measure,
                              passes=lambda m: m.quality.accuracy >= 0.90, budget=Budget(10, 1e9))
    assert calls.rankings == 0 and calls.measured == [0]
    assert result.ranking is None and result.record["sensitivity_computed"] is False
    assert result.record["best_k"] == 0 and result.record["kept_fp32"] == []
    assert "k = 0" in result.record["stop_reason"] and "sensitivity not computed" in result.record["stop_reason"]
    assert [t["k"] for t in result.record["trials"]] == [0] and len(result.measured) == 1


def test_search_ranks_once_and_measures_k0_once_when_the_base_config_fails():
    calls = Counting()
    result = search_kept_fp32(calls.rank, {"per_channel": True}, calls.measure,
                              passes=lambda m: m.quality.accuracy >= 0.915, budget=Budget(10, 1e9))
    assert calls.rankings == 1 and calls.measured.count(0) == 1
    assert result.ranking == RANKING and result.record["sensitivity_computed"] is True
    assert result.record["best_k"] == 3
