"""Challenger, shadow comparison, flip and rollback against a real sqlite MLflow registry.

The versions are tiny text-in serving models (tests/registry_helpers.py) that give one label to
every text, so agreement and accuracy are known from how they were built.
"""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from flows.cli import main
from tasks import track
from tasks.config.loading import load_settings
from tasks.serve.rollback import blocking_rollback
from tasks.serve.rollout import ShadowResult, judge_rollout
from tasks.track import Tracker
from tests.conftest import REPO
from tests.registry_helpers import LABELS, register_serving_version

MODEL = "minilm-banking77-serving"


def write_params(root, **sections) -> str:
    """The repo's params.yaml with its registry (and `sections`) pointed into `root`."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["registry"].update({"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": str(root / "art")})
    params["data"]["output_dir"] = str(root / "prepared")
    for name, values in sections.items():
        params[name].update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


@pytest.fixture
def registry(tmp_path, minilm_dir, monkeypatch):
    """A registry with production = version 1 (says top_up), a labelled sample where top_up is right 3 times in 4."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = write_params(tmp_path)
    tracker = Tracker(load_settings(params).registry)
    first = register_serving_version(tracker, tmp_path / "w", minilm_dir, LABELS.index("top_up"), "key-1")
    tracker.move_alias(first, tmp_path / ".requant")
    sample = tmp_path / "traffic.csv"
    pd.DataFrame({"text": ["I lost my card", "top up failed", "where is my refund", "exchange rate?"] * 3,
                  "label": ["top_up", "top_up", "top_up", "refund"] * 3}).to_csv(sample, index=False)
    return params, tracker, sample


def runs_of(tracker, kind):
    return tracker.client.search_runs([tracker.experiment_id()], filter_string=f"tags.`requant.kind` = '{kind}'")


def test_challenger_that_agrees_is_shadowed_then_flipped_to_production(registry, tmp_path, minilm_dir, capsys):
    params, tracker, sample = registry
    second = register_serving_version(tracker, tmp_path / "w", minilm_dir, LABELS.index("top_up"), "key-2")
    tracker.move_alias(second, tmp_path / ".requant", alias="challenger")
    assert str(tracker.production().version) == "1"  # a challenger does not touch production

    assert main(["rollout", "--params", params, "--sample", str(sample)]) == 0
    assert "flipped: version 2 is now production" in capsys.readouterr().out
    assert str(tracker.production().version) == second and tracker.challenger() is None
    assert tracker.production().tags[track.TAG_PREVIOUS_PRODUCTION] == "1"  # where a rollback would go
    [run] = runs_of(tracker, "rollout")
    assert run.info.status == "FINISHED" and run.data.tags["requant.rollout_outcome"] == "flipped"
    assert run.data.metrics["agreement"] == 1.0 and run.data.metrics["rows"] == 12
    assert run.data.metrics["production_accuracy"] == run.data.metrics["challenger_accuracy"] == 0.75
    assert run.data.metrics["challenger_latency_p95_ms"] > 0


def test_challenger_that_disagrees_beyond_the_bar_is_not_flipped(registry, tmp_path, minilm_dir, capsys):
    params, tracker, sample = registry
    other = register_serving_version(tracker, tmp_path / "w", minilm_dir, LABELS.index("refund"), "key-3")
    tracker.move_alias(other, tmp_path / ".requant", alias="challenger")

    assert main(["rollout", "--params", params, "--sample", str(sample)]) == 0
    out = capsys.readouterr().out
    assert "not flipped: production stays version 1" in out and "below rollout.min_agreement" in out
    assert str(tracker.production().version) == "1" and str(tracker.challenger().version) == other
    [run] = runs_of(tracker, "rollout")
    assert run.data.tags["requant.rollout_outcome"] == "not-flipped" and run.data.metrics["agreement"] == 0.0


