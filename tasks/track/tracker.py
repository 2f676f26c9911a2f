"""The MLflow adapter: the one module that talks to the tracking server and the model registry.

Everything is logged from the flow's own process, one call after another: sqlite allows one
writer at a time ("database is locked" under concurrent writers, mlflow#6490), so parallel
tasks return numbers and this adapter writes them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from tasks.config.settings import RegistrySettings
from tasks.core import interrupts
from tasks.core.errors import ModelSourceError, RequantError, ServiceUnavailable
from tasks.core.locking import exclusive
from tasks.core.write_errors import RunFolder, describe_write_failure

# Tags that tie a registered version to what produced it.
TAG_KEY = "requant.decision_key"
TAG_OUTCOME = "requant.outcome"
TAG_SOURCE_URI = "requant.source_uri"
TAG_SOURCE_VERSION = "requant.source_version"
TAG_SOURCE_DIGEST = "requant.source_digest"
TAG_RECIPE = "requant.recipe"
TAG_CANDIDATE = "requant.candidate"
TAG_CONFIG_HASH = "requant.config_hash"
TAG_DATA_VERSION = "requant.data_version"
TAG_ACCURACY = "requant.accuracy"
TAG_MONTHLY_COST = "requant.monthly_cost_usd"
TAG_FAILURE = "requant.failure"
# Why the version behind the production alias did not load from the registry as the served model.
TAG_PRODUCTION_BROKEN = "requant.production_broken"
TAG_MODEL_SHA256 = "requant.model_sha256"
TAG_PARENT_RUN = "requant.parent_run_id"
TAG_PROMOTED_VERSION = "requant.promoted_version"
# "pending" once the decision is recorded and before the alias moves, "done" after the read-back.
TAG_PROMOTION = "requant.promotion"
# host:pid:start-time of the process that runs a run, so a later run can tell a dead one from a live one.
TAG_PROCESS = "requant.process"
TAG_RECONCILED = "requant.reconciled"
# The alias a run moved to its winner (production, or challenger with registry.rollout: challenger).
TAG_PROMOTED_ALIAS = "requant.promoted_alias"
# On a version: the version production pointed at before the alias moved to it (where a rollback goes).
TAG_PREVIOUS_PRODUCTION = "requant.previous_production"
# On a version taken out of production by `requant rollback`: when, by whom, why, and to which version.
TAG_ROLLED_BACK_AT = "requant.rolled_back_at"
TAG_ROLLED_BACK_BY = "requant.rolled_back_by"
TAG_ROLLBACK_REASON = "requant.rollback_reason"
TAG_ROLLED_BACK_TO = "requant.rolled_back_to"
TAG_ROLLBACK_RUN = "requant.rollback_run"
# What kind of run a non-requantize run is: rollout, rollback, loadtest.
TAG_KIND = "requant.kind"
DECISION_FILE = "decision.json"
PIP_REQUIREMENTS = ["onnxruntime==1.32.0", "onnx==1.23.2"]
# What the served text-in model needs (tasks/serve/serving.py); torch is not among them.
SERVING_REQUIREMENTS = ["onnxruntime==1.32.0", "transformers==4.57.6", "tokenizers==0.22.2", "numpy", "pandas",
                        "uvicorn", "uvloop", "httptools"]
SERVING_EXAMPLE = ["I lost my card", "how long does a transfer take?"]
TRANSFORMERS_REQUIREMENTS = ["torch==2.13.0", "transformers==4.57.6", "tokenizers==0.22.2", "safetensors"]

# How long a failing run keeps trying to record its FAILED mark on an unreachable server.
FAILURE_MARK_S = 20.0

log = logging.getLogger("requant")


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Loading pickled models runs code (CVE-2024-37052..37060): requant never needs it.
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    warnings.filterwarnings("ignore", module="mlflow")


def tracking_uri(settings: RegistrySettings) -> str:
    """MLFLOW_TRACKING_URI wins over params.yaml, as MLflow users expect."""
    return os.environ.get("MLFLOW_TRACKING_URI") or settings.tracking_uri


def logged_model_name(candidate: str) -> str:
    """A logged-model name from a candidate name: 'int8 per-ch plain' -> 'int8-per-ch-plain'."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", candidate).strip("-") or "model"


def lineage_tags(entry_point: str = "flows.requantize") -> dict[str, str]:
    """Who ran it, from what code: mlflow.user, mlflow.source.* and the git commit of the requant checkout."""
    import getpass

    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_COMMIT,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
        MLFLOW_USER,
    )

    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        user = os.environ.get("USER", "unknown")
    tags = {MLFLOW_USER: user, MLFLOW_SOURCE_NAME: entry_point, MLFLOW_SOURCE_TYPE: "LOCAL"}
    commit = _git_commit()
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """HEAD of the git checkout requant runs from, if it runs from one."""
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


@dataclass(frozen=True)
class ProductionVersion:
    """The version behind the production alias, downloaded so it can be measured in this run."""

    version: str
    tags: dict[str, str]
    model_path: Path  # its ONNX graph
    model_dir: Path | None = None  # the downloaded served model (None: a plain ONNX version, not text-in)


class ProductionBroken(RequantError):
    """The version behind the production alias does not load from the registry as the served model."""

    def __init__(self, version: str, why: str) -> None:
        super().__init__(f"production version {version} is broken: {why}")
        self.version, self.why = version, why


