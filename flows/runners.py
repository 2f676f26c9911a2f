"""Choose where the quantize fan-out runs: threads in this process, or a Dask cluster."""

from __future__ import annotations

from tasks.settings import OperationsSettings, Settings


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
