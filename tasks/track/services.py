"""When a service the run depends on fails: one line that says which and what to do."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Iterator, Sequence

from tasks.core.write_errors import RunFolder, describe_write_failure


def unreachable(uri: str, exc: Exception) -> str:
    """One line for a tracking store that cannot be opened or does not answer."""
    text = str(exc)
    refused = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    if refused:
        reason = refused.group(1).strip()
    elif "unsupported URI" in text:
        reason = "not a URI scheme MLflow supports: sqlite:///PATH, http(s)://HOST:PORT, postgresql://..."
    else:
        reason = (text.strip().splitlines() or [type(exc).__name__])[0][:200]
        if uri.startswith(("http://", "https://")):
            reason += "; is it an MLflow tracking server?"
    return (f"MLflow tracking store {uri} cannot be used ({reason}): start the server, or set registry.tracking_uri "
            "in params.yaml (or MLFLOW_TRACKING_URI) to a reachable one")


@contextmanager
def single_attempt_requests() -> Iterator[None]:
    """MLflow's HTTP client without its own retries for the block (it reads the setting per request)."""
    name = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    saved = os.environ.get(name)
    os.environ[name] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def is_not_found(exc) -> bool:
    """The registry answered that the model or alias does not exist (sqlite and REST stores say it
    with different codes: RESOURCE_DOES_NOT_EXIST, or INVALID_PARAMETER_VALUE "alias ... not found")."""
    code = getattr(exc, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc))


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def service_failure(exc: BaseException, folders: Sequence[RunFolder] = ()) -> str | None:
    """One line for a failure of a service the run depends on (tracking server, artifact store, a
    folder it writes to), or None if `exc` is something else (a bug keeps its traceback).

    Looks through the exception's causes: MLflow wraps the requests error, boto3 its own.

    Args:
        exc: what the command raised.
        folders: the folders the command writes to (tasks.core.write_errors.run_folders): a full or
            read-only one is named in the line.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        line = describe_service_error(current, folders)
        if line:
            return line + unmarked_note(exc)
        current = current.__cause__ or current.__context__
    return None


def unmarked_note(exc: BaseException) -> str:
    """'; its MLflow run ... stays RUNNING ...' when the failed run could not be marked, else ''."""
    unmarked = getattr(exc, "requant_unmarked_run", None)
    return (f"; its MLflow run {unmarked} could not be marked FAILED and stays RUNNING until a later run closes it"
            if unmarked else "")


def describe_service_error(exc: BaseException, folders: Sequence[RunFolder] = ()) -> str | None:
    name = type(exc).__name__
    module = type(exc).__module__
    text = first_line(exc, 300)
    if name == "MlflowException" and text.startswith("API request to "):
        # "API request to http://host/api/2.0/... failed with exception ...": keep the server's address.
        server = text[len("API request to "):].split("/api/", 1)[0]
        return (f"the MLflow tracking server at {server} did not answer (retried with backoff): check that it "
                "runs and MLFLOW_TRACKING_URI, then run again")
    if module.startswith(("botocore", "boto3")):
        return (f"the S3 artifact store failed ({name}: {text}): check MLFLOW_S3_ENDPOINT_URL, the bucket and "
                "its credentials, then run again")
    if module.startswith(("requests", "urllib3")) and "Connection" in name:
        return f"a server did not answer ({text}): check that it runs, then run again"
    # Full and read-only are told apart, and the folder named (tasks/core/write_errors.py).
    return describe_write_failure(exc, list(folders))
