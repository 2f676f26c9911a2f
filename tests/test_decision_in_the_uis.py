"""What a reviewer sees in the MLflow UI and the Prefect UI after a run, read back through their APIs:
verdicts, descriptions, short run names, lineage, inputs, true durations, system metrics, the Pareto
plot, Data Docs, the cost analysis, the Prefect artifacts, and `requant report`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks import track
from tests.conftest import tiny_project

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def decided(tmp_path_factory, tiny_model_folder, prefect_server):
    from flows.requantize import requantize

    tmp = tmp_path_factory.mktemp("ui")
    # tiny_project keeps the speed screen off: every candidate here is scored and FP32 is priced (the savings
    # vs FP32 below), whatever the tiny models' timing says.
    project = tiny_project(tmp, tiny_model_folder, quantize={"candidates": [
        {"name": "fp32", "recipe": "fp32"},
        {"name": "int8-dynamic", "recipe": "int8-dynamic", "config": {"per_channel": [False, True]}}]})
    summary = requantize(params_path=str(project / "params.yaml"), model_uri=str(tiny_model_folder))
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    children = client.search_runs([client.get_run(summary.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary.parent_run_id}'")
    return project, summary, client, {r.data.tags[track.TAG_CANDIDATE]: r for r in children}


def test_every_candidate_run_carries_its_verdict_and_reason(decided):
    _, summary, _, children = decided
    assert summary.outcome == "promoted"
    for name, run in children.items():
        verdict = run.data.tags["requant.verdict"]
        assert verdict == ("winner" if name == summary.winner else "pass" if run.data.metrics["passed_bar"] else "fail")
        assert run.data.metrics["is_winner"] == float(name == summary.winner)
        assert "hard_slice_relative_loss" in run.data.metrics
        assert run.data.tags["requant.reason"] and run.data.tags["mlflow.note.content"].startswith(f"**{verdict.upper()}")


def test_one_link_opens_the_decisions_candidates_cheapest_first_with_verdict_cost_and_accuracy(decided):
    _, summary, client, children = decided
    parent = client.get_run(summary.parent_run_id)
    experiment = client.get_experiment(parent.info.experiment_id)
    link = parent.data.tags["requant.candidates_view"]
    assert link.startswith(f"#/experiments/{experiment.experiment_id}/runs?viewStateShareKey=")
    view = json.loads(experiment.tags["mlflow.sharedViewState." + link.split("viewStateShareKey=")[1]])
    # The UI runs the view's filter and order as a search: they select this decision's candidates, cheapest first.
    order = f"{view['orderByKey']} {'ASC' if view['orderByAsc'] else 'DESC'}"
    found = client.search_runs([experiment.experiment_id], filter_string=view["searchFilter"], order_by=[order])
    assert {r.info.run_id for r in found} == {r.info.run_id for r in children.values()}
    costs = [r.data.metrics["monthly_cost_usd"] for r in found if "monthly_cost_usd" in r.data.metrics]
    assert len(costs) >= 2 and costs == sorted(costs)
    shown = {column.split(".", 1)[1].strip("`"): column.split(".", 1)[0] for column in view["selectedColumns"]}
    assert shown == {"requant.verdict": "tags", "monthly_cost_usd": "metrics", "accuracy": "metrics",
                     "relative_accuracy_loss": "metrics", "requant.reason": "tags"}
    for run in children.values():
        assert link in run.data.tags["mlflow.note.content"]


def test_cost_then_accuracy_are_each_candidate_runs_first_metrics(decided):
    # MLflow's compare view plots the first metric all compared runs share, in logged order.
    _, _, _, children = decided
    for run in children.values():
        first = list(run.data.metrics)[:2]
        expected = [k for k in ("monthly_cost_usd", "accuracy") if k in run.data.metrics]
        assert first[:len(expected)] == expected, first


def test_run_names_are_short_and_distinct_with_the_full_spec_in_a_tag(decided):
    _, _, _, children = decided
    names = [r.info.run_name for r in children.values()]
    assert len(set(names)) == len(names) and max(len(n) for n in names) <= 20
    assert children["int8-dynamic[per_channel=true]"].info.run_name == "int8 per-ch"


def test_descriptions_tell_the_decision_the_cost_and_link_the_version_to_its_run(decided):
    _, summary, client, _ = decided
    parent = client.get_run(summary.parent_run_id)
    note = parent.data.tags["mlflow.note.content"]
    for part in ("## Decision", "## Cost", "## Candidates", "Savings vs FP32", "paid back by", summary.winner):
        assert part in note
    version = client.get_model_version("minilm-banking77-serving", summary.promoted_version)
    assert summary.parent_run_id in version.description and version.tags[track.TAG_PARENT_RUN] == summary.parent_run_id
    assert f"-> version {summary.promoted_version}" in client.get_registered_model("minilm-banking77-serving").description
    assert parent.data.tags[track.TAG_PROMOTED_VERSION] == summary.promoted_version


def test_lineage_user_source_commit_and_data_inputs_on_every_run(decided):
    _, summary, client, children = decided
    for run in [client.get_run(summary.parent_run_id), *children.values()]:
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"] == "flows.requantize"
        assert len(run.data.tags["mlflow.source.git.commit"]) == 40
        contexts = {i.tags[0].value: i.dataset.name for i in run.inputs.dataset_inputs}
        assert contexts == {"evaluation": "evaluation", "calibration": "calibration"}


def test_candidate_runs_span_their_own_work_and_the_parent_has_system_metrics(decided):
    _, summary, client, children = decided
    for run in children.values():
        seconds = (run.info.end_time - run.info.start_time) / 1000
        assert seconds >= run.data.metrics["build_seconds"] + run.data.metrics["score_seconds"] - 0.5
    parent = client.get_run(summary.parent_run_id)
    assert any(key.startswith("system/cpu_utilization") for key in parent.data.metrics)


def test_artifacts_pareto_data_docs_cost_analysis_and_report(decided):
    project, summary, client, _ = decided
    artifacts = {a.path for a in client.list_artifacts(summary.parent_run_id)}
    assert {"pareto.png", "decision.json", "decision.md", "report.txt", "data_docs"} <= artifacts
    docs = {a.path for a in client.list_artifacts(summary.parent_run_id, "data_docs")}
    assert "data_docs/index.html" in docs
    record = json.loads(Path(client.download_artifacts(summary.parent_run_id, "decision.json")).read_text())
    cost = record["cost_analysis"]
    assert cost["serving"] == summary.winner and cost["run_seconds"] > 0 and cost["run_cost_usd"] > 0
    assert cost["savings_vs_fp32_yearly_usd"] == pytest.approx(cost["savings_vs_fp32_monthly_usd"] * 12)
    assert "cost analysis:" in summary.report

    done = subprocess.run([sys.executable, "-m", "flows.cli", "report", "--params", str(project / "params.yaml"),
                           "--out", str(project / "reports")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    paths = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert "<table>" in Path(paths["html"]).read_text() and "## Cost" in Path(paths["markdown"]).read_text()


def test_the_decision_is_a_prefect_artifact_on_the_flow_run(decided):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    _, summary, _, _ = decided

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[summary.flow_run_id])))

    artifacts = {a.key: a for a in asyncio.run(read())}
    assert {"requant-candidates", "requant-decision"} <= set(artifacts)
    table = artifacts["requant-candidates"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert {r["candidate"] for r in rows} == set(summary.decision["candidates"])
    assert summary.winner in artifacts["requant-decision"].data
