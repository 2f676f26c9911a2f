"""The flow a fleet worker runs (entrypoint of the `measure-profile` deployments, one per profile).

It measures a requantize run's request on the machine its work pool stands for and writes the answer
next to the request (tasks/fleet/measure.py); the requantize flow waits for it (flows/fleet.py).
"""

from __future__ import annotations

from prefect import flow

FLOW_NAME = "measure-profile"


@flow(name=FLOW_NAME, log_prints=False)
def measure_profile(request_path: str, profile: str) -> dict:
    """Time and load-test the request's candidates here, as `profile`; returns where the answer is and its size."""
    from flows import runtime
    from tasks.fleet.measure import measure_request

    runtime.configure()  # requant's progress lines in the worker's log, offline defaults
    measurement = measure_request(request_path, profile)
    return {"profile": profile, "timed": sorted(measurement.speeds), "served": sorted(measurement.served),
            "errors": measurement.errors, "seconds": measurement.seconds}
