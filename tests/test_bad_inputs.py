"""Bad input through the real `requant run`: every case refused in one line, exit 2, production unmoved.

One tiny project is set up once: a real Prefect server, MLflow on sqlite, DVC in a git repo, and a
real successful run that puts `@production` on version 1. Each case then runs the CLI against a
modified copy of the params, the data or the model, and must give exit 2, exactly one `error:` line
on stderr naming what is wrong (any other stderr line is a requant progress line), no traceback,
and leave the alias on version 1 with no new version registered.

Cases run a few at a time (real processes; DVC and promotions are serialised by their own locks).
Most fail before any server is contacted; the ones that need the flow fail at its first step that
can see the problem (the data stage, the registry, the tracking store, the model load).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests import fault_ledger
from tests.conftest import tiny_project
from tests.servers import free_port, prefect_api_server

SERVING = "minilm-banking77-serving"
PROGRESS = re.compile(r"^\d\d:\d\d:\d\d requant: ")
# An unreachable server may cost its bounded retries (MLflow: 0 + 2 + 4 s) on top of a typical case,
# never MLflow's default of ~4 minutes. Relative to the typical case, so a loaded machine does not fail it.
SERVER_WAIT_ALLOWANCE_S = 60


@dataclass(frozen=True)
class Case:
    """One bad input.

    `params` edits a copy of the project's params.yaml (dotted key -> value); `text` replaces the
    copy's whole content; neither means the project's own params.yaml is used (`params_file` names
    another, relative to the project). `model` is passed as --model (default: the tiny model).
    In strings, {inputs} is the folder of prepared bad files, {closed_port} a port nothing listens
    on, {prefect_root} the test Prefect server's root URL (an HTTP server that is not MLflow).
    """

    id: str
    expect: tuple[str, ...]
    params: dict = field(default_factory=dict)
    text: str | None = None
    params_file: str | None = None
    model: str | None = None
    env: dict = field(default_factory=dict)
    flow: bool = False  # needs the flow (a Prefect run): started first, as these take longest
    waits_on_server: bool = False  # a server that does not answer: the wait must stay bounded


CASES = [
    # ---- params: refused by load_settings before anything starts
    Case("params-file-missing", ("does-not-exist.yaml", "not found", "--params"), params_file="does-not-exist.yaml"),
    Case("params-not-yaml", ("not valid YAML",), text="data: [unclosed\n"),
    Case("params-empty-file", ("is empty", "'quantize'", "'data'"), text=""),
    Case("params-yaml-list", ("(top level)", "valid dictionary"), text="- data\n- quantize\n"),
    Case("params-unknown-section", ("'extras'", "Extra inputs"), params={"extras": {"x": 1}}),
    Case("params-unknown-key", ("data.calibration_sise",), params={"data.calibration_sise": 10}),
    Case("params-wrong-type", ("evaluate.latency_runs", "valid integer"), params={"evaluate.latency_runs": "many"}),
    Case("params-negative-size", ("data.calibration_size", "greater than or equal to 1"),
         params={"data.calibration_size": -5}),
    Case("params-zero-batch", ("evaluate.batch_size",), params={"evaluate.batch_size": 0}),
    Case("params-bar-out-of-range", ("quality_bar.max_relative_accuracy_loss", "less than 1"),
         params={"quality_bar.max_relative_accuracy_loss": 1.5}),
    Case("params-unknown-gate", ("quality_bar.gate", "'interval' or 'point'"), params={"quality_bar.gate": "strict"}),
    Case("params-empty-candidates", ("quantize.candidates", "at least 1 item"), params={"quantize.candidates": []}),
    Case("params-duplicate-candidates", ("unique", "fp32"),
         params={"quantize.candidates": [{"name": "fp32", "recipe": "fp32"}, {"name": "fp32", "recipe": "fp16"}]}),
    Case("params-empty-candidate-name", ("quantize.candidates.0.name", "at least 1 character"),
         params={"quantize.candidates": [{"name": "", "recipe": "fp32"}]}),
    Case("params-unknown-recipe", ("unknown recipe 'int2-magic'",),
         params={"quantize.candidates": [{"name": "int2", "recipe": "int2-magic"}]}),
    Case("params-unknown-recipe-field", ("config 'per_chanel'", "fields:"),
         params={"quantize.candidates": [{"name": "q", "recipe": "int8-dynamic", "config": {"per_chanel": True}}]}),
    Case("params-bad-search-base-config", ("search.base_config", "weight_typ"),
         params={"search.base_config": {"weight_typ": "QInt8"}}),
    Case("params-unknown-hardware-profile", ("measured_profile 'aws-z9'",), params={"cost.measured_profile": "aws-z9"}),
    Case("params-cpu-match-not-a-regex", ("cpu_match", "not a valid regular expression"),
         params={"cost.hardware_profiles": [{"name": "x", "usd_per_hour": 1.0, "cpu_match": "Xeon(("}]}),
    Case("params-negative-seed", ("data.seed", "greater than or equal to 0"), params={"data.seed": -1}),
    Case("params-text-bounds-contradict", ("min_text_chars (50) exceeds max_text_chars (10)",),
         params={"data.min_text_chars": 50, "data.max_text_chars": 10}),
    Case("params-min-rows-above-sample", ("min_calibration_rows (500) exceeds calibration_size (32)",),
         params={"data.min_calibration_rows": 500}),
    Case("params-unknown-task-runner", ("operations.task_runner",), params={"operations.task_runner": "celery"}),
    # ---- checked by the CLI before the flow starts (the flow checks them again where it uses them)
    Case("cpu-match-matches-nothing", ("no hardware profile matches this CPU", "cost.measured_profile"),
         params={"cost.hardware_profiles": [{"name": "z80", "usd_per_hour": 1.0, "cpu_match": "^Zilog Z80$"}]}),
    Case("data-file-missing", ("nope.csv", "not found", "data.train_csv"), params={"data.train_csv": "{inputs}/nope.csv"}),
    Case("data-path-is-folder", ("is a folder, not a file",), params={"data.test_csv": "{inputs}"}),
    Case("model-folder-missing", ("does not exist",), model="{inputs}/no-such-model"),
    Case("model-path-is-file", ("is a file, not a model folder",), model="{inputs}/model-no-encoder/requant_model.json"),
    Case("model-folder-empty", ("not a requant model folder", "missing requant_model.json, head.safetensors, encoder/"),
         model="{inputs}/model-empty"),
    Case("model-folder-no-card", ("missing requant_model.json",), model="{inputs}/model-no-card"),
    Case("model-folder-no-head", ("missing head.safetensors",), model="{inputs}/model-no-head"),
    Case("model-folder-no-encoder", ("missing encoder/",), model="{inputs}/model-no-encoder"),
    Case("model-card-not-json", ("requant_model.json is not a valid model card", "JSONDecodeError"),
         model="{inputs}/model-bad-card"),
    Case("uri-without-version", ("names no version", "models:/NAME/VERSION"), model="models:/minilm-banking77"),
    Case("uri-version-not-a-number", ("not a registry URI",), model=f"models:/{SERVING}/latest-ish"),
    Case("uri-runs-scheme", ("runs: scheme", "register the model"), model="runs:/0123456789abcdef/model"),
    Case("uri-s3-scheme", ("s3: scheme",), model="s3://bucket/models/classifier"),
    Case("prefect-server-unreachable", ("Prefect API", "Connection refused", "PREFECT_API_URL"),
         env={"PREFECT_API_URL": "http://127.0.0.1:{closed_port}/api"}, waits_on_server=True),
    Case("uri-unknown-model", ("no model named 'nope'", "requant train"), model="models:/nope/1"),
    Case("uri-unknown-alias", (f"'{SERVING}' has no alias 'nope'", "aliases: production"), model=f"models:/{SERVING}@nope"),
    Case("uri-unknown-version", ("has no version 99", "versions: 1"), model=f"models:/{SERVING}/99"),
    Case("tracking-server-unreachable", ("http://127.0.0.1:{closed_port}", "Connection refused", "registry.tracking_uri"),
         params={"registry.tracking_uri": "http://127.0.0.1:{closed_port}"}, waits_on_server=True),
    Case("tracking-uri-unsupported", ("foo://bar", "not a URI scheme MLflow supports"),
         params={"registry.tracking_uri": "foo://bar"}),
    Case("tracking-uri-not-mlflow", ("cannot be used", "Not Found", "is it an MLflow tracking server?"),
         params={"registry.tracking_uri": "{prefect_root}"}),
    # ---- refused inside the flow, at the first step that can see it
    Case("data-header-only", ("header.csv", "has a header but no rows"), params={"data.train_csv": "{inputs}/header.csv"},
         flow=True),
    Case("data-not-utf8", ("latin1.csv", "is not UTF-8", "iconv"), params={"data.train_csv": "{inputs}/latin1.csv"},
         flow=True),
    Case("data-empty-file", ("empty.csv", "is empty"), params={"data.test_csv": "{inputs}/empty.csv"}, flow=True),
    Case("data-missing-column", ("no column(s) ['text']", "data.text_column"),
         params={"data.train_csv": "{inputs}/no-text-column.csv"}, flow=True),
    Case("data-wrong-sha256", ("sha256", "expected 000000000000", "update the hash"),
         params={"data.train_sha256": "0" * 64}, flow=True),
    Case("data-calibration-larger-than-train", ("data.calibration_size is 500", "at most 120"),
         params={"data.calibration_size": 500}, flow=True),
    Case("data-unknown-label", ("data validation failed", "evaluation", "not_a_class_of_the_model"), params={"data.test_csv": "{inputs}/unknown-label.csv"},
         flow=True),
    Case("params-other-file-shares-output-dir", ("data.output_dir data/prepared", "dvc.yaml:prepare_data", "its own"),
         params={"data.output_dir": "data/prepared", "data.calibration_size": 40}, flow=True),
    # Truncated weights are caught on their safetensors header, before the flow starts.
    Case("model-head-truncated", ("head.safetensors is truncated or corrupt",), model="{inputs}/model-head-truncated"),
    Case("model-encoder-truncated", ("model.safetensors is truncated or corrupt",),
         model="{inputs}/model-encoder-truncated"),
]


@dataclass
class Outcome:
    """What one CLI run did, and the registry right after it."""

    returncode: int
    stderr: str
    seconds: float
    production_version: str | None
    versions: int


@dataclass
class Bed:
    """The shared project, its baseline, and every case's outcome."""

    db: Path
    baseline_version: str
    baseline_versions: int
    values: dict[str, str]
    outcomes: dict[str, Outcome]


