"""Screening and score reuse in the real flow (tiny model, Prefect's test server, MLflow on sqlite):
the same winner with screening on and off, a rerun scores nothing again, new data re-scores without
re-quantizing."""

import pandas as pd
import pytest
import yaml

from tests.conftest import tiny_project

pytestmark = pytest.mark.e2e


def set_screening(project, enabled: bool, speed: bool = False) -> None:
    """Accuracy screening on or off; the speed screen off unless asked (its deferrals depend on timing)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["screening"] = {"enabled": enabled, "alpha": 0.01, "first_rows": 16}
    params["evaluate"]["speed_screening"] = {"enabled": speed}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def reselect(decision: dict, speeds_from: dict) -> str | None:
    """Selection on one run's quality numbers and another run's speeds (a screened-out candidate stays out)."""
    from tasks.config.settings import QualityBar
    from tasks.decide.selection import Candidate, Reference, select

    candidates = []
    for name, c in decision["candidates"].items():
        speed = speeds_from["candidates"][name]
        if c["error"] or name in decision["screening"]["screened_out"] or "throughput_per_s" not in speed:
            candidates.append(Candidate(name=name, recipe=c["recipe"], error=c["error"] or "screened out"))
            continue
        candidates.append(Candidate(
            name=name, recipe=c["recipe"], accuracy=c["accuracy"], hard_slice_accuracy=c["hard_slice_accuracy"],
            latency_p95_ms=speed["latency_p95_ms"], throughput_per_s=speed["throughput_per_s"],
            throughput_low_per_s=speed["throughput_low_per_s"], throughput_high_per_s=speed["throughput_high_per_s"],
            monthly_cost_usd=speed["monthly_cost_usd"], size_mb=speed["size_mb"],
            accuracy_loss_high=(c["relative_accuracy_loss_interval"] or [None, None])[1],
            hard_slice_loss_high=(c["hard_slice_relative_loss_interval"] or [None, None])[1]))
    return select(candidates, Reference(**decision["reference"]), QualityBar(**decision["bar"])).winner


def test_screening_keeps_the_winner_and_reruns_reuse_scores(tmp_path, tiny_model_folder, prefect_server, monkeypatch):
    from flows.requantize import requantize

    project = tiny_project(tmp_path, tiny_model_folder, quantize={"candidates": [
        {"name": "fp32", "recipe": "fp32"},
        {"name": "int8", "recipe": "int8-dynamic", "config": {"per_channel": [False, True]}}]})
    params = str(project / "params.yaml")

    def run(work: str, **kwargs):
        return requantize(params_path=params, model_uri=str(tiny_model_folder), work_dir=str(tmp_path / work), **kwargs)

    set_screening(project, True)
    screened = run("work-a")
    set_screening(project, False)
    with monkeypatch.context() as env:  # its own registry: no production model from the first run
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow-off.db'}")
        full = run("work-b")
    # Contenders are measured on the same rows and batches either way: the same accuracies, intervals
    # and verdicts on the bar.
    for name, numbers in full.decision["candidates"].items():
        if name not in screened.decision["screening"]["screened_out"]:
            for key in ("accuracy", "relative_accuracy_loss_interval", "hard_slice_relative_loss_interval"):
                assert screened.decision["candidates"][name][key] == numbers[key]
        assert screened.decision["verdicts"][name]["passed_bar"] == full.decision["verdicts"][name]["passed_bar"]
    # The tiny candidates are equally fast within timing noise, so each run's own timing may pick a
    # different one; on the same speeds, the screened run's quality numbers pick the same winner.
    assert reselect(screened.decision, speeds_from=full.decision) == full.winner is not None
    assert reselect(full.decision, speeds_from=screened.decision) == screened.winner is not None
    assert screened.decision["screening"]["enabled"] and not full.decision["screening"]["enabled"]
    assert full.decision["screening"]["full_evaluations"] == full.decision["screening"]["candidates"] == 3
    assert screened.decision["screening"]["rows_scored"] > 0

    # A forced rerun on the same work folder: every graph (production too: it is the winner's graph)
    # was scored before, so ONNX Runtime scores no row; the timing is measured again.
    set_screening(project, True)
    again = run("work-a", force=True)
    assert again.decision["screening"]["rows_scored"] == 0
    assert set(again.decision["screening"]["scores_reused"]) == set(again.decision["candidates"])
    assert all(c["timing_seconds"] > 0 for c in again.decision["candidates"].values() if c["error"] is None)

    # New evaluation data: nothing is re-quantized (candidates are keyed by calibration data), every
    # candidate is scored on the new rows.
    test_csv = yaml.safe_load((project / "params.yaml").read_text())["data"]["test_csv"]
    frame = pd.read_csv(test_csv)
    frame.groupby("category").head(20).to_csv(test_csv, index=False)
    new_data = run("work-a")
    assert new_data.outcome != "already-decided"
    candidates = {n: c for n, c in new_data.decision["candidates"].items() if not c["is_production"]}
    assert all(c["reused"] for c in candidates.values())
    rows = new_data.decision["rows"]["selection"]
    assert new_data.decision["screening"]["rows_scored"] == rows * len(candidates)
    # Only production is reused: its graph is one of the candidates', scored moments before in this run.
    production = next(n for n, c in new_data.decision["candidates"].items() if c["is_production"])
    assert new_data.decision["screening"]["scores_reused"] == [production]
    assert new_data.decision["candidates"][production]["model_sha256"] in {c["model_sha256"] for c in candidates.values()}


def test_speed_screen_in_the_flow_defers_only_behind_a_passing_faster_rival(tmp_path, tiny_model_folder, prefect_server):
    """One real run with the speed screen on: whatever the timing defers, the record says against whom
    and by how much, a deferred candidate is neither scored nor timed, and a faster rival passes."""
    from flows.requantize import requantize

    project = tiny_project(tmp_path, tiny_model_folder, quantize={"candidates": [
        {"name": "fp32", "recipe": "fp32"},
        {"name": "int8", "recipe": "int8-dynamic", "config": {"per_channel": [False, True]}}]})
    set_screening(project, True, speed=True)
    summary = requantize(params_path=str(project / "params.yaml"), model_uri=str(tiny_model_folder),
                         work_dir=str(tmp_path / "work"))
    screening = summary.decision["screening"]
    speed = screening["speed"]
    assert speed["enabled"] and speed["seconds"] > 0
    assert set(speed["rates_per_round"]) == set(summary.decision["candidates"])
    assert all(len(rates) == speed["rounds"] for rates in speed["rates_per_round"].values())
    deferred = set(screening["speed_screened_out"])
    assert screening["full_evaluations"] == screening["candidates"] - len(deferred) - len(screening["screened_out"])
    for name in deferred:
        record = summary.decision["candidates"][name]
        assert "accuracy" not in record and "throughput_per_s" not in record and record["rows_scored"] == 0
        beaten_by = speed["deferred"][name]["beaten_by"]
        assert all(b["ratio_low"] > 1 + speed["margin"] for b in beaten_by)
        assert any(summary.decision["verdicts"][b["rival"]]["passed_bar"] for b in beaten_by)
    assert summary.winner not in deferred
