"""Choose where the quantize fan-out runs: threads in this process, or a Dask cluster."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from tasks.config.settings import OperationsSettings, Settings
from tasks.core.errors import RequantError


def task_runner(operations: OperationsSettings):
    """The Prefect task runner that operations.task_runner asks for.

    With Dask, each worker process talks to Prefect's API: point PREFECT_API_URL at a running
    server, or every worker starts its own temporary one (32 s vs 4.6 s for 4 tiny tasks here).
    """
    if operations.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if operations.dask_address:
            return DaskTaskRunner(address=operations.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": operations.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner()


def requantize_for(settings: Settings):
    """The requantize flow with the task runner its settings ask for."""
    from flows.requantize import requantize

    return requantize.with_options(task_runner=task_runner(settings.operations))


def require_prefect_api(timeout_s: float = 10.0) -> None:
    """Check that the Prefect server named by PREFECT_API_URL answers, if one is named.

    Without the check an unreachable server surfaces as a Prefect traceback once the flow starts.
    Unset, Prefect starts a temporary local server itself and there is nothing to check.

    Raises:
        RequantError: the server does not answer its /health endpoint within timeout_s.
    """
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        return
    try:
        with urllib.request.urlopen(f"{api.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} from /health: is this a Prefect API URL (ending in /api)?"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise RequantError(f"Prefect API {api} cannot be used ({reason}): start it (`prefect server start`) "
                       "or unset PREFECT_API_URL to let requant start a temporary local server")
