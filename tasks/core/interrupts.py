"""Ctrl-C and SIGTERM stop a run: the reason is recorded, and nothing is promoted after the signal.

Python runs signal handlers in the main thread only, between bytecodes. Prefect runs a sync flow's
body in the main thread, but submitted tasks run in worker threads, and library code may catch a
KeyboardInterrupt (a subprocess wait, a broad `except BaseException`). So a signal is handled in
two ways at once:

- the handler raises `Interrupted` (a BaseException, so `except Exception` in the tasks does not
  swallow it) where the main thread is, which unwinds the flow and ends its MLflow run;
- the signal is also recorded, and `check()` (called at every phase start and right before the
  production alias moves) raises again if anything swallowed the first raise.

A watchdog ends the process `GRACE_S` seconds after the first signal if unwinding is stuck (a
long native call, a worker thread that cannot be interrupted, a library lock left held by the raise);
file locks die with the process. Before it does, it runs the "last words" registered with
`on_forced_exit` (the tracker marks its MLflow run KILLED with the reason), for at most
`LAST_WORDS_S` seconds in all. This module imports neither Prefect nor MLflow.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

GRACE_S = 30.0
LAST_WORDS_S = 5.0
HANDLED = (signal.SIGINT, signal.SIGTERM)

_lock = threading.Lock()
_received: Interrupted | None = None
_signals_seen = 0
_phase = "setup"
_last_words: dict[int, Callable[[str], None]] = {}


class Interrupted(BaseException):
    """The run was asked to stop by a signal; `str()` says which and in what phase."""

    def __init__(self, signum: int, phase: str) -> None:
        super().__init__(signum, phase)
        self.signum = signum
        self.phase = phase

    @property
    def signal_name(self) -> str:
        """SIGINT or SIGTERM."""
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell convention for death by a signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"interrupted by {self.signal_name} during {self.phase}"


def enter_phase(name: str) -> None:
    """Note the phase the run is in (named in the interruption reason), and stop if a signal came."""
    global _phase
    _phase = name
    check()


def received() -> Interrupted | None:
    """The first interruption of this process, if any."""
    return _received


def check() -> None:
    """Raise `Interrupted` if a signal was received (even if its first raise was swallowed)."""
    if _received is not None:
        raise Interrupted(_received.signum, _received.phase)


def on_forced_exit(action: Callable[[str], None]) -> Callable[[], None]:
    """Have `action(reason)` run if the watchdog has to end the process; return a function that undoes it.

    For what must outlive a stuck unwinding: recording why the run stopped somewhere durable. The
    action runs in the watchdog's thread, bounded by LAST_WORDS_S, and its errors are ignored.
    """
    # No lock: a signal can land while this runs, and its handler must never wait on one held here
    # (a dict's item set and pop are atomic in CPython).
    key = id(action)
    _last_words[key] = action

    def forget() -> None:
        _last_words.pop(key, None)

    return forget


def reason(exc: BaseException) -> str:
    """Why a run ends with `exc`: the interruption if there was one (Prefect turns SIGTERM into
    its own TerminationSignal), else the exception's own message."""
    return str(_received) if _received is not None else str(exc)


def install() -> None:
    """Handle SIGINT and SIGTERM from here on (main thread only; elsewhere this does nothing).

    A Python handler already installed for the signal (Prefect's SIGTERM bridge, which reports a
    crash or a runner-requested cancellation to the Prefect API) is called after recording, so
    its own handling still happens; otherwise `Interrupted` is raised.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in HANDLED:
        previous = signal.getsignal(signum)
        if getattr(previous, "_requant_handler", False):
            previous = getattr(previous, "_requant_previous", None)
        signal.signal(signum, _handler_chaining(previous))


def _handler_chaining(previous):
    def handle(signum, frame):
        global _received, _signals_seen
        with _lock:
            _signals_seen += 1
            first = _received is None
            if first:
                _received = Interrupted(signum, _phase)
        if not first:
            # A second signal (or Prefect re-sending SIGTERM to itself after its own handling)
            # must not break the cleanup under way; a third one ends the process at once.
            if _signals_seen >= 3:
                _exit_now()
            return
        _start_watchdog()
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)
        raise Interrupted(signum, _phase)

    handle._requant_handler = True
    handle._requant_previous = previous
    return handle


def _start_watchdog() -> None:
    timer = threading.Timer(GRACE_S, _forced_exit)
    timer.daemon = True
    timer.start()


def _forced_exit() -> None:
    """The unwinding did not finish in GRACE_S: say the last words (bounded), then end the process."""
    stop = str(_received or Interrupted(signal.SIGTERM, _phase))
    # All at once, each in a daemon thread: one that hangs (a server that does not answer) neither
    # holds the exit nor takes the others' time.
    speakers = [threading.Thread(target=_quietly, args=(action, stop), daemon=True) for action in list(_last_words.values())]
    for speaker in speakers:
        speaker.start()
    deadline = time.monotonic() + LAST_WORDS_S
    for speaker in speakers:
        speaker.join(max(0.0, deadline - time.monotonic()))
    _exit_now()


def _quietly(action: Callable[[str], None], stop: str) -> None:
    try:
        action(stop)
    except Exception:  # noqa: BLE001 - the process is ending either way; the error line says why
        pass


def _exit_now() -> None:
    stop = _received or Interrupted(signal.SIGTERM, _phase)
    sys.stderr.write(f"error: {stop}: stopped without waiting for cleanup; nothing was promoted after the signal\n")
    sys.stderr.flush()
    os._exit(stop.exit_code)