def _check_served_model(model_dir: Path, version: str) -> None:
    """Load a downloaded serving model as requant's front would and have it answer two texts.

    Raises:
        ProductionBroken: it does not load, or does not answer one prediction per text.
    """
    from tasks.serve.front import files_of_mlflow_model
    from tasks.serve.serving import TextClassifier

    try:
        files = files_of_mlflow_model(model_dir)
        classifier = TextClassifier(files.onnx_model, files.tokenizer, files.card, threads=1)
        try:
            answers = classifier.classify(SERVING_EXAMPLE)
        finally:
            classifier.batcher.close()
    except Exception as exc:
        raise ProductionBroken(version, f"it does not load as the served model ({type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else ''})"[:400]) from exc
    if len(answers) != len(SERVING_EXAMPLE):
        raise ProductionBroken(version, f"it answered {len(answers)} predictions for {len(SERVING_EXAMPLE)} texts")


def process_identity() -> str:
    """host:pid:start-time of this process (the start time tells a reused pid from the original)."""
    import socket

    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.0f}"


def process_is_gone(identity: str) -> bool:
    """Whether the process named by `process_identity()` on this host has ended.

    A process on another host cannot be checked from here: it counts as alive.
    """
    import socket

    import psutil

    host, _, rest = identity.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        return f"{psutil.Process(int(pid)).create_time():.0f}" != started
    except psutil.NoSuchProcess:
        return True


@dataclass(frozen=True)
class SourceModel:
    """The model version being requantized."""

    uri: str
    folder: Path
    name: str | None
    version: str | None
    digest: str


