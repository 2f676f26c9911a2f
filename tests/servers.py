"""Real servers for tests: start one on 127.0.0.1 on a free port, stop it by its PID.

Plain functions and context managers (no pytest plugin), so any test or script can use them:

    with moto_s3_server() as endpoint_url:
        boto3.client("s3", endpoint_url=endpoint_url).create_bucket(Bucket="b")

Servers bind 127.0.0.1 only: tests must never expose a port beyond this machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now.

    The OS picks it (bind to port 0); the socket is closed before returning, so another process
    could take it in between. Callers that start a server on it detect that by the server exiting.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def venv_executable(name: str) -> Path:
    """The console script `name` installed next to the running Python (the project's venv).

    Raises:
        FileNotFoundError: if the venv has no such script (e.g. `moto[server]` is not installed).
    """
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install the test extras (pip install -e '.[test]')")
    return path


def wait_until_answering(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Poll `url` until any HTTP answer comes back, the process dies, or `timeout_s` passes.

    Any HTTP status (even 404) counts as answering: the point is that the server is listening.

    Raises:
        RuntimeError: if the process exited or did not answer in time; the message carries its log.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server (pid {process.pid}) exited with {process.returncode} before answering "
                               f"{url}; its output:\n{log_path.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"server (pid {process.pid}) did not answer {url} within {timeout_s:.0f} s; its output:\n"
                       f"{log_path.read_text(errors='replace')[-4000:]}")


def stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop `process` by its PID: SIGTERM, then SIGKILL if it has not exited after `grace_s`."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def moto_s3_server(startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Run moto's S3-compatible HTTP server on a free port; yield its endpoint URL.

    Each server holds its own in-memory buckets, so tests that start their own server share nothing.
    Clients still need credentials (any values) and a region in their environment.

    Args:
        startup_timeout_s: How long to wait for the server to answer before giving up.

    Yields:
        The endpoint URL, e.g. ``http://127.0.0.1:54321``.

    Raises:
        RuntimeError: if the server exits early or does not answer within `startup_timeout_s`.
    """
    port = free_port()
    url = f"http://{HOST}:{port}"
    # Output goes to a file, not a pipe: a pipe nobody reads fills up and blocks the server.
    with tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        process = subprocess.Popen([str(venv_executable("moto_server")), "-H", HOST, "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until_answering(url, process, log_path, startup_timeout_s)
        yield url
    finally:
        stop_process(process)
        log_path.unlink(missing_ok=True)


@contextmanager
def background(command: list[str], log_path: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """Run a long-lived command (a server, a receiver, `requant serve`) and stop it by its PID afterwards.

    Output goes to a file, not a pipe: a pipe nobody reads fills up and blocks the process.
    """
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        yield process
    finally:
        stop_process(process)


@contextmanager
def http_server(command: list[str], health_url: str, log_path: Path, env: dict[str, str],
                startup_timeout_s: float) -> Iterator[None]:
    """`background`, and wait until `health_url` answers before handing over."""
    with background(command, log_path, env) as process:
        wait_until_answering(health_url, process, log_path, startup_timeout_s)
        yield


@contextmanager
def prefect_api_server(home: Path, startup_timeout_s: float = 90.0) -> Iterator[str]:
    """Run `prefect server start` on a free port with its own PREFECT_HOME; yield its API URL.

    Analytics are off (no network). The server is stopped by its PID.
    """
    port = free_port()
    api = f"http://{HOST}:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": api, "PREFECT_UI_ENABLED": "false"}
    home.mkdir(parents=True, exist_ok=True)
    command = [str(venv_executable("prefect")), "server", "start", "--host", HOST, "--port", str(port)]
    with http_server(command, f"{api}/health", home / "server.log", env, startup_timeout_s):
        yield api


@contextmanager
def mlflow_tracking_server(root: Path, startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Run `mlflow server` (one worker, sqlite, local artifacts) with webhooks to local receivers allowed.

    Only a server sends registry webhooks; local http receivers need the two MLFLOW_WEBHOOK_* flags.
    """
    port = free_port()
    url = f"http://{HOST}:{port}"
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [str(venv_executable("mlflow")), "server", "--host", HOST, "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts")]
    with http_server(command, f"{url}/health", root / "mlflow-server.log", env, startup_timeout_s):
        yield url


class TcpProxy:
    """A loopback TCP forwarder in front of a server, which a test can cut and restore.

    Cutting closes the listening socket and every open connection, so clients see what a lost
    server looks like (connection refused, reset) while the server behind keeps its state (a moto
    server holds its buckets in memory: killing it would lose them).
    """

    def __init__(self, target_port: int) -> None:
        import threading

        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        import threading

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        with self._lock:
            sockets, self._open = [self._listener, *self._open], set()
            self._listener = None
        for sock in sockets:
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection((HOST, self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@contextmanager
def tcp_proxy(target_port: int) -> Iterator[TcpProxy]:
    """A `TcpProxy` to 127.0.0.1:target_port, listening until the block ends."""
    proxy = TcpProxy(target_port)
    proxy.restore()
    try:
        yield proxy
    finally:
        proxy.cut()


class MlflowServer:
    """`mlflow server` (sqlite, local artifacts) that a test can kill, with its workers, and start
    again on the same port and store: a tracking-server outage and its recovery."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> None:
        """Start the server and wait until it answers /health."""
        env = {**os.environ}
        env.pop("MLFLOW_TRACKING_URI", None)
        log_path = self.root / "mlflow-server.log"
        command = [str(venv_executable("mlflow")), "server", "--host", HOST, "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                   "--default-artifact-root", str(self.root / "artifacts")]
        with open(log_path, "a") as log:
            # Its own process group: `mlflow server` runs uvicorn and a job runner as children.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)
        wait_until_answering(f"{self.url}/health", self.process, log_path, timeout_s)

    def kill(self) -> None:
        """SIGKILL the server and its children (its process group), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """Stop the server and its children: SIGTERM to the group, then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
