"""What an operator checks in infra/docker-compose.yml before running it.

Docker is not available on the development machines, so the stack is validated structurally: the
file parses, the services are wired as intended, and no secret is committed. The same services run
as processes under infra/stack.sh (tests/test_stack_e2e.py); the checks at the end keep the two alike.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"

EXPECTED_SERVICES = {"postgres", "minio", "minio-setup", "mlflow", "mlflow-setup", "prefect-server", "prefect-setup",
                     "prefect-worker", "webhook-receiver", "dask-scheduler", "dask-worker"}
REQUANT_IMAGE_SERVICES = {"mlflow", "mlflow-setup", "prefect-server", "prefect-setup", "prefect-worker",
                          "webhook-receiver", "dask-scheduler", "dask-worker"}
# Services whose processes run requant code against MLflow: they log in as requant, never as the admin.
REQUANT_CLIENTS = {"prefect-worker", "dask-worker"}
# Names of variables that hold credentials; their values must come from the environment.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|AUTH_STRING|TOKEN|ENCRYPTION_KEY", re.IGNORECASE)
# A compose interpolation `${VAR}`, `${VAR:-default}`, `${VAR:?message}`; `$${...}` is an escaped `$`.
INTERPOLATION = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<modifier>:?[-?+])?(?P<rest>[^}]*)\}")
REQUIRED_VARIABLE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}")
# Credentials that image docs and tutorials use; any of them in the file means a committed secret.
WELL_KNOWN_CREDENTIALS = ("minioadmin", "password1234", "changeme", "change-me", "postgres:postgres", "secret123")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def environment(service: dict) -> dict[str, str]:
    """A service's environment as a dict, whichever of compose's two forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: str(value) for key, value in env.items()}


def command(service: dict) -> str:
    """A service's command as one string (list or string form)."""
    cmd = service.get("command", "")
    return " ".join(str(part) for part in cmd) if isinstance(cmd, list) else str(cmd)


