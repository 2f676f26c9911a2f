"""`requant loadtest` against a tiny model really served by `mlflow models serve` on 127.0.0.1.

The numbers depend on the machine: the test checks that they are measured, recorded on the
version's run and bounded by the budget, never their values (benchmarks/loadtest_default.py
measures the default winner).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import psutil
import pytest

from flows.cli import main
from tasks.config.loading import load_settings
from tasks.track import Tracker
from tests.registry_helpers import register_serving_version
from tests.test_rollout import write_params

BUDGET = {"start_rps": 4, "step_factor": 2, "step_seconds": 2, "max_steps": 3, "max_requests": 40, "max_seconds": 8,
          "slo_p95_ms": 2000}


def started_by_loadtest() -> list[str]:
    """Live processes under this one that a load test starts: the model server and the load driver."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            line = " ".join(process.cmdline())
            if process.status() != psutil.STATUS_ZOMBIE and ("models serve" in line or "loadtest_driver" in line
                                                             or "scoring_server" in line):
                found.append(line)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture
def served_project(tmp_path, minilm_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = write_params(tmp_path, loadtest=BUDGET)
    (tmp_path / "prepared").mkdir()
    pd.DataFrame({"text": ["I lost my card", "my top up failed", "where is my refund?"] * 4,
                  "label": ["card_lost", "top_up", "refund"] * 4}).to_csv(tmp_path / "prepared" / "evaluation.csv",
                                                                           index=False)
    tracker = Tracker(load_settings(params).registry)
    version = register_serving_version(tracker, tmp_path / "w", minilm_dir, 1, "key-1", throughput_per_s=400.0)
    tracker.move_alias(version, tmp_path / ".requant")
    return params, tracker, version


def test_loadtest_measures_capacity_records_it_on_the_version_run_and_stays_in_budget(served_project, capsys):
    params, tracker, version = served_project
    assert main(["loadtest", "--params", params, "--reprice", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # The server and the load driver were stopped: nothing the test started is left running.
    assert not started_by_loadtest()

    served = tracker.serving_version(version)
    run = tracker.client.get_run(served.run_id)  # the candidate run that logged the version
    metrics = run.data.metrics
    assert printed["run_id"] == served.run_id
    assert 0 < metrics["loadtest_requests"] <= BUDGET["max_requests"]
    assert metrics["loadtest_seconds"] <= BUDGET["max_seconds"] + 1
    assert 1 <= metrics["loadtest_steps"] <= BUDGET["max_steps"]
    assert metrics["loadtest_slo_p95_ms"] == BUDGET["slo_p95_ms"]
    assert 0 <= metrics["loadtest_error_rate"] <= 1 and metrics["loadtest_capacity_rps"] >= 0
    # Compared with what the cost model assumed (the run's priced throughput), and repriced.
    assert metrics["loadtest_assumed_sentences_per_s"] == 400.0
    assert metrics["loadtest_capacity_ratio"] == pytest.approx(metrics["loadtest_capacity_sentences_per_s"] / 400.0)
    if metrics["loadtest_capacity_rps"] > 0:
        assert metrics["loadtest_monthly_cost_usd"] > 0 and served.tags["requant.served_monthly_cost_usd"]
    steps = printed["steps"]
    assert len(steps) == metrics["loadtest_steps"] and sum(s["issued"] for s in steps) == metrics["loadtest_requests"]
    for step in steps:  # every step measured latency, errors, the server's CPU and the generator's own
        assert step["requests"] > 0 and step["p95_ms"] > 0 and step["server_cpu_percent"] >= 0
        assert step["generator_cpu_percent"] > 0 and step["phase"] in ("ramp", "descend", "refine")
    # The capacity interval: its low end is the capacity, its high end the failed rate (when one failed).
    assert printed["capacity_low_rps"] == metrics["loadtest_capacity_rps"] == metrics["loadtest_capacity_low_rps"]
    assert metrics["loadtest_generator_cpu_percent"] > 0 and metrics["loadtest_resolved"] in (0.0, 1.0)
    if printed["capacity_high_rps"] is not None:
        assert metrics["loadtest_capacity_high_rps"] == printed["capacity_high_rps"] > 0
    recorded = Path(tracker.client.download_artifacts(served.run_id, "loadtest.json"))
    assert json.loads(recorded.read_text())["result"]["steps"] == steps


def test_loadtest_of_an_unset_alias_fails_with_one_line_and_starts_no_server(served_project, capsys):
    params, _, _ = served_project
    capsys.readouterr()
    assert main(["loadtest", "--params", params, "--version", "challenger"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "@challenger is not set" in err
    assert not started_by_loadtest()


def step(offered, achieved, p95, failures=0, requests=100, failed_because=None, phase="ramp"):
    return {"phase": phase, "offered_rps": offered, "achieved_rps": achieved, "p95_ms": p95, "p50_ms": p95 / 2,
            "requests": requests, "issued": requests, "failures": failures, "users": 4,
            "error_rate": failures / requests, "server_cpu_percent": 50.0, "generator_cpu_percent": 5.0,
            "failed_because": failed_because}


def test_capacity_is_the_best_step_that_held_and_a_ramp_no_step_failed_is_a_lower_bound():
    from tasks.measure.loadtest import summarise

    ramp = {"steps": [step(10, 10, 20), step(20, 19.5, 60), step(40, 30, 400, failures=5, failed_because="p95 400 ms")],
            "stop_reason": "step at 40.0 requests/s failed", "requests": 300, "seconds": 30.0}
    result = summarise(ramp, 100.0, texts_per_request=4)
    assert result.capacity_rps == 19.5 and result.capacity_sentences_per_s == 78.0 and result.p95_ms_at_capacity == 60
    assert result.error_rate == 5 / 300 and result.limit_found
    budget_ended = summarise({**ramp, "steps": ramp["steps"][:2], "stop_reason": "time budget spent"}, 100.0, 1)
    assert budget_ended.capacity_rps == 19.5 and not budget_ended.limit_found
    nothing_held = summarise({**ramp, "steps": ramp["steps"][2:]}, 100.0, 1)
    assert nothing_held.capacity_rps == 0 and nothing_held.p95_ms_at_capacity is None


def refined_ramp(resolved=True):
    """A driver's output: ramp 10, 20 (held), 40 (failed), then refinement at 28.3 (held) and 33.6 (failed)."""
    steps = [step(10, 10, 20), step(20, 19.5, 60), step(40, 30, 400, failed_because="p95 400 ms"),
             step(28.3, 28.0, 80, phase="refine"), step(33.6, 31, 150, failed_because="p95 150 ms", phase="refine")]
    return {"steps": steps, "stop_reason": "resolved: held 28.3, failed 33.6 requests/s (within 20%)", "requests": 500,
            "seconds": 50.0, "held_rps": 28.3, "failed_rps": 33.6, "resolved": resolved, "resolution": 0.2,
            "generator_cpu_percent": 4.0}


def test_capacity_is_an_interval_from_the_best_held_step_to_the_lowest_failed_rate_above_it():
    from tasks.measure.loadtest import summarise

    result = summarise(refined_ramp(), 100.0, texts_per_request=1)
    assert result.capacity_rps == result.capacity_low_rps == 28.0 and result.capacity_high_rps == 33.6
    assert result.resolved and result.resolution == 0.2 and result.generator_cpu_percent == 4.0
    metrics = result.metrics()
    assert metrics["loadtest_capacity_high_rps"] == 33.6 and metrics["loadtest_resolved"] == 1.0
    assert metrics["loadtest_generator_cpu_percent"] == 4.0 and metrics["loadtest_capacity_low_rps"] == 28.0
    # Output without the interval keys (an older driver): the same interval from the steps.
    older = {k: v for k, v in refined_ramp().items() if k not in ("held_rps", "failed_rps", "resolved", "resolution",
                                                                   "generator_cpu_percent")}
    again = summarise(older, 100.0, 1)
    assert again.capacity_high_rps == 33.6 and not again.resolved  # 33.6 / 28.3 - 1 > the default 10%
    assert "loadtest_generator_cpu_percent" not in again.metrics()


def test_render_prints_the_interval_the_phase_of_each_step_and_the_generator_cpu():
    from tasks.measure.loadtest import CapacityComparison, render, summarise

    comparison = CapacityComparison(served_sentences_per_s=28.0, assumed_sentences_per_s=None,
                                    assumed_monthly_cost_usd=None, served_cost=None)
    text = render(summarise(refined_ramp(), 100.0, 1), comparison, "3")
    assert "served capacity: between 28.0 and 33.6 requests/s (resolved to within 20%)" in text
    assert "load generator: 4% of one core" in text
    rows = [line for line in text.splitlines() if line.startswith(("ramp", "refine"))]
    assert [row.split()[0] for row in rows] == ["ramp"] * 3 + ["refine"] * 2
    unresolved = render(summarise(refined_ramp(resolved=False), 100.0, 1), comparison, "3")
    assert "between 28.0 and 33.6 requests/s (not resolved to within 20%: raise loadtest.max_steps" in unresolved
    budget_ended = summarise({**refined_ramp(), "steps": refined_ramp()["steps"][:2], "failed_rps": None,
                              "resolved": False}, 100.0, 1)
    assert "served capacity: at least 19.5 requests/s" in render(budget_ended, comparison, "3")
    nothing_held = summarise({**refined_ramp(), "steps": refined_ramp()["steps"][2:3], "held_rps": None,
                              "failed_rps": 40, "resolved": False}, 100.0, 1)
    assert "served capacity: below 40.0 requests/s" in render(nothing_held, comparison, "3")
