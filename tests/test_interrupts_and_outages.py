"""Signals and lost servers, in-process: the pieces the fault suite (tests/test_faults.py) relies on."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tasks.config.settings import RegistrySettings
from tasks.core import interrupts
from tasks.core.errors import ServiceUnavailable
from tasks.track import Tracker, service_failure
from tests.servers import free_port


@pytest.fixture
def fresh_interrupts(monkeypatch):
    """tasks.core.interrupts with no signal received yet; the handlers put back afterwards."""
    saved = {s: signal.getsignal(s) for s in interrupts.HANDLED}
    monkeypatch.setattr(interrupts, "_received", None)
    monkeypatch.setattr(interrupts, "_signals_seen", 0)
    monkeypatch.setattr(interrupts, "_start_watchdog", lambda: None)  # the test process must not exit
    yield interrupts
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupts_signal_raises_with_phase_and_exit_code(fresh_interrupts, signum):
    fresh_interrupts.install()
    fresh_interrupts.enter_phase("evaluate")
    with pytest.raises(interrupts.Interrupted) as raised:
        os.kill(os.getpid(), signum)
        time.sleep(1)  # the handler runs at the next bytecode
    assert str(raised.value) == f"interrupted by {signal.Signals(signum).name} during evaluate"
    assert raised.value.exit_code == 128 + signum


def test_interrupts_check_raises_again_when_the_first_raise_was_swallowed(fresh_interrupts):
    fresh_interrupts.install()
    fresh_interrupts.enter_phase("search")
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    except BaseException:  # noqa: BLE001 - a library swallowing the interruption is the case under test
        pass
    with pytest.raises(interrupts.Interrupted, match="SIGINT during search"):
        fresh_interrupts.enter_phase("select")


def test_interrupts_chain_to_an_existing_handler(fresh_interrupts):
    """Prefect's SIGTERM bridge stays in charge of its own exception; the reason is still recorded."""
    class Bridge(BaseException):
        pass

    def prefect_like(signum, frame):
        raise Bridge()

    signal.signal(signal.SIGTERM, prefect_like)
    fresh_interrupts.install()
    fresh_interrupts.enter_phase("quantize")
    with pytest.raises(Bridge):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert fresh_interrupts.reason(Bridge()) == "interrupted by SIGTERM during quantize"


def _unreachable_tracker(monkeypatch, tmp_path) -> Tracker:
    """A tracker whose server went away after it was opened (a server that is down from the start is
    refused by the constructor's probe, see tests/test_bad_inputs.py)."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(RegistrySettings(tracking_uri=f"sqlite:///{tmp_path / 'gone.db'}", artifact_location=str(tmp_path)))
    tracker.uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more
    tracker.client = MlflowClient(tracker.uri)
    return tracker


def test_tracking_production_is_none_only_when_the_registry_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(RegistrySettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                       artifact_location=str(tmp_path / "art")))
    assert tracker.production() is None

    with pytest.raises(ServiceUnavailable, match="did not answer"):
        _unreachable_tracker(monkeypatch, tmp_path).production()


def test_tracking_service_failure_is_one_line_naming_the_server(tmp_path, monkeypatch):
    tracker = _unreachable_tracker(monkeypatch, tmp_path)
    with pytest.raises(Exception) as raised:
        tracker.experiment_id()
    line = service_failure(raised.value)
    assert line is not None and "\n" not in line
    assert tracker.uri in line and "did not answer" in line
    assert service_failure(ValueError("a bug")) is None


# A run whose unwinding gets stuck after SIGTERM (here: a loop that swallows every raise, as a library
# lock left held by the raise would): the watchdog must end it, and its MLflow run must still end KILLED.
STUCK_RUN = """
import sys, time
from tasks.core import interrupts
from tasks.config.settings import RegistrySettings
from tasks.track import Tracker

interrupts.GRACE_S = 1.0
interrupts.install()
interrupts.enter_phase("data")
tracker = Tracker(RegistrySettings(tracking_uri=sys.argv[1], artifact_location=sys.argv[2]))
interrupts.on_forced_exit(lambda reason: time.sleep(3600))  # a last word that hangs cannot hold the exit
with tracker.parent_run("requantize", {}) as run_id:
    print(run_id, flush=True)
    while True:
        try:
            time.sleep(60)
        except BaseException:
            pass
"""


def test_forced_exit_after_a_stuck_unwinding_still_ends_the_mlflow_run_killed(tmp_path):
    import subprocess
    import sys

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the sqlite store given
    child = subprocess.Popen([sys.executable, "-c", STUCK_RUN, uri, str(tmp_path / "art")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    run_id = child.stdout.readline().strip()
    assert run_id, child.stderr.read()
    start = time.monotonic()
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert time.monotonic() - start < 1.0 + interrupts.LAST_WORDS_S + 10  # grace + bounded last words
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: interrupted by SIGTERM during data: stopped without waiting for cleanup; nothing was promoted after the signal"]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["requant.failure"] == "interrupted by SIGTERM during data"