def all_strings(node) -> list[str]:
    """Every string key and value anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in all_strings(key) + all_strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in all_strings(item)]
    return [node] if isinstance(node, str) else []


def env_example_variables() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


def test_compose_defines_the_production_services(services):
    missing = EXPECTED_SERVICES - services.keys()
    assert not missing, f"services missing from {COMPOSE.name}: {sorted(missing)}"


def test_compose_builds_one_requant_image_from_infra_dockerfile(services):
    images = {services[name].get("image") for name in REQUANT_IMAGE_SERVICES}
    assert len(images) == 1 and None not in images, f"requant services should share one image, got {images}"
    for name in REQUANT_IMAGE_SERVICES:
        build = services[name].get("build") or {}
        assert build.get("dockerfile") == "infra/Dockerfile" and (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file(), name


def test_dockerfile_installs_cpu_torch_before_the_constrained_package():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    torch = dockerfile.index("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    package = dockerfile.index('pip install -c constraints.txt ".[stack]"')
    assert torch < package, "torch must be installed from the CPU index before the package, or pip pulls a CUDA build"


def test_compose_secrets_come_from_required_environment_variables(services):
    for name, service in services.items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_VARIABLE.fullmatch(value), (
                    f"{name}.{key} must be a required variable like ${{{key}:?set {key}}}, got {value!r}")


def test_compose_file_holds_no_literal_credentials(compose):
    text = COMPOSE.read_text()
    for credential in WELL_KNOWN_CREDENTIALS:
        assert credential not in text.lower(), f"{COMPOSE.name} contains the well-known credential {credential!r}"
    for string in all_strings(compose):
        # A password inside a URI (scheme://user:password@host) must itself be interpolated.
        for userinfo in re.findall(r"://[^/@\s:]+:([^@\s]+)@", string):
            assert REQUIRED_VARIABLE.fullmatch(userinfo), f"literal password in URI: {string!r}"
        # A secret variable with a default would commit that default as the secret.
        for match in INTERPOLATION.finditer(string):
            if SECRET_NAME.search(match["name"]):
                assert match["modifier"] == ":?", f"secret {match['name']} must be required (:?), in {string!r}"


def test_mlflow_runs_with_basic_auth_postgres_and_s3_artifacts(services):
    mlflow = command(services["mlflow"])
    assert re.search(r"\bmlflow server\b", mlflow)
    assert re.search(r"--app-name basic-auth\b", mlflow), mlflow
    # +psycopg2: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed.
    assert re.search(r"--backend-store-uri postgresql\+psycopg2://\S+@postgres:5432/mlflow\b", mlflow), mlflow
    assert re.search(r"--artifacts-destination s3://\S+", mlflow), mlflow
    assert re.search(r"--allowed-hosts \S+", mlflow) and "--allowed-hosts *" not in mlflow, mlflow
    env = environment(services["mlflow"])
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert REQUIRED_VARIABLE.fullmatch(env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"])
    assert REQUIRED_VARIABLE.fullmatch(env["PGPASSWORD"]), "the backend URI has no password, so libpq needs PGPASSWORD"


def test_mlflow_auth_config_keeps_users_in_postgres_without_a_password():
    auth_ini = (INFRA / "mlflow" / "basic_auth.ini").read_text()
    assert re.search(r"^database_uri = postgresql\+psycopg2://mlflow@postgres:5432/mlflow_auth$", auth_ini, re.MULTILINE)
    assert "admin_password" not in auth_ini


def test_prefect_server_stores_its_state_in_postgres(services):
    env = environment(services["prefect-server"])
    url = env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/prefect" in url, url
    assert re.search(r"\bprefect server start\b", command(services["prefect-server"]))


def test_prefect_worker_serves_the_requant_process_pool(services):
    worker = services["prefect-worker"]
    cmd = command(worker)
    assert re.search(r"--pool requant-pool\b", cmd) and re.search(r"--type process\b", cmd), cmd
    env = environment(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_dask_workers_point_at_the_scheduler(services):
    assert re.search(r"\bdask scheduler\b.*--port 8786\b", command(services["dask-scheduler"]))
    worker = services["dask-worker"]
    assert re.search(r"\bdask worker tcp://dask-scheduler:8786\b", command(worker)), command(worker)
    assert worker.get("deploy", {}).get("replicas") == 2


def test_compose_dependencies_wait_for_health_or_completion(services):
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions, not a bare list"
        for dependency, spec in depends_on.items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            # A long-running dependency must be healthy; a one-shot (no healthcheck) must have finished.
            expected = "service_healthy" if "healthcheck" in services[dependency] else "service_completed_successfully"
            assert spec.get("condition") == expected, f"{name} -> {dependency}: expected {expected}, got {spec}"


def test_compose_long_running_services_have_healthchecks(services):
    for name, service in services.items():
        if service.get("restart") != "no":
            assert "test" in (service.get("healthcheck") or {}), f"{name} has no healthcheck"


def test_compose_variables_are_all_listed_in_env_example(compose):
    referenced = {match["name"] for string in all_strings(compose) for match in INTERPOLATION.finditer(string)}
    listed = env_example_variables()
    assert referenced, "found no ${...} variables: the interpolation pattern is broken"
    missing = referenced - listed.keys()
    assert not missing, f"variables used in {COMPOSE.name} but not in {ENV_EXAMPLE.name}: {sorted(missing)}"
    for name, value in listed.items():
        if SECRET_NAME.search(name):
            assert "change-me" in value, f"{ENV_EXAMPLE.name}: {name} should hold a change-me placeholder, not {value!r}"


def test_postgres_init_script_creates_a_database_per_service():
    script = (INFRA / "postgres" / "init-databases.sh").read_text()
    for database in ("mlflow", "mlflow_auth", "prefect"):
        assert re.search(rf"CREATE DATABASE {database} OWNER \w+;", script), database
    assert "MLFLOW_DB_PASSWORD" in script and "PREFECT_DB_PASSWORD" in script


def test_env_file_with_real_secrets_is_git_ignored():
    # The operator's filled-in copy sits next to the example; `git add infra/` must not pick it up.
    result = subprocess.run(["git", "check-ignore", "--no-index", "-q", "infra/.env"], cwd=INFRA.parent, check=False)
    assert result.returncode == 0, "infra/.env is not git-ignored: a real secrets file could be committed"


def test_dask_workers_share_the_flows_work_folder(services):
    # The flow passes absolute paths under models/work to the quantize tasks: a Dask worker without
    # the same volume would build candidates the flow never sees.
    work_volume = "requant-work:/app/models"
    assert work_volume in services["prefect-worker"]["volumes"]
    assert work_volume in services["dask-worker"]["volumes"]


def test_flows_and_workers_log_in_to_mlflow_as_requant_not_admin(services):
    for name in REQUANT_CLIENTS:
        env = environment(services[name])
        assert env["MLFLOW_TRACKING_USERNAME"] == "requant", name
        assert env["MLFLOW_TRACKING_PASSWORD"] == "${REQUANT_MLFLOW_PASSWORD:?set REQUANT_MLFLOW_PASSWORD}", name
    holders = {name for name, service in services.items() if "MLFLOW_ADMIN_PASSWORD" in str(service.get("environment"))}
    assert holders == {"mlflow", "mlflow-setup"}, f"only the server and its one-shot set-up may hold the admin password: {holders}"
    setup = command(services["mlflow-setup"])
    assert "infra/mlflow_access.py" in setup and (INFRA / "mlflow_access.py").is_file()
    assert services["mlflow-setup"]["restart"] == "no"


def test_mlflow_webhooks_reach_the_receiver_inside_the_stack(services):
    env = environment(services["mlflow"])
    assert env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] == "http,https" and env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true"
    assert re.search(r"\brequant webhook-receiver --host 0\.0\.0\.0 --port 8788\b", command(services["webhook-receiver"]))
    assert "--url http://webhook-receiver:8788/mlflow" in command(services["mlflow-setup"])
    secrets = {environment(services[name])["REQUANT_WEBHOOK_SECRET"] for name in ("webhook-receiver", "mlflow-setup")}
    assert secrets == {"${REQUANT_WEBHOOK_SECRET:?set REQUANT_WEBHOOK_SECRET}"}


def test_worker_deploys_from_prefect_yaml_and_crashed_runs_are_detected(services):
    setup = command(services["prefect-setup"])
    assert "prefect --no-prompt deploy --all" in setup and "_zombie-automation" in setup
    worker = environment(services["prefect-worker"])
    assert worker["REQUANT_PROJECT_DIR"] == "/app" and int(worker["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) >= 30
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "prefect.yaml" in dockerfile and "infra/mlflow_access.py" in dockerfile


def test_compose_and_the_local_stack_agree_on_versions_and_variables(services):
    import sys

    sys.path.insert(0, str(INFRA))
    import stack

    assert services["postgres"]["image"].split(":")[1].split(".")[0] == stack.POSTGRES_MAJOR
    missing = set(stack.SECRET_NAMES) - env_example_variables().keys()
    assert not missing, f"infra/stack.sh generates secrets that compose does not name: {sorted(missing)}"
    assert stack.POOL in command(services["prefect-worker"])
    assert str(stack.HEARTBEAT_S) == environment(services["prefect-worker"])["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]
