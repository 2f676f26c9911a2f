"""Runs and what they log: the parent run of a flow run, candidate runs, models, inputs, curves,
descriptions and the decision record; and which process runs a run (so a dead one can be told apart)."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tasks.core import interrupts
from tasks.core.errors import RequantError
from tasks.track.connection import Connection
from tasks.track.services import single_attempt_requests
from tasks.track.tags import (
    DECISION_FILE,
    TAG_FAILURE,
    TAG_KEY,
    TAG_KIND,
    TAG_PROCESS,
)

PIP_REQUIREMENTS = ["onnxruntime==1.32.0", "onnx==1.23.2"]
# What the served text-in model needs (tasks/serve/serving.py); torch is not among them.
SERVING_REQUIREMENTS = ["onnxruntime==1.32.0", "transformers==4.57.6", "tokenizers==0.22.2", "numpy", "pandas",
                        "uvicorn", "uvloop", "httptools"]
SERVING_EXAMPLE = ["I lost my card", "how long does a transfer take?"]
GENERATION_EXAMPLE = ["What is the capital of France?"]
# How long a failing run keeps trying to record its FAILED mark on an unreachable server.
FAILURE_MARK_S = 20.0

log = logging.getLogger("requant")


def logged_model_name(candidate: str) -> str:
    """A logged-model name from a candidate name: 'int8 per-ch plain' -> 'int8-per-ch-plain'."""

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


class RunLog(Connection):
    """Runs of a flow run and everything logged to them."""

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

        with single_attempt_requests():
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
        with single_attempt_requests():  # this loop is the retry: one clock for the whole mark
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

    def log_generation_model(self, run_id: str, model_path: Path, tokenizer_dir: Path, card_path: Path,
                             name: str = "model") -> str:
        """Log a decoder candidate as the served text-generation model: an MLflow pyfunc, texts in,
        generated texts out (chat template applied, greedy, `max_new_tokens` as a param).

        Its code is tasks/serve/generation_pyfunc.py with generation.py and batching.py beside it
        (models from code: nothing is unpickled when loading); artifacts `onnx_model` (the graph with
        its KV cache), `tokenizer` and `generator_card`.

        Returns:
            The logged model's URI.
        """
        from tasks.serve import batching
        from tasks.serve import generation as generation_module

        code = Path(generation_module.__file__)
        card = generation_module.GeneratorCard.read(card_path)
        with self._mlflow.start_run(run_id=run_id, nested=True):
            info = self._mlflow.pyfunc.log_model(
                name=logged_model_name(name), python_model=str(code.with_name("generation_pyfunc.py")),
                code_paths=[str(code), batching.__file__],
                artifacts={"onnx_model": str(model_path), "tokenizer": str(tokenizer_dir),
                           "generator_card": str(card_path)},
                # The params in the example declare `max_new_tokens` and `ignore_eos` in the signature (else
                # MLflow drops them from requests); their values become the defaults, so they are the card's.
                input_example=(GENERATION_EXAMPLE, {"max_new_tokens": card.max_new_tokens, "ignore_eos": False}),
                pip_requirements=SERVING_REQUIREMENTS,
            )
        return info.model_uri

    @contextmanager
    def operation_run(self, kind: str, run_name: str, tags: dict[str, str]) -> Iterator[str]:
        """A run for a step after the decision (rollout, loadtest): tagged with its kind, FAILED with the reason on error.

        It carries no decision key, so it never counts as a decision.
        """
        with self.parent_run(run_name, {**lineage_tags(f"flows.cli {kind}"), TAG_KIND: kind, **tags}) as run_id:
            yield run_id

    def previous_decision(self, decision_key: str) -> dict | None:
        """The tags of an earlier finished run that decided this exact key, if any."""
        runs = self.client.search_runs(
            [self.experiment_id()], filter_string=f"tags.`{TAG_KEY}` = '{decision_key}' and attributes.status = 'FINISHED'",
            max_results=1, order_by=["attributes.start_time DESC"],
        )
        return {"run_id": runs[0].info.run_id, **runs[0].data.tags} if runs else None

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