class Tracker:
    """MLflow experiment, runs and registry for one flow run."""

    def __init__(self, settings: RegistrySettings) -> None:
        _quiet_mlflow()
        import mlflow
        from mlflow.exceptions import MlflowException

        self.settings = settings
        self.uri = tracking_uri(settings)
        user_choice = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        # set_tracking_uri also exports MLFLOW_TRACKING_URI; put back what the user set, so the
        # variable keeps meaning "the user's override" for the next Tracker in this process.
        if user_choice is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = user_choice
        self._mlflow = mlflow
        try:
            self._connect()
        except MlflowException as exc:
            raise RequantError(_unreachable(self.uri, exc)) from exc

    def _connect(self) -> None:
        from mlflow import MlflowClient

        if self.uri.startswith("sqlite:///"):
            # Two processes opening a new sqlite store at once race on its schema migration
            # (alembic: "expected to match one row"); the first one creates it, the second waits.
            # The client migrates the tracking store when built, the registry store on first use.
            database = Path(self.uri[len("sqlite:///"):])
            with exclusive(database.parent, f"{database.name}.init"):
                self.client = MlflowClient(self.uri)
                self.client.search_registered_models(max_results=1)
        else:
            self.client = MlflowClient(self.uri)
            if self.uri.startswith(("http://", "https://")):
                # One cheap request now: an unreachable server is reported here in one line
                # (retries bounded by flows/runtime.py), before a run is opened on it.
                self.client.search_experiments(max_results=1)

    # ----------------------------------------------------------------- experiment and runs
    def experiment_id(self) -> str:
        """Id of the configured experiment, created with its artifact location if new."""
        found = self.client.get_experiment_by_name(self.settings.experiment)
        if found:
            return found.experiment_id
        location = self.settings.artifact_location
        if location is not None and location.startswith("/"):
            location = Path(location).as_uri()
        try:
            return self.client.create_experiment(self.settings.experiment, artifact_location=location)
        except Exception:  # created concurrently by another run
            return self.client.get_experiment_by_name(self.settings.experiment).experiment_id

    @contextmanager
    def parent_run(self, run_name: str, tags: dict[str, str]) -> Iterator[str]:
        """One parent run per flow run; a failure ends it FAILED with the reason as a tag.

        Only a run that reached a decision gets TAG_KEY, so a crashed or failed run never counts as
        "already decided" and is simply redone next time.
        """
        run = self.client.create_run(self.experiment_id(), run_name=run_name,
                                     tags={**lineage_tags(), **tags, TAG_PROCESS: process_identity()})
        run_id = run.info.run_id
        # If a signal's unwinding gets stuck and the watchdog ends the process, the run still ends KILLED.
        forget = interrupts.on_forced_exit(lambda reason: self._mark_killed(run_id, reason))
        try:
            yield run_id
        except BaseException as exc:
            self._end_failed(run_id, exc)
            raise
        finally:
            forget()
        self.client.set_terminated(run_id, "FINISHED")

    def _mark_killed(self, run_id: str, reason: str) -> None:
        """Last words before a forced exit: the run ends KILLED with the reason (one attempt per call).

        A client of its own: the stuck main thread may hold the shared one's connection.
        """
        from mlflow import MlflowClient

        with _single_attempt_requests():
            client = MlflowClient(self.uri)
            client.set_tag(run_id, TAG_FAILURE, reason[:5000])
            client.set_terminated(run_id, "KILLED")

    def _end_failed(self, run_id: str, exc: BaseException) -> None:
        """Mark the run FAILED (KILLED when a signal stopped it) with the reason: best effort, bounded.

        The tracking server may be what failed: retry for FAILURE_MARK_S so that a server coming
        back in that time still gets the mark, then give up without hiding the original error.
        An unmarked run is noted on the exception (`requant_unmarked_run`) for the CLI's message.
        """
        status = "KILLED" if interrupts.received() else "FAILED"
        deadline = time.monotonic() + FAILURE_MARK_S
        with _single_attempt_requests():  # this loop is the retry: one clock for the whole mark
            while True:
                try:
                    self.client.set_tag(run_id, TAG_FAILURE, interrupts.reason(exc)[:5000])
                    self.client.set_terminated(run_id, status)
                    return
                except Exception:  # the server or store is down: the original error matters more
                    if time.monotonic() >= deadline:
                        exc.requant_unmarked_run = run_id
                        return
                    time.sleep(2.0)

    def log_params(self, run_id: str, params: dict) -> None:
        """Log params (stringified, truncated to MLflow's limit)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], dataset: tuple[str, str] | None = None) -> None:
        """Log finite numeric metrics at one timestamp; `dataset` (name, digest) links them to a logged input."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        name, digest = dataset or (None, None)
        items = [Metric(k, float(v), now, 0, dataset_name=name, dataset_digest=digest)
                 for k, v in metrics.items() if v is not None and v == v]
        self.client.log_batch(run_id, metrics=items)

    def log_curve(self, run_id: str, name: str, values: list[float], steps: list[int]) -> None:
        """Log a metric's history (a training curve): one value per step, shown as a chart in the UI."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(name, float(v), now, int(s)) for v, s in zip(values, steps) if v == v]
        for start in range(0, len(items), 1000):  # MLflow's batch limit
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Set several run tags."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, run_id: str, payload: dict, name: str) -> None:
        """Write a JSON artifact on a run."""
        self.client.log_dict(run_id, payload, name)

    def log_evaluation_input(self, run_id: str, frame, source: str, name: str, digest: str,
                             context: str = "evaluation") -> None:
        """Record a data set (the evaluation or calibration set) as a logged dataset input of the run."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        dataset = mlflow.data.from_pandas(frame, source=source, name=name, targets="label", digest=digest[:36])
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(),
                                                              tags=[InputTag("mlflow.data.context", context)])])

    def candidate_run(self, parent_id: str, name: str, tags: dict[str, str], start_time_ms: int | None = None) -> str:
        """Create a finished-later nested run for one candidate, started when its work started."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        run = self.client.create_run(self.experiment_id(), run_name=name, start_time=start_time_ms,
                                     tags={**lineage_tags(), MLFLOW_PARENT_RUN_ID: parent_id, **tags})
        return run.info.run_id

    def finish(self, run_id: str, failed: bool = False, end_time_ms: int | None = None) -> None:
        """End a run (at `end_time_ms`, when its work ended, if given)."""
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED", end_time=end_time_ms)

    def describe_run(self, run_id: str, markdown: str) -> None:
        """Set the run's description (the MLflow UI renders it as markdown)."""
        self.client.set_tag(run_id, "mlflow.note.content", markdown[:60000])

    def describe_version(self, version: str, markdown: str) -> None:
        """Set a serving-model version's description."""
        self.client.update_model_version(self.settings.serving_model_name, version, description=markdown[:60000])

    def describe_serving_model(self, markdown: str) -> None:
        """Set the serving registered model's description."""
        self._ensure_registered_model(self.settings.serving_model_name)
        self.client.update_registered_model(self.settings.serving_model_name, description=markdown[:60000])

    def run_link(self, run_id: str) -> str:
        """A link to the run in the MLflow UI (absolute for a tracking server, else relative to the UI)."""
        experiment = self.client.get_run(run_id).info.experiment_id
        path = f"#/experiments/{experiment}/runs/{run_id}"
        return f"{self.uri.rstrip('/')}/{path}" if self.uri.startswith(("http://", "https://")) else path

    @contextmanager
    def system_metrics(self, run_id: str, sampling_interval_s: float = 5.0) -> Iterator[None]:
        """Log CPU, memory and disk use of this host on the run while the block runs (MLflow's monitor)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval_s, samples_before_logging=1,
                                       tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def log_onnx_model(self, run_id: str, model_path: Path, classes: int, name: str = "model") -> str:
        """Log an ONNX candidate with a signature (dynamic batch and sequence); return its model URI."""
        import numpy as np
        import onnx
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype("int64"), (-1, -1), "input_ids"),
                           TensorSpec(np.dtype("int64"), (-1, -1), "attention_mask")]),
            outputs=Schema([TensorSpec(np.dtype("float32"), (-1, classes), "logits")]),
        )
        with self._mlflow.start_run(run_id=run_id, nested=True):
            info = self._mlflow.onnx.log_model(
                onnx.load(str(model_path)), name=logged_model_name(name), signature=signature,
                pip_requirements=PIP_REQUIREMENTS, onnx_execution_providers=["CPUExecutionProvider"],
            )
        return info.model_uri

    def log_serving_model(self, run_id: str, model_path: Path, serving, name: str = "model") -> str:
        """Log a candidate as the model that is served: an MLflow pyfunc taking raw text.

        The model holds the ONNX graph (artifact `onnx_model`, for teams that run ONNX Runtime
        directly), the tokenizer and the labels, with a signature and an input example, so
        `mlflow models serve` answers `{"inputs": ["text", ...]}` with a label and score per text.
        Its code is tasks/serve/serving_pyfunc.py (models from code: nothing is unpickled when loading).

        Args:
            run_id: the candidate's run.
            model_path: the candidate's ONNX file.
            serving: a `tasks.serve.serving.ServingAssets` (tokenizer folder, labels, max length).
            name: the logged model's name (the candidate's, so the UI's Models column tells them apart).

        Returns:
            The logged model's URI.
        """
        import tempfile

        from tasks.serve import batching
        from tasks.serve import serving as serving_module

        code = Path(serving_module.__file__)
        # No explicit signature: MLflow infers it from the type hints of ServedTextClassifier.predict
        # (list[str] in), and then hands the texts over as a list, without a DataFrame per request.
        with tempfile.TemporaryDirectory() as tmp:
            card = serving.write_card(Path(tmp) / serving_module.CLASSIFIER_FILE)
            with self._mlflow.start_run(run_id=run_id, nested=True):
                info = self._mlflow.pyfunc.log_model(
                    name=logged_model_name(name), python_model=str(code.with_name("serving_pyfunc.py")),
                    code_paths=[str(code), batching.__file__],
                    artifacts={"onnx_model": str(model_path), "tokenizer": str(serving.tokenizer_dir),
                               "classifier_card": str(card)},
                    input_example=SERVING_EXAMPLE, pip_requirements=SERVING_REQUIREMENTS,
                )
        return info.model_uri

    # ----------------------------------------------------------------- source models
    def register_source(self, folder: Path, name: str, alias: str, run_name: str,
                        params: dict, metrics: dict[str, float]) -> str:
        """Log a model folder (safetensors + card) in a run and register it as a new version; return the version."""
        run = self.client.create_run(self.experiment_id(), run_name=run_name,
                                     tags={**lineage_tags("flows.train"), "requant.kind": "train",
                                           TAG_PROCESS: process_identity()})
        run_id = run.info.run_id
        try:
            self.log_params(run_id, params)
            self.log_metrics(run_id, metrics)
            self.client.log_artifacts(run_id, str(folder), "model")
            self._ensure_registered_model(name)
            version = self.client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run_id,
                                                       tags={TAG_ACCURACY: f"{metrics.get('test_accuracy', float('nan')):.6f}"})
            self.client.set_registered_model_alias(name, alias, version.version)
        except BaseException as exc:  # a train run never stays RUNNING after a failure
            self.client.set_tag(run_id, TAG_FAILURE, str(exc)[:5000])
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")
        return str(version.version)

    def register_transformers(self, folder: Path, name: str, alias: str, run_name: str,
                              params: dict, metrics: dict[str, float]) -> str:
        """Log a Hugging Face classifier folder with MLflow's transformers flavor (a text-classification
        pipeline, safetensors weights) and register it as a new version under `alias`; return the version."""
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import (
            AutoModelForSequenceClassification,
            AutoTokenizer,
            pipeline,
        )

        model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        classifier = pipeline("text-classification", model=model,
                              tokenizer=AutoTokenizer.from_pretrained(str(folder), local_files_only=True), device="cpu")
        with self._mlflow.start_run(experiment_id=self.experiment_id(), run_name=run_name,
                                    tags={**lineage_tags("flows.train"), "requant.kind": "train",
                                          TAG_PROCESS: process_identity()}) as run:
            self.log_params(run.info.run_id, params)
            self.log_metrics(run.info.run_id, metrics)
            # pip_requirements given: inferring them costs ~17 s.
            info = self._mlflow.transformers.log_model(
                classifier, name="model", pip_requirements=TRANSFORMERS_REQUIREMENTS, input_example=SERVING_EXAMPLE)
        self._ensure_registered_model(name)
        version = self._mlflow.register_model(info.model_uri, name,
                                              tags={TAG_ACCURACY: f"{metrics.get('test_accuracy', float('nan')):.6f}"})
        self.client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)

    def fetch_source(self, uri: str, dst: Path) -> SourceModel:
        """Materialise the model to requantize as a local folder.

        Raises:
            ModelSourceError: the registry has no such model/version/alias, or the path is missing.
        """
        # Any registered model family: requant's own folder, a Hugging Face folder, or an MLflow
        # transformers-flavor model (model/ + components/tokenizer/), downloaded as it was logged.
        from tasks.models.base import detect_family

        if parse_model_uri(uri) is None:
            folder = Path(uri).expanduser().resolve()
            detect_family(folder)
            return SourceModel(uri=uri, folder=folder, name=None, version=None, digest=folder_digest(folder))
        name, version = self.resolve_version(uri)
        dst.mkdir(parents=True, exist_ok=True)
        target = dst / f"{name}-v{version}"
        if not target.is_dir():
            partial = dst / f".{name}-v{version}.partial"
            self._mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(partial))
            partial.rename(target)
        detect_family(target)
        return SourceModel(uri=uri, folder=target, name=name, version=version, digest=folder_digest(target))

    def resolve_version(self, uri: str) -> tuple[str, str]:
        """(name, version) of the registered version a models:/ URI names.

        Raises:
            ModelSourceError: a malformed URI, or one naming a model, alias or version the registry
                does not have (the message lists what it has).
        """
        from mlflow.exceptions import MlflowException

        name, version, alias = parse_model_uri(uri)
        try:
            if alias:
                return name, str(self.client.get_model_version_by_alias(name, alias).version)
            return name, str(self.client.get_model_version(name, version).version)
        except MlflowException as exc:
            raise ModelSourceError(self._not_found(uri, name, version, alias)) from exc

    def _not_found(self, uri: str, name: str, version: str | None, alias: str | None) -> str:
        """Say which part of a model URI the registry does not know, and what it has instead."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(name)
        except MlflowException:
            return (f"model {uri} not found: the registry at {self.uri} has no model named '{name}'; "
                    "run `requant train` first or pass --model with an existing model")
        if alias:
            known = ", ".join(sorted(model.aliases)) or "none"
            return f"model {uri} not found: '{name}' has no alias '{alias}' (aliases: {known}); pass an existing alias or version"
        versions = sorted(int(v.version) for v in self.client.search_model_versions(f"name = '{name}'"))
        return (f"model {uri} not found: '{name}' has no version {version} (versions: "
                f"{', '.join(map(str, versions[-10:])) or 'none'}); pass an existing version")

    def _ensure_registered_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(name)
            except MlflowException:
                pass  # created concurrently

    # ----------------------------------------------------------------- decisions and promotion
    def previous_decision(self, decision_key: str) -> dict | None:
        """The tags of an earlier finished run that decided this exact key, if any."""
        runs = self.client.search_runs(
            [self.experiment_id()], filter_string=f"tags.`{TAG_KEY}` = '{decision_key}' and attributes.status = 'FINISHED'",
            max_results=1, order_by=["attributes.start_time DESC"],
        )
        return {"run_id": runs[0].info.run_id, **runs[0].data.tags} if runs else None

    def production(self):
        """The ModelVersion behind the production alias of the serving model, or None if the alias is unset."""
        return self.version_by_alias(self.settings.production_alias)

    def challenger(self):
        """The ModelVersion behind the challenger alias of the serving model, or None if the alias is unset."""
        return self.version_by_alias(self.settings.challenger_alias)

    def version_by_alias(self, alias: str):
        """The serving model's ModelVersion behind `alias`, or None if the alias (or the model) does not exist.

        Raises:
            ServiceUnavailable: the registry did not answer (never taken for "no version").
        """
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.settings.serving_model_name, alias)
        except MlflowException as exc:
            # Only the registry's own "no such model/alias" means there is no version; an
            # unreachable server must not be taken for one (it would promote against nothing).
            if _is_not_found(exc):
                return None
            what = f"cannot read {self.settings.serving_model_name}@{alias}"
            raise ServiceUnavailable(f"{what}: {_describe_service_error(exc) or _first_line(exc)}") from exc

    def serving_version(self, version: str):
        """The serving model's ModelVersion `version`.

        Raises:
            RequantError: the registry has no such version (the message lists the versions it has).
        """
        from mlflow.exceptions import MlflowException

        name = self.settings.serving_model_name
        try:
            return self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            if not _is_not_found(exc):
                raise
            known = sorted(int(v.version) for v in self.client.search_model_versions(f"name = '{name}'"))
            raise RequantError(f"{name} has no version {version} (versions: {', '.join(map(str, known[-10:])) or 'none'}): "
                               "pass an existing version") from exc

    def download_version(self, version: str, dst: Path) -> Path:
        """Download a serving-model version (the whole MLflow model folder) into `dst`; return the folder.

        Raises:
            RequantError: the registry cannot give it.
        """
        try:
            return Path(self._mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{self.settings.serving_model_name}/{version}", dst_path=str(dst)))
        except Exception as exc:
            raise RequantError(f"cannot download version {version} of {self.settings.serving_model_name}: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc

    def fetch_production(self, dst: Path) -> ProductionVersion | None:
        """Download the production version from the registry and load it as it is served; return it.

        Downloaded anew on every run, never taken from an earlier run's copy: what is measured and
        kept must be what the registry serves today. A requant serving model (pyfunc with an ONNX
        graph, tokenizer and card) is loaded and answers two texts before it counts as loadable.

        Returns None when no version is behind the alias.

        Raises:
            ProductionBroken: the version behind the alias cannot be downloaded, holds no ONNX graph,
                does not match the sha256 it was registered with, or does not load and answer as served.
        """
        import shutil

        version = self.production()
        if version is None:
            return None
        name, number = self.settings.serving_model_name, str(version.version)
        target = Path(dst) / f"{name}-v{number}"
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            self._mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{number}", dst_path=str(partial))
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise ProductionBroken(number, f"it cannot be downloaded from the registry "
                                           f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        graphs = sorted(target.rglob("*.onnx"), key=lambda p: (p.name != "model.onnx", -p.stat().st_size))
        if not graphs:
            raise ProductionBroken(number, "its artifacts hold no ONNX graph (move the alias to a version requant registered)")
        expected = version.tags.get(TAG_MODEL_SHA256)
        if expected:
            from tasks.data.prepare import sha256_of

            if sha256_of(graphs[0]) != expected:
                raise ProductionBroken(number, "its ONNX graph does not match the sha256 it was registered with")
        served = (target / "MLmodel").is_file() and "classifier_card" in (target / "MLmodel").read_text()
        if served:
            _check_served_model(target, number)
        return ProductionVersion(version=number, tags=dict(version.tags), model_path=graphs[0],
                                 model_dir=target if served else None)

    def register_winner(self, model_uri: str, tags: dict[str, str], lock_dir: Path,
                        broken: set[str] = frozenset()) -> str:
        """Register the winner as a version of the serving model, without moving any alias; return the version.

        A version already registered for the same decision key is reused, never duplicated (a
        rerun after an interrupted promotion finds it), unless it is one of the `broken` versions
        (it no longer loads from the registry): then the winner is registered anew.
        """
        name = self.settings.serving_model_name
        with exclusive(lock_dir, f"promote-{name}"):
            self._ensure_registered_model(name)
            existing = [v for v in self.client.search_model_versions(
                f"name = '{name}' and tags.`{TAG_KEY}` = '{tags[TAG_KEY]}'") if str(v.version) not in broken]
            version = existing[0] if existing else self._mlflow.register_model(model_uri, name, tags=tags)
        return str(version.version)

    def move_alias(self, version: str, lock_dir: Path, alias: str | None = None) -> None:
        """Move `alias` (default: the production alias) to `version` and check that it reads back.

        The last step of a promotion: the decision record is written before it, so an alias never
        points at a version whose decision is missing. Promotions are serialised by an exclusive
        file lock: aliases are last-writer-wins. When production moves, the new version is tagged
        with the version it replaces, so `requant rollback` knows where to go back to.
        """
        name, alias = self.settings.serving_model_name, alias or self.settings.production_alias
        with exclusive(lock_dir, f"promote-{name}"):
            interrupts.check()  # never move the alias after Ctrl-C or SIGTERM
            if alias == self.settings.production_alias:
                before = self.production()
                if before is not None and str(before.version) != str(version):
                    self.client.set_model_version_tag(name, str(version), TAG_PREVIOUS_PRODUCTION, str(before.version))
            self._set_alias(alias, version)

    def _set_alias(self, alias: str, version: str) -> None:
        """Point `alias` at `version` and read it back (the caller holds the promotion lock)."""
        name = self.settings.serving_model_name
        log.info("moving %s@%s to version %s", name, alias, version)
        self.client.set_registered_model_alias(name, alias, str(version))
        now = self.client.get_model_version_by_alias(name, alias)
        if str(now.version) != str(version):
            raise RequantError(f"alias {name}@{alias} reads back version {now.version}, expected {version}")
        log.info("moved %s@%s to version %s", name, alias, version)

    def drop_alias(self, alias: str, lock_dir: Path) -> None:
        """Remove `alias` from the serving model (nothing happens if it is not set)."""
        name = self.settings.serving_model_name
        with exclusive(lock_dir, f"promote-{name}"):
            if self.version_by_alias(alias) is not None:
                self.client.delete_registered_model_alias(name, alias)

    # ----------------------------------------------------------------- after the decision
    def flip_to_challenger(self, challenger_version: str, rollout_run_id: str, lock_dir: Path) -> None:
        """Move production to the challenger a shadow comparison accepted, then drop the challenger alias.

        Raises:
            RequantError: the challenger alias moved to another version since the comparison began
                (the comparison no longer describes it), or production does not read back.
        """
        name = self.settings.serving_model_name
        with exclusive(lock_dir, f"rollout-{name}"):
            now = self.challenger()
            if now is None or str(now.version) != str(challenger_version):
                raise RequantError(f"{name}@{self.settings.challenger_alias} moved to version "
                                   f"{now.version if now else 'none'} during the comparison of version "
                                   f"{challenger_version}: run `requant rollout` again")
            self.move_alias(challenger_version, lock_dir)
            self.client.set_model_version_tag(name, str(challenger_version), "requant.rolled_out_in", rollout_run_id)
            self.drop_alias(self.settings.challenger_alias, lock_dir)

    def rollback_target(self, current) -> str | None:
        """The version production should go back to from `current`: the production it replaced,
        skipping versions that were themselves rolled back; else the newest earlier version that
        requant registered and nobody rolled back. None when there is none."""
        name = self.settings.serving_model_name
        seen = {str(current.version)}
        previous = current.tags.get(TAG_PREVIOUS_PRODUCTION)
        while previous and previous not in seen:
            seen.add(previous)
            try:
                candidate = self.client.get_model_version(name, previous)
            except Exception:  # deleted since
                break
            if TAG_ROLLED_BACK_AT not in candidate.tags:
                return str(candidate.version)
            previous = candidate.tags.get(TAG_PREVIOUS_PRODUCTION)
        earlier = [v for v in self.client.search_model_versions(f"name = '{name}'")
                   if int(v.version) < int(current.version) and TAG_KEY in v.tags and TAG_ROLLED_BACK_AT not in v.tags]
        return str(max(earlier, key=lambda v: int(v.version)).version) if earlier else None

    def record_rollback(self, from_version: str, to_version: str, reason: str, user: str, lock_dir: Path) -> str:
        """Move production from `from_version` back to `to_version`, recorded; return the rollback run's id.

        The record: a `rollback` run (who, when, why, from, to) and tags on both versions; the
        rolled-back version keeps its decision key and config hash, so the nightly run can tell it
        was rolled back (`rolled_back_versions`). The alias moves last, after the record.

        Raises:
            RequantError: production is no longer `from_version` (someone moved it meanwhile).
        """
        from datetime import UTC, datetime

        name = self.settings.serving_model_name
        when = datetime.now(UTC).isoformat(timespec="seconds")
        with exclusive(lock_dir, f"rollout-{name}"):
            current = self.production()
            if current is None or str(current.version) != str(from_version):
                raise RequantError(f"{name}@{self.settings.production_alias} is version "
                                   f"{current.version if current else 'none'}, not {from_version}: run `requant rollback` again")
            record = {"from_version": str(from_version), "to_version": str(to_version), "reason": reason, "user": user,
                      "at": when, "decision_key": current.tags.get(TAG_KEY, ""),
                      "config_hash": current.tags.get(TAG_CONFIG_HASH, "")}
            run = self.client.create_run(self.experiment_id(), run_name=f"rollback-v{from_version}-to-v{to_version}",
                                         tags={**lineage_tags("flows.cli rollback"), TAG_KIND: "rollback",
                                               TAG_ROLLED_BACK_BY: user, TAG_ROLLED_BACK_AT: when,
                                               TAG_ROLLBACK_REASON: reason, "requant.from_version": str(from_version),
                                               TAG_ROLLED_BACK_TO: str(to_version)})
            run_id = run.info.run_id
            self.client.log_dict(run_id, record, "rollback.json")
            for key, value in {TAG_ROLLED_BACK_AT: when, TAG_ROLLED_BACK_BY: user, TAG_ROLLBACK_REASON: reason,
                               TAG_ROLLED_BACK_TO: str(to_version), TAG_ROLLBACK_RUN: run_id}.items():
                self.client.set_model_version_tag(name, str(from_version), key, value[:5000])
            self.client.set_model_version_tag(name, str(to_version), "requant.restored_from", str(from_version))
            self.client.set_model_version_tag(name, str(to_version), "requant.restored_at", when)
            with exclusive(lock_dir, f"promote-{name}"):
                interrupts.check()
                # Not move_alias: the restored version must not record the rolled-back one as its predecessor.
                self._set_alias(self.settings.production_alias, str(to_version))
            self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def rolled_back_versions(self) -> list[dict[str, str]]:
        """Every serving-model version `requant rollback` took out of production: one dict per version
        with version, decision_key, config_hash, at, by, reason, to (newest rollback first)."""
        name = self.settings.serving_model_name
        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except Exception as exc:
            if _is_not_found(exc):
                return []
            raise
        found = [{"version": str(v.version), "decision_key": v.tags.get(TAG_KEY, ""),
                  "config_hash": v.tags.get(TAG_CONFIG_HASH, ""), "at": v.tags[TAG_ROLLED_BACK_AT],
                  "by": v.tags.get(TAG_ROLLED_BACK_BY, ""), "reason": v.tags.get(TAG_ROLLBACK_REASON, ""),
                  "to": v.tags.get(TAG_ROLLED_BACK_TO, "")}
                 for v in versions if TAG_ROLLED_BACK_AT in v.tags]
        return sorted(found, key=lambda r: r["at"], reverse=True)

    def load_served_model(self, version: str):
        """The serving model's version as MLflow loads it for `mlflow models serve` (pyfunc: texts in, label and score out)."""
        return self._mlflow.pyfunc.load_model(f"models:/{self.settings.serving_model_name}/{version}")

    def version_run_metrics(self, version) -> dict[str, float]:
        """The metrics of the run that logged `version` (its candidate run: throughput, cost...); {} if none."""
        if not version.run_id:
            return {}
        return dict(self.client.get_run(version.run_id).data.metrics)

    @contextmanager
    def operation_run(self, kind: str, run_name: str, tags: dict[str, str]) -> Iterator[str]:
        """A run for a step after the decision (rollout, loadtest): tagged with its kind, FAILED with the reason on error.

        It carries no decision key, so it never counts as a decision.
        """
        with self.parent_run(run_name, {**lineage_tags(f"flows.cli {kind}"), TAG_KIND: kind, **tags}) as run_id:
            yield run_id

    def set_version_tags(self, version: str, tags: dict[str, str]) -> None:
        """Set tags on a serving-model version."""
        for key, value in tags.items():
            self.client.set_model_version_tag(self.settings.serving_model_name, str(version), key, str(value))

    def promote(self, model_uri: str, tags: dict[str, str], lock_dir: Path) -> str:
        """Register the winner and move the production alias to it (both steps at once); return the version."""
        version = self.register_winner(model_uri, tags, lock_dir)
        self.move_alias(version, lock_dir)
        return version

    def reconcile_stale_runs(self) -> list[dict[str, str]]:
        """Close RUNNING runs whose process is gone, finishing an interrupted promotion's record.

        A run killed after its decision was recorded and the alias moved is complete: it is marked
        FINISHED (tagged as reconciled). One killed before the alias moved is marked FAILED, so its
        decision key does not count as decided and the next run decides again (the version it
        registered is reused). Any other dead run (and its RUNNING candidate runs) is marked FAILED
        with the reason. Runs of live processes, and of processes on other hosts, are left alone.

        Returns:
            One {"run_id", "status", "reason"} per run closed.
        """
        found = self.client.get_experiment_by_name(self.settings.experiment)
        if not found:
            return []
        running = self.client.search_runs([found.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                          max_results=1000)
        by_id = {r.info.run_id: r for r in running}
        at_alias = {}  # alias -> version behind it, read once
        closed = []
        for run in running:
            identity = run.data.tags.get(TAG_PROCESS)
            parent_id = run.data.tags.get("mlflow.parentRunId")
            if identity is None and parent_id in by_id:
                identity = by_id[parent_id].data.tags.get(TAG_PROCESS)  # a candidate run of that parent
            if identity is None or not process_is_gone(identity):
                continue
            promoted = run.data.tags.get(TAG_PROMOTED_VERSION)
            alias = run.data.tags.get(TAG_PROMOTED_ALIAS, self.settings.production_alias)
            if promoted and alias not in at_alias:
                at_alias[alias] = self.version_by_alias(alias)
            alias_version = at_alias.get(alias)
            if promoted and alias_version is not None and str(alias_version.version) == promoted:
                status, reason = "FINISHED", f"process {identity} died after the alias moved to version {promoted}; promotion complete"
                self.client.set_tag(run.info.run_id, TAG_PROMOTION, "done")
                self.client.set_tag(run.info.run_id, TAG_RECONCILED, reason)
            else:
                status = "FAILED"
                reason = (f"process {identity} died before the alias moved to version {promoted}; the next run decides again"
                          if promoted else f"process {identity} died before the run finished")
                self.client.set_tag(run.info.run_id, TAG_FAILURE, reason)
            self.client.set_terminated(run.info.run_id, status)
            closed.append({"run_id": run.info.run_id, "status": status, "reason": reason})
        return closed

    def register_webhook(self, url: str, secret: str, name: str = "requant-retune") -> str:
        """Create (or replace) the registry webhook for model_version.created; return its id.

        Needs an `mlflow server` tracking URI: only the server sends webhooks.
        """
        if not self.uri.startswith(("http://", "https://")):
            raise RequantError(f"webhooks need an MLflow server, but the tracking URI is {self.uri}: set MLFLOW_TRACKING_URI")
        for existing in self.client.list_webhooks():
            if existing.name == name:
                self.client.delete_webhook(existing.webhook_id)
        return self.client.create_webhook(name=name, url=url, events=["model_version.created"], secret=secret).webhook_id

    def decision_markdown(self, run_id: str | None = None) -> tuple[str, str]:
        """(run id, decision.md text) of a requantize run, by default the newest that decided.

        Raises:
            RequantError: no such run, or it holds no decision.md (it did not reach a decision).
        """
        if run_id is None:
            last = self.last_decision()
            if last is None:
                raise RequantError("no requantize run has decided yet: run `requant run` first")
            run_id = last["run_id"]
        try:
            path = self._mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="decision.md")
        except Exception as exc:
            raise RequantError(f"run {run_id} has no decision.md (it did not reach a decision, or it is not a "
                               f"requantize run): pick a run id from `requant status`") from exc
        return run_id, Path(path).read_text()

    def last_decision(self) -> dict | None:
        """The newest finished requantize run's decision record and tags."""
        found = self.client.get_experiment_by_name(self.settings.experiment)
        if not found:
            return None
        runs = self.client.search_runs([found.experiment_id], filter_string=f"tags.`{TAG_KEY}` != ''",
                                       max_results=1, order_by=["attributes.start_time DESC"])
        if not runs:
            return None
        run = runs[0]
        path = self._mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=DECISION_FILE)
        return {"run_id": run.info.run_id, "status": run.info.status, "tags": run.data.tags,
                "decision": json.loads(Path(path).read_text())}


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """Split a registry URI into (name, version, alias); None for a local folder path.

    Only `models:/NAME/VERSION` and `models:/NAME@ALIAS` name a registered model version; other
    URI schemes (runs:/, s3://, ...) are refused, since requant needs a version to record lineage.

    Raises:
        ModelSourceError: a URI that is not one of the two registry forms.
    """
    fix = "use models:/NAME/VERSION, models:/NAME@ALIAS or a local model folder"
    if not uri.startswith("models:/"):
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):/", uri)  # two letters or more: not a drive
        if scheme:
            raise ModelSourceError(f"model URI {uri} uses the {scheme.group(1)}: scheme, which requant does not read: "
                                   f"register the model and {fix}")
        return None
    ref = uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        if name and alias and "/" not in name + alias:
            return name, None, alias
    else:
        name, _, version = ref.partition("/")
        if name and version.isdigit():
            return name, version, None
        if name and not version:
            raise ModelSourceError(f"model URI {uri} names no version: {fix}")
    raise ModelSourceError(f"model URI {uri} is not a registry URI requant reads: {fix}")


def _unreachable(uri: str, exc: Exception) -> str:
    """One line for a tracking store that cannot be opened or does not answer."""
    text = str(exc)
    refused = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    if refused:
        reason = refused.group(1).strip()
    elif "unsupported URI" in text:
        reason = "not a URI scheme MLflow supports: sqlite:///PATH, http(s)://HOST:PORT, postgresql://..."
    else:
        reason = (text.strip().splitlines() or [type(exc).__name__])[0][:200]
        if uri.startswith(("http://", "https://")):
            reason += "; is it an MLflow tracking server?"
    return (f"MLflow tracking store {uri} cannot be used ({reason}): start the server, or set registry.tracking_uri "
            "in params.yaml (or MLFLOW_TRACKING_URI) to a reachable one")


@contextmanager
def _single_attempt_requests() -> Iterator[None]:
    """MLflow's HTTP client without its own retries for the block (it reads the setting per request)."""
    name = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    saved = os.environ.get(name)
    os.environ[name] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _is_not_found(exc) -> bool:
    """The registry answered that the model or alias does not exist (sqlite and REST stores say it
    with different codes: RESOURCE_DOES_NOT_EXIST, or INVALID_PARAMETER_VALUE "alias ... not found")."""
    code = getattr(exc, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc))


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def service_failure(exc: BaseException, folders: Sequence[RunFolder] = ()) -> str | None:
    """One line for a failure of a service the run depends on (tracking server, artifact store, a
    folder it writes to), or None if `exc` is something else (a bug keeps its traceback).

    Looks through the exception's causes: MLflow wraps the requests error, boto3 its own.

    Args:
        exc: what the command raised.
        folders: the folders the command writes to (tasks.core.write_errors.run_folders): a full or
            read-only one is named in the line.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        line = _describe_service_error(current, folders)
        if line:
            return line + unmarked_note(exc)
        current = current.__cause__ or current.__context__
    return None


def unmarked_note(exc: BaseException) -> str:
    """'; its MLflow run ... stays RUNNING ...' when the failed run could not be marked, else ''."""
    unmarked = getattr(exc, "requant_unmarked_run", None)
    return (f"; its MLflow run {unmarked} could not be marked FAILED and stays RUNNING until a later run closes it"
            if unmarked else "")


def _describe_service_error(exc: BaseException, folders: Sequence[RunFolder] = ()) -> str | None:
    name = type(exc).__name__
    module = type(exc).__module__
    text = _first_line(exc, 300)
    if name == "MlflowException" and text.startswith("API request to "):
        # "API request to http://host/api/2.0/... failed with exception ...": keep the server's address.
        server = text[len("API request to "):].split("/api/", 1)[0]
        return (f"the MLflow tracking server at {server} did not answer (retried with backoff): check that it "
                "runs and MLFLOW_TRACKING_URI, then run again")
    if module.startswith(("botocore", "boto3")):
        return (f"the S3 artifact store failed ({name}: {text}): check MLFLOW_S3_ENDPOINT_URL, the bucket and "
                "its credentials, then run again")
    if module.startswith(("requests", "urllib3")) and "Connection" in name:
        return f"a server did not answer ({text}): check that it runs, then run again"
    # Full and read-only are told apart, and the folder named (tasks/core/write_errors.py).
    return describe_write_failure(exc, list(folders))


def folder_digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes: the content address of a model folder."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
