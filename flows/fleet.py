"""Measurement where the hardware is: one `measure-profile` deployment per profile's work pool, a
run of it per profile for each requantize run, and the answers collected.

A profile is listed as not measured, with the reason, when its deployment is missing, its pool has
no live worker (none has sent a heartbeat within three of its own heartbeat intervals), its worker
goes silent while measuring, its run fails or crashes, or it does not answer within
cost.fleet_timeout_minutes. It is never ranked; the requantize run goes on with the rest.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flows.measure_profile import FLOW_NAME
from tasks.config.settings import HardwareProfile, Settings
from tasks.fleet.measure import ProfileMeasurement

log = logging.getLogger("requant")

HEARTBEATS_MISSED = 3  # a worker silent for three of its heartbeat intervals is gone (Prefect's own rule)
POLL_S = 2.0


def deployment_name(profile: HardwareProfile) -> str:
    """The deployment that measures on `profile`'s pool (its flow's name not included)."""
    return f"measure-{profile.name}"


def full_name(profile: HardwareProfile) -> str:
    """FLOW/DEPLOYMENT, as Prefect looks a deployment up."""
    return f"{FLOW_NAME}/{deployment_name(profile)}"


def deploy(settings: Settings, code_dir: Path) -> list[str]:
    """Create each pool of a profile with a work_pool (process type) if missing, and deploy the
    measurement flow from `code_dir` onto it; returns the deployments' full names."""
    from prefect import flow as prefect_flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    names = []
    with get_client(sync_client=True) as client:
        for profile in [p for p in settings.cost.hardware_profiles if p.work_pool]:
            try:
                client.create_work_pool(WorkPoolCreate(name=profile.work_pool, type="process",
                                                       description=f"requant: measures as {profile.name}"))
            except ObjectAlreadyExists:
                pass
            source = prefect_flow.from_source(str(code_dir.resolve()), "flows/measure_profile.py:measure_profile")
            source.deploy(name=deployment_name(profile), work_pool_name=profile.work_pool, print_next_steps=False,
                          description=f"Time and load-test a requantize run's candidates as {profile.name} "
                                      f"(${profile.usd_per_hour}/h)", tags=["requant", "fleet"])
            names.append(full_name(profile))
    return names


@dataclass
class Answer:
    """One profile's answer: its measurement, or why there is none; the wall time it took."""

    profile: str
    measurement: ProfileMeasurement | None
    not_measured_because: str | None
    wall_seconds: float


def measure_fleet(profiles: list[HardwareProfile], request_path: Path, result_path_of, timeout_s: float,
                  parallel: bool) -> dict[str, Answer]:
    """Run each profile's measurement deployment on `request_path` and wait for the answers.

    Args:
        result_path_of: profile name -> the file its worker writes.
        parallel: all profiles at once (separate machines), else one after another (pools sharing a host).
    """
    def one(profile: HardwareProfile) -> Answer:
        start = time.perf_counter()
        try:
            measurement = _measure_on(profile, request_path, result_path_of(profile.name), timeout_s)
            return Answer(profile.name, measurement, None, time.perf_counter() - start)
        except NotMeasured as exc:
            log.warning("%s not measured: %s", profile.name, exc)
            return Answer(profile.name, None, str(exc), time.perf_counter() - start)

    if parallel:
        with ThreadPoolExecutor(max_workers=len(profiles) or 1) as pool:
            return {a.profile: a for a in pool.map(one, profiles)}
    return {p.name: one(p) for p in profiles}


class NotMeasured(Exception):
    """Why a profile has no measurement (its text goes into the record)."""


def live_workers(client, pool: str) -> list[str]:
    """Names of the pool's workers whose last heartbeat is within three of their heartbeat intervals."""
    from prefect.exceptions import ObjectNotFound

    try:
        workers = client.read_workers_for_work_pool(pool)
    except ObjectNotFound:
        raise NotMeasured(f"work pool {pool} does not exist: run `requant fleet-deploy` and start a worker "
                          f"(prefect worker start --pool {pool})") from None
    now = datetime.now(timezone.utc)
    return [w.name for w in workers if w.last_heartbeat_time is not None
            and (now - w.last_heartbeat_time).total_seconds() < HEARTBEATS_MISSED * (w.heartbeat_interval_seconds or 30)]


def _measure_on(profile: HardwareProfile, request_path: Path, result_path: Path,
                timeout_s: float) -> ProfileMeasurement:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    pool = profile.work_pool
    with get_client(sync_client=True) as client:
        if not live_workers(client, pool):
            raise NotMeasured(f"no live worker in work pool {pool}: start one on a {profile.name} machine "
                              f"(prefect worker start --pool {pool})")
        name = full_name(profile)
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise NotMeasured(f"no deployment {name}: run `requant fleet-deploy --params PARAMS`") from None
        result_path.unlink(missing_ok=True)
        run = run_deployment(name, parameters={"request_path": str(request_path), "profile": profile.name},
                             timeout=0, flow_run_name=f"measure-{profile.name}")
        log.info("%s: measuring on work pool %s (flow run %s)", profile.name, pool, run.id)
        deadline = time.monotonic() + timeout_s
        while True:
            state = client.read_flow_run(run.id).state
            if state is not None and state.is_final():
                break
            why = None
            if time.monotonic() > deadline:
                why = f"no answer within {timeout_s / 60:.0f} min (cost.fleet_timeout_minutes)"
            elif not live_workers(client, pool):
                why = f"the worker of work pool {pool} went silent while measuring (state {state.name if state else '?'})"
            if why:
                # Its run will never report: mark it crashed so the UI does not show it running forever.
                client.set_flow_run_state(run.id, Crashed(message=f"requant: {why}"), force=True)
                raise NotMeasured(why)
            time.sleep(POLL_S)
        if not state.is_completed():
            raise NotMeasured(f"its measurement ended {state.name}: {(state.message or '').strip()[:300]}")
        if not result_path.is_file():
            raise NotMeasured(f"its run completed but wrote no answer at {result_path} (is the work folder shared "
                              "storage at the same path on the worker?)")
        return ProfileMeasurement.from_dict(json.loads(result_path.read_text()))
