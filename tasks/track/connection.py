"""One MLflow client on the configured store: the experiment, and params and metrics written to a run.

requant logs from the flow's own process, one call after another: sqlite allows one writer at a time
("database is locked" under concurrent writers, mlflow#6490), so parallel tasks return numbers and
the tracker writes them.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

from tasks.config.settings import RegistrySettings
from tasks.core.errors import RequantError, ServiceUnavailable
from tasks.core.locking import exclusive
from tasks.track.services import (
    describe_service_error,
    first_line,
    is_not_found,
    unreachable,
)

log = logging.getLogger("requant")


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Loading pickled models runs code (CVE-2024-37052..37060): requant never needs it.
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    warnings.filterwarnings("ignore", module="mlflow")


def tracking_uri(settings: RegistrySettings) -> str:
    """MLFLOW_TRACKING_URI wins over params.yaml, as MLflow users expect."""
    return os.environ.get("MLFLOW_TRACKING_URI") or settings.tracking_uri


def version_behind_alias(client, model_name: str, alias: str):
    """`model_name`'s ModelVersion behind `alias`, or None if the alias (or the model) does not exist.

    Raises:
        ServiceUnavailable: the registry did not answer (never taken for "no version").
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        # Only the registry's own "no such model/alias" means there is no version; an
        # unreachable server must not be taken for one (it would promote against nothing).
        if is_not_found(exc):
            return None
        what = f"cannot read {model_name}@{alias}"
        raise ServiceUnavailable(f"{what}: {describe_service_error(exc) or first_line(exc)}") from exc


class Connection:
    """The MLflow client, the settings and the experiment every part of the tracker works in."""

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
            raise RequantError(unreachable(self.uri, exc)) from exc

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
