"""Process-wide defaults for running requant on a machine without network access to hubs."""

import logging
import os

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


def warm_start(preload: tuple[str, ...] = PRELOAD) -> None:
    """Start Prefect's temporary server, when this run needs one, and import `preload` while it starts.

    Without a Prefect API URL, the first flow call starts a temporary server (a subprocess) and
    waits for it doing nothing, ~5 s here; the libraries a run imports later take as long. The
    server is started in a background thread (the same instance Prefect's client uses, so the flow
    finds it running), and the imports run in this thread meanwhile: only the wait is in the
    background, since two threads importing packages that share dependencies can each see the
    other's half-initialised modules. With a server configured, it only imports.
    """
    import importlib
    import threading

    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    starting = None
    if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        from prefect.server.api.server import SubprocessASGIServer

        # A failed start is not lost: the flow's own client starts the server again and reports why.
        starting = threading.Thread(target=SubprocessASGIServer().start, name="prefect-temporary-server", daemon=True)
        starting.start()
    for module in preload:
        importlib.import_module(module)
    if starting is not None:
        starting.join()


def _drop_known_advice(record: logging.LogRecord) -> bool:
    # onnxruntime's quantizer repeats this advice for every call; requant's recipes decide
    # pre-processing themselves (see tasks/recipes/int8_static.py). GX warns about each ephemeral
    # docs folder it creates (it resets its own logger levels on import, so filter here).
    if record.name.startswith("great_expectations") and record.levelno < logging.ERROR:
        return False
    return not record.getMessage().startswith("Please consider")
