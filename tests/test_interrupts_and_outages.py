"""Signals and lost servers, in-process: the pieces the fault suite (tests/test_faults.py) relies on."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tasks import interrupts
from tasks.errors import ServiceUnavailable
from tasks.settings import RegistrySettings
from tasks.tracking import Tracker, service_failure
from tests.servers import free_port


@pytest.fixture
def fresh_interrupts(monkeypatch):
    """tasks.interrupts with no signal received yet; the handlers put back afterwards."""
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
