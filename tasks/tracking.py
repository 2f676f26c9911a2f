"""The MLflow adapter: the one module that talks to the tracking server and the model registry.

Everything is logged from the flow's own process, one call after another: sqlite allows one
writer at a time ("database is locked" under concurrent writers, mlflow#6490), so parallel
tasks return numbers and this adapter writes them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tasks import interrupts
from tasks.errors import ModelSourceError, RequantError, ServiceUnavailable
from tasks.locking import exclusive
from tasks.selection import ProductionModel
from tasks.settings import RegistrySettings

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
DECISION_FILE = "decision.json"
PIP_REQUIREMENTS = ["onnxruntime==1.32.0", "onnx==1.23.2"]
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
        from mlflow import MlflowClient

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
        run = self.client.create_run(self.experiment_id(), run_name=run_name, tags=tags)
        run_id = run.info.run_id
        try:
            yield run_id
        except BaseException as exc:
            self._end_failed(run_id, exc)
            raise
        self.client.set_terminated(run_id, "FINISHED")

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

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        """Log finite numeric metrics at one timestamp."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and v == v]
        self.client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Set several run tags."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, run_id: str, payload: dict, name: str) -> None:
        """Write a JSON artifact on a run."""
        self.client.log_dict(run_id, payload, name)

    def log_evaluation_input(self, run_id: str, frame, source: str, name: str, digest: str) -> None:
        """Record the evaluation set as a logged dataset input of the run."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        dataset = mlflow.data.from_pandas(frame, source=source, name=name, targets="label", digest=digest[:36])
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(),
                                                              tags=[InputTag("mlflow.data.context", "evaluation")])])

    def candidate_run(self, parent_id: str, name: str, tags: dict[str, str]) -> str:
        """Create a finished-later nested run for one candidate."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        run = self.client.create_run(self.experiment_id(), run_name=name, tags={MLFLOW_PARENT_RUN_ID: parent_id, **tags})
        return run.info.run_id

    def finish(self, run_id: str, failed: bool = False) -> None:
        """End a run."""
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    def log_onnx_model(self, run_id: str, model_path: Path, classes: int) -> str:
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
                onnx.load(str(model_path)), name="model", signature=signature,
                pip_requirements=PIP_REQUIREMENTS, onnx_execution_providers=["CPUExecutionProvider"],
            )
        return info.model_uri

    # ----------------------------------------------------------------- source models
    def register_source(self, folder: Path, name: str, alias: str, run_name: str,
                        params: dict, metrics: dict[str, float]) -> str:
        """Log a model folder (safetensors + card) in a run and register it as a new version; return the version."""
        run = self.client.create_run(self.experiment_id(), run_name=run_name, tags={"requant.kind": "train"})
        run_id = run.info.run_id
        self.log_params(run_id, params)
        self.log_metrics(run_id, metrics)
        self.client.log_artifacts(run_id, str(folder), "model")
        self._ensure_registered_model(name)
        version = self.client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run_id,
                                                   tags={TAG_ACCURACY: f"{metrics.get('test_accuracy', float('nan')):.6f}"})
        self.client.set_registered_model_alias(name, alias, version.version)
        self.client.set_terminated(run_id, "FINISHED")
        return str(version.version)

    def fetch_source(self, uri: str, dst: Path) -> SourceModel:
        """Materialise the model to requantize as a local folder.

        Raises:
            ModelSourceError: the registry has no such model/version/alias, or the path is missing.
        """
        from tasks.model_io import read_model_card

        if not uri.startswith("models:/"):
            folder = Path(uri).expanduser().resolve()
            read_model_card(folder)
            return SourceModel(uri=uri, folder=folder, name=None, version=None, digest=folder_digest(folder))
        name, version = self._resolve_version(uri)
        dst.mkdir(parents=True, exist_ok=True)
        target = dst / f"{name}-v{version}"
        if not target.is_dir():
            partial = dst / f".{name}-v{version}.partial"
            self._mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(partial))
            partial.rename(target)
        read_model_card(target)
        return SourceModel(uri=uri, folder=target, name=name, version=version, digest=folder_digest(target))

    def _resolve_version(self, uri: str) -> tuple[str, str]:
        from mlflow.exceptions import MlflowException

        ref = uri[len("models:/"):]
        try:
            if "@" in ref:
                name, alias = ref.split("@", 1)
                return name, str(self.client.get_model_version_by_alias(name, alias).version)
            name, _, version = ref.partition("/")
            if not version:
                raise ModelSourceError(f"model URI {uri} names no version: use models:/NAME/VERSION or models:/NAME@ALIAS")
            return name, str(self.client.get_model_version(name, version).version)
        except MlflowException as exc:
            raise ModelSourceError(
                f"model {uri} not found in the registry at {self.uri}: run `requant train` first or pass --model with an existing version"
            ) from exc

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

    def production(self) -> tuple[object, ProductionModel] | None:
        """The version behind the production alias of the serving model, if set."""
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(self.settings.serving_model_name, self.settings.production_alias)
        except MlflowException as exc:
            # Only the registry's own "no such model/alias" means there is no production model; an
            # unreachable server must not be taken for one (it would promote against nothing).
            if _is_not_found(exc):
                return None
            what = f"cannot read {self.settings.serving_model_name}@{self.settings.production_alias}"
            raise ServiceUnavailable(f"{what}: {_describe_service_error(exc) or _first_line(exc)}") from exc
        tags = version.tags
        record = ProductionModel(version=str(version.version), accuracy=float(tags.get(TAG_ACCURACY, "nan")),
                                 monthly_cost_usd=float(tags.get(TAG_MONTHLY_COST, "inf")))
        return version, record

    def promote(self, model_uri: str, tags: dict[str, str], lock_dir: Path) -> str:
        """Register the winner, move the production alias to it, and check the alias reads back.

        Promotions are serialised by an exclusive file lock: aliases are last-writer-wins, so two
        runs must never interleave register -> set alias. A version already registered for the
        same decision key is reused, never duplicated.
        """
        name, alias = self.settings.serving_model_name, self.settings.production_alias
        with exclusive(lock_dir, f"promote-{name}"):
            self._ensure_registered_model(name)
            existing = self.client.search_model_versions(f"name = '{name}' and tags.`{TAG_KEY}` = '{tags[TAG_KEY]}'")
            version = existing[0] if existing else self._mlflow.register_model(model_uri, name, tags=tags)
            interrupts.check()  # never move the alias after Ctrl-C or SIGTERM
            log.info("moving %s@%s to version %s", name, alias, version.version)
            self.client.set_registered_model_alias(name, alias, version.version)
            now = self.client.get_model_version_by_alias(name, alias)
            if str(now.version) != str(version.version):
                raise RequantError(f"alias {name}@{alias} reads back version {now.version}, expected {version.version}")
            log.info("moved %s@%s to version %s", name, alias, version.version)
        return str(version.version)

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


def service_failure(exc: BaseException) -> str | None:
    """One line for a failure of a service the run depends on (tracking server, artifact store),
    or None if `exc` is something else (a bug keeps its traceback).

    Looks through the exception's causes: MLflow wraps the requests error, boto3 its own.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        line = _describe_service_error(current)
        if line:
            return line + unmarked_note(exc)
        current = current.__cause__ or current.__context__
    return None


def unmarked_note(exc: BaseException) -> str:
    """'; its MLflow run ... stays RUNNING ...' when the failed run could not be marked, else ''."""
    unmarked = getattr(exc, "requant_unmarked_run", None)
    return (f"; its MLflow run {unmarked} could not be marked FAILED and stays RUNNING until a later run closes it"
            if unmarked else "")


def _describe_service_error(exc: BaseException) -> str | None:
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
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC):
        return f"cannot write {exc.filename or 'the artifact store'} ({exc.strerror}): make it writable, then run again"
    return None


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
