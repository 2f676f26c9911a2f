"""Process-wide defaults for running requant on a machine without network access to hubs."""

import logging
import os

DEFAULTS = {
    # No network here: Prefect's analytics and GX's usage stats would only time out.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    # Models load from local folders only; a hub lookup would hang without network.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
    # MLflow retries a failed request 7 times with a doubling backoff (about 4 minutes per call),
    # so a lost tracking server used to hold a run for many minutes. Transient errors are still
    # retried, over about 15 s (waits of 0, 2, 4, 8 s plus jitter), and then reported.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
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
    # Root at WARNING: onnxruntime's quantizer logs every tensor at INFO on the root logger.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_known_advice)
    logging.getLogger("requant").setLevel(logging.INFO)
    # urllib3 warns on every retry of an unreachable server; the error line that follows says it once.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    # GX warns about every ephemeral docs folder it creates; that is not news.
    logging.getLogger("great_expectations").setLevel(logging.ERROR)



def _drop_known_advice(record: logging.LogRecord) -> bool:
    # onnxruntime's quantizer repeats this advice for every call; requant's recipes decide
    # pre-processing themselves (see tasks/recipes/int8_static.py). GX warns about each ephemeral
    # docs folder it creates (it resets its own logger levels on import, so filter here).
    if record.name.startswith("great_expectations") and record.levelno < logging.ERROR:
        return False
    return not record.getMessage().startswith("Please consider")
