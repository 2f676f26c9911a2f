"""The requantize deployment: nightly on a cron schedule, and on every new source model version.

`requant serve` runs it in this process (flow.serve); platform teams who use work pools deploy the
same definition from prefect.yaml instead (see README, "Operations").
"""

from __future__ import annotations

from pathlib import Path

from flows.webhook_receiver import EVENT, resource_id
from tasks.config.settings import Settings

DEPLOYMENT = "requantize"


def source_model_name(settings: Settings) -> str:
    """The registered model whose new versions trigger a re-tune (never the serving model: that would loop)."""
    uri = settings.model.source_uri
    if not uri.startswith("models:/"):
        return settings.train.registered_model_name
    return uri[len("models:/"):].split("@")[0].split("/")[0]


def deployment_options(settings: Settings, params_path: Path) -> dict:
    """Schedule, trigger, default parameters and concurrency of the requantize deployment."""
    from prefect.client.schemas.objects import (
        ConcurrencyLimitConfig,
        ConcurrencyLimitStrategy,
    )
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    name = source_model_name(settings)
    if name == settings.registry.serving_model_name:
        from tasks.core.errors import RequantError

        raise RequantError("model.source_uri names the serving model: a promotion would trigger itself; fix params.yaml")
    params = str(Path(params_path).resolve())
    return {
        "name": DEPLOYMENT,
        "schedules": [Cron(settings.operations.cron, timezone=settings.operations.timezone)],
        "triggers": [DeploymentEventTrigger(
            name=f"new-version-of-{name}",
            expect={EVENT},
            match={"prefect.resource.id": resource_id(name)},
            parameters={"params_path": params,
                        "model_uri": "models:/{{ event.payload.name }}/{{ event.payload.version }}"},
        )],
        "parameters": {"params_path": params},
        # One run at a time; a colliding run waits its turn instead of being dropped.
        "global_limit": ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
    }


def serve(settings: Settings, params_path: Path) -> None:
    """Serve the deployment until interrupted (SIGTERM pauses its schedule)."""
    from flows.runners import requantize_for

    requantize_for(settings).serve(**deployment_options(settings, params_path))
