"""The deployment a platform team runs: schedule, trigger and concurrency agree with params.yaml."""

import yaml

from flows.deploy import deployment_options, source_model_name
from tasks.config.loading import load_settings
from tests.conftest import REPO


def test_deployment_runs_nightly_and_on_new_versions_of_the_source_model_only():
    settings = load_settings(REPO / "params.yaml")
    options = deployment_options(settings, REPO / "params.yaml")
    assert options["schedules"][0].cron == settings.operations.cron == "0 2 * * *"
    trigger = options["triggers"][0]
    assert trigger.expect == {"mlflow.model_version.created"}
    assert trigger.match.root["prefect.resource.id"] == "mlflow.model.minilm-banking77"
    assert source_model_name(settings) != settings.registry.serving_model_name  # a promotion must not re-trigger
    assert options["global_limit"].limit == 1


def test_prefect_yaml_matches_params():
    settings = load_settings(REPO / "params.yaml")
    deployment = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    # A wrapper that picks requantize's task runner from params.yaml (a flow object fixes its own at import).
    assert deployment["entrypoint"] == "flows/deployed.py:requantize"
    from flows.deployed import requantize

    assert requantize.name == "requantize"
    assert deployment["schedules"][0]["cron"] == settings.operations.cron
    assert deployment["schedules"][0]["timezone"] == settings.operations.timezone
    assert deployment["concurrency_limit"]["limit"] == 1
    trigger = deployment["triggers"][0]
    assert trigger["match"]["prefect.resource.id"] == f"mlflow.model.{source_model_name(settings)}"
    assert "{{ event.payload.version }}" in trigger["parameters"]["model_uri"]
