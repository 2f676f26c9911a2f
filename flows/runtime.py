"""Process-wide defaults for running requant on a machine without network access to hubs."""

import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

DEFAULTS = {
    # No network here: Prefect's analytics and GX's usage stats would only time out.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's temporary server takes ~18 s to start on an idle 2-core host, and times out at its
    # default 20 s when the host is busy: a run must not fail for that.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "GX_ANALYTICS_ENABLED": "false",
    # Models load from local folders only; a hub lookup would hang without network.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
    # MLflow retries an unreachable server 7 times with a doubling backoff (~4 minutes) and waits
    # 120 s per request. Bounded here: 3 retries 0/2/4 s apart (< 10 s for a closed port), 30 s per
    # request, then one error line. A user's own values win (setdefault).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def configure(verbose: bool = False) -> None:
    """Set environment defaults (never overriding the user's) and route logs to stderr.

    Call before importing Prefect: it reads some settings at import.
    """
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not verbose:
        # Prefect logs every state change; requant's own progress lines are enough by default.
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        # urllib3 logs each retry of an unreachable server; the one error line that follows says it.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    # Root at WARNING: onnxruntime's quantizer logs every tensor at INFO on the root logger.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_known_advice)
    logging.getLogger("requant").setLevel(logging.INFO)
    # urllib3 warns on every retry of an unreachable server; the error line that follows says it once.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    # GX warns about every ephemeral docs folder it creates; that is not news.
    logging.getLogger("great_expectations").setLevel(logging.ERROR)


# Libraries a requantize run imports on its way (validation, the FP32 reference, quantization): a few
# seconds of imports on a 2-core host, and they fit in the wait for Prefect's temporary server.
PRELOAD = ("great_expectations", "torch", "transformers", "onnxruntime.quantization")


@contextmanager
def prefect_api(preload: tuple[str, ...] = PRELOAD, timeout_s: float = 180.0) -> Iterator[str | None]:
    """The Prefect API for one run: the configured server, or a temporary one for the duration.

    Without a Prefect API URL, Prefect itself would start a temporary server at the first flow call
    (importing its server code here first, ~3 s, then waiting ~5 s for the subprocess doing
    nothing). Here the same server process (uvicorn on Prefect's app factory, 127.0.0.1, a free
    port, UI and background services off, as Prefect starts it) is spawned at once, the libraries a
    run loads later (`preload`) are imported while it starts, and it is stopped (by its PID) on the
    way out. With a server configured it only imports. Yields the temporary server's URL, or None.

    Raises:
        RequantError: the temporary server did not answer within timeout_s (its exit code is given).
    """
    import importlib

    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        get_current_settings,
        temporary_settings,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        for module in preload:
            importlib.import_module(module)
        yield None
        return
    settings_env = get_current_settings().to_environment_variables(exclude_unset=True)
    server, url = _spawn_prefect_server(settings_env)
    try:
        for module in preload:
            importlib.import_module(module)
        # A server that exits at once is started again, as Prefect does: two runs starting together on
        # one Prefect database race on its migrations (exit code 3), and the second try finds them done.
        for attempt in range(3):
            if _wait_healthy(server, url, timeout_s, raise_error=attempt == 2):
                break
            server, url = _spawn_prefect_server(settings_env)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _spawn_prefect_server(settings_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Start Prefect's API app under uvicorn on 127.0.0.1 and a free port, as Prefect's own temporary server."""
    import prefect

    from tasks.serve.processes import free_port

    port = free_port()
    env = {**os.environ, **settings_env,
           # What Prefect sets for its temporary server: no UI, no background services, final shutdown.
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"], env=env)
    return server, f"http://127.0.0.1:{port}/api"


def _wait_healthy(server: subprocess.Popen, url: str, timeout_s: float, raise_error: bool = True) -> bool:
    """True once the server answers; False if it exited (unless `raise_error`), RequantError otherwise."""
    import urllib.error
    import urllib.request

    from tasks.core.errors import RequantError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            if not raise_error:
                return False
            break
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    why = f"exit code {server.returncode}" if server.poll() is not None else f"no answer in {timeout_s:.0f} s"
    raise RequantError(f"Prefect's temporary server did not start ({why}): start one (`prefect server start`) "
                       "and set PREFECT_API_URL, or check the database under PREFECT_HOME")


def _drop_known_advice(record: logging.LogRecord) -> bool:
    # onnxruntime's quantizer repeats this advice for every call; requant's recipes decide
    # pre-processing themselves (see tasks/recipes/int8_static.py). GX warns about each ephemeral
    # docs folder it creates (it resets its own logger levels on import, so filter here).
    if record.name.startswith("great_expectations") and record.levelno < logging.ERROR:
        return False
    return not record.getMessage().startswith("Please consider")