def _registry_state(db: Path) -> tuple[str | None, int]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(f"sqlite:///{db}")
    try:
        alias = str(client.get_model_version_by_alias(SERVING, "production").version)
    except MlflowException:
        alias = None
    return alias, len(client.search_model_versions(f"name = '{SERVING}'"))


def _prepare_inputs(inputs: Path, project: Path, model: Path) -> None:
    """The bad files the cases point at: CSVs, and copies of the tiny model with a part missing or broken."""
    inputs.mkdir(parents=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    train = pd.read_csv(params["data"]["train_csv"])
    (inputs / "header.csv").write_text("text,category\n")
    (inputs / "empty.csv").write_bytes(b"")
    (inputs / "latin1.csv").write_bytes(train.to_csv(index=False).encode() + "café card,refund\n".encode("latin-1"))
    train.rename(columns={"text": "utterance"}).to_csv(inputs / "no-text-column.csv", index=False)
    test = pd.read_csv(params["data"]["test_csv"])
    test.loc[0, "category"] = "not_a_class_of_the_model"
    test.to_csv(inputs / "unknown-label.csv", index=False)
    (inputs / "model-empty").mkdir()
    for name, damage in {
        "model-no-card": lambda m: (m / "requant_model.json").unlink(),
        "model-no-head": lambda m: (m / "head.safetensors").unlink(),
        "model-no-encoder": lambda m: shutil.rmtree(m / "encoder"),
        "model-bad-card": lambda m: (m / "requant_model.json").write_text("{not json"),
        "model-head-truncated": lambda m: _truncate(m / "head.safetensors"),
        "model-encoder-truncated": lambda m: _truncate(m / "encoder" / "model.safetensors"),
    }.items():
        shutil.copytree(model, inputs / name)
        damage(inputs / name)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _command(case: Case, project: Path, model: Path, values: dict) -> list[str]:
    """The CLI arguments of a case, writing its params copy if it has one."""
    params_path = project / (case.params_file or "params.yaml")
    if case.text is not None or case.params:
        params_path = project / f"bad-{case.id}.yaml"
        if case.text is not None:
            params_path.write_text(case.text)
        else:
            params = yaml.safe_load((project / "params.yaml").read_text())
            # Each params file owns its prepared data (else the shared-output refusal answers first).
            params["data"]["output_dir"] = f"data/bad-{case.id}"
            for dotted, value in case.params.items():
                *path, last = dotted.split(".")
                target = params
                for key in path:
                    target = target.setdefault(key, {})
                target[last] = value.format(**values) if isinstance(value, str) else value
            params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    model_arg = (case.model or str(model)).format(**values)
    return [sys.executable, "-m", "flows.cli", "run", "--params", str(params_path), "--model", model_arg]


@pytest.fixture(scope="module")
def bed(tmp_path_factory, tiny_model_folder) -> Bed:
    """Set up the project once, promote a baseline, then run every case."""
    root = tmp_path_factory.mktemp("bad-inputs")
    with prefect_api_server(root / "prefect") as api:
        project = tiny_project(root, tiny_model_folder)
        env = {**os.environ, "PREFECT_API_URL": api}
        env.pop("MLFLOW_TRACKING_URI", None)
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--params", str(project / "params.yaml"),
                               "--model", str(tiny_model_folder)], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        baseline_version, baseline_versions = _registry_state(root / "mlflow.db")
        assert baseline_version is not None, done.stdout[-2000:]
        _prepare_inputs(root / "inputs", project, tiny_model_folder)
        values = {"inputs": str(root / "inputs"), "closed_port": str(free_port()), "prefect_root": api.removesuffix("/api")}

        def run(case: Case) -> Outcome:
            command = _command(case, project, tiny_model_folder, values)
            case_env = {**env, **{k: v.format(**values) for k, v in case.env.items()}}
            start = time.monotonic()
            done = subprocess.run(command, capture_output=True, text=True, env=case_env, cwd=project, timeout=600)
            seconds = time.monotonic() - start
            return Outcome(done.returncode, done.stderr, seconds, *_registry_state(root / "mlflow.db"))

        # The flow cases take longest: start them first. Three at a time keeps two cores busy
        # while a case waits on a subprocess or a lock.
        order = sorted(CASES, key=lambda c: not c.flow)
        with ThreadPoolExecutor(max_workers=3) as pool:
            outcomes = dict(zip((c.id for c in order), pool.map(run, order)))
        print(f"\n{len(CASES)} bad inputs tried; seconds per case (flow cases marked *):")
        for case in CASES:
            print(f"  {case.id:<40} {'*' if case.flow else ' '} rc={outcomes[case.id].returncode} "
                  f"{outcomes[case.id].seconds:6.1f}")
        yield Bed(root / "mlflow.db", baseline_version, baseline_versions, values, outcomes)


