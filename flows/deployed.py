"""The flow a work-pool deployment runs (prefect.yaml's entrypoint).

An entrypoint names a flow object, so its task runner is fixed when the module is imported; but
requantize's task runner comes from params.yaml (`operations.task_runner: dask` fans the quantize
tasks out to a Dask cluster). This flow reads params.yaml and runs `requantize` with that runner, as
a subflow. `requant run` and `requant serve` choose the runner the same way (flows/runners.py).
"""

from __future__ import annotations

from prefect import flow

from flows.requantize import RunSummary


@flow(name="requantize", log_prints=False)
def requantize(params_path: str = "params.yaml", model_uri: str | None = None, project_dir: str | None = None,
               force: bool = False, fleet: list[str] | None = None) -> RunSummary:
    """Requantize with the task runner params.yaml asks for; the arguments are requantize's own."""
    from flows.runners import requantize_for
    from tasks.config.loading import load_settings

    return requantize_for(load_settings(params_path))(params_path=params_path, model_uri=model_uri,
                                                      project_dir=project_dir, force=force, fleet=fleet)
