"""Server processes started by requant: a free port on 127.0.0.1, wait until /ping answers, stop by PID.

Shared by the served front (tasks/serve/front.py) and the load test's `mlflow models serve`
(tasks/measure/loadtest.py). Every server listens on 127.0.0.1 only and runs in its own process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks.core.errors import RequantError

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_ping(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float,
                  what: str = "`mlflow models serve`", poll_s: float = 0.5) -> None:
    """Wait until the server `process` answers GET /ping at `url`.

    Raises:
        RequantError: it exited first, or did not answer within `timeout_s` (its log's tail in the message).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RequantError(f"{what} exited with {process.returncode} before answering: {tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(poll_s)
    raise RequantError(f"{what} did not answer {url}/ping within {timeout_s:.0f} s (raise "
                       f"loadtest.server_start_timeout_s): {tail(log_path)}")


def tail(log_path: Path) -> str:
    """The last lines of a server's log, on one line, for an error message."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-600:] or "no output"


def stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group led by `process` (its pid), SIGKILL it if still there after `grace_s`."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
    try:  # workers left behind by a leader that exited on its own
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