def test_bad_inputs_table_has_at_least_30_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_refused_in_one_line_with_production_unmoved(case: Case, bed: Bed):
    # The session summary (tests/fault_ledger.py) counts every case tried and how many were refused cleanly.
    try:
        _check_refused_cleanly(case, bed)
    except AssertionError:
        fault_ledger.record_input(case.id, refused_cleanly=False)
        raise
    fault_ledger.record_input(case.id, refused_cleanly=True)


def _check_refused_cleanly(case: Case, bed: Bed) -> None:
    """Exit 2, one `error:` line naming what is wrong, no traceback, production unmoved."""
    outcome = bed.outcomes[case.id]
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert outcome.returncode == 2, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    assert len(errors) == 1, outcome.stderr[-3000:]
    assert all(PROGRESS.match(line) for line in lines if line is not errors[0]), outcome.stderr[-3000:]
    for fragment in case.expect:
        assert fragment.format(**bed.values) in errors[0], errors[0]
    if case.waits_on_server:
        typical = statistics.median(o.seconds for c, o in ((c, bed.outcomes[c.id]) for c in CASES)
                                    if not c.flow and not c.waits_on_server)
        assert outcome.seconds < typical + SERVER_WAIT_ALLOWANCE_S, f"took {outcome.seconds:.0f} s, typical {typical:.0f} s"
    assert (outcome.production_version, outcome.versions) == (bed.baseline_version, bed.baseline_versions), \
        "a refused input moved the production alias or registered a version"


def test_refused_flow_runs_end_failed_with_their_reason(bed: Bed):
    """A case refused inside the flow leaves its MLflow parent run FAILED, the error line as its reason."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{bed.db}")
    runs = client.search_runs([client.get_experiment_by_name("requant").experiment_id], max_results=1000)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    reasons = sorted(r.data.tags["requant.failure"] for r in runs if r.info.status == "FAILED")
    expected = sorted(next(line for line in bed.outcomes[c.id].stderr.splitlines() if line.startswith("error: "))
                      .removeprefix("error: ") for c in CASES if c.flow)
    assert reasons == expected