def test_rollout_without_a_challenger_fails_with_one_line_and_moves_nothing(registry, capsys):
    params, tracker, sample = registry
    assert main(["rollout", "--params", params, "--sample", str(sample)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "@challenger is not set" in err and "registry.rollout: challenger" in err
    assert str(tracker.production().version) == "1"


def test_rollout_with_a_sample_lacking_a_text_column_fails_with_one_line(registry, tmp_path, minilm_dir, capsys):
    params, tracker, _ = registry
    tracker.move_alias(register_serving_version(tracker, tmp_path / "w", minilm_dir, 1, "key-2"), tmp_path / ".requant",
                       alias="challenger")
    bad = tmp_path / "bad.csv"
    bad.write_text("query\nhello\n")
    capsys.readouterr()
    assert main(["rollout", "--params", params, "--sample", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no text column" in err and "--text-column" in err
    assert str(tracker.production().version) == "1"


def test_rollback_moves_production_back_and_records_who_when_why(registry, tmp_path, minilm_dir, monkeypatch, capsys):
    params, tracker, _ = registry
    second = register_serving_version(tracker, tmp_path / "w", minilm_dir, 1, "key-2")
    tracker.move_alias(second, tmp_path / ".requant")
    monkeypatch.setenv("REQUANT_USER", "oncall-ana")

    assert main(["rollback", "--params", params, "--reason", "p95 doubled after the flip"]) == 0
    assert "production is version 1 again (was 2), by oncall-ana" in capsys.readouterr().out
    assert str(tracker.production().version) == "1"
    rolled = MlflowClient(tracker.uri).get_model_version(MODEL, second).tags
    assert rolled[track.TAG_ROLLED_BACK_BY] == "oncall-ana" and rolled[track.TAG_ROLLED_BACK_TO] == "1"
    assert rolled[track.TAG_ROLLBACK_REASON] == "p95 doubled after the flip" and rolled[track.TAG_ROLLED_BACK_AT]
    [run] = runs_of(tracker, "rollback")
    assert run.info.status == "FINISHED" and run.info.run_id == rolled[track.TAG_ROLLBACK_RUN]
    assert run.data.tags["requant.from_version"] == "2" and run.data.tags[track.TAG_ROLLED_BACK_TO] == "1"
    [record] = tracker.rolled_back_versions()
    assert record["version"] == second and record["decision_key"] == "key-2" and record["by"] == "oncall-ana"
    # What the nightly run consults before promoting: the same key, or the same config, is blocked.
    assert blocking_rollback("key-2", "", tracker.rolled_back_versions()) == record
    assert blocking_rollback("other", "hash-key-2", tracker.rolled_back_versions()) == record
    assert blocking_rollback("other", "other", tracker.rolled_back_versions()) is None


def test_rollback_with_no_earlier_version_or_no_reason_fails_and_keeps_production(registry, capsys):
    params, tracker, _ = registry
    assert main(["rollback", "--params", params, "--reason", "bad"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no earlier version" in err and "--to VERSION" in err
    assert main(["rollback", "--params", params, "--reason", "  "]) == 2
    assert "needs a reason" in capsys.readouterr().err
    assert main(["rollback", "--params", params, "--to", "9", "--reason", "bad"]) == 2
    assert "has no version 9 (versions: 1)" in capsys.readouterr().err
    assert str(tracker.production().version) == "1" and not runs_of(tracker, "rollback")


def shadow(agreement, production_accuracy=None, challenger_accuracy=None):
    loss = (None if production_accuracy is None else
            (production_accuracy - challenger_accuracy) / production_accuracy)
    return ShadowResult(200, agreement, production_accuracy, challenger_accuracy, loss, 5.0, 9.0, 4.0, 8.0, 16)


@pytest.mark.parametrize("result, flip, why", [
    (shadow(0.99), True, "agreement 99.00% >= 97.00%"),  # no labels: agreement alone
    (shadow(0.96), False, "below rollout.min_agreement"),
    (shadow(0.98, 0.90, 0.89), True, "accuracy 89.00% vs production 90.00%"),  # 1.1% relative loss, within 1.5%
    (shadow(0.98, 0.90, 0.88), False, "above quality_bar.max_relative_accuracy_loss"),  # 2.2% relative loss
    (shadow(0.97, 0.80, 0.85), True, "agreement 97.00%"),  # better than production
])
def test_rollout_rule_needs_agreement_and_accuracy_within_the_bar(result, flip, why):
    verdict = judge_rollout(result, min_agreement=0.97, max_relative_accuracy_loss=0.015)
    assert verdict.flip is flip and why in verdict.reason
