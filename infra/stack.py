"""requant's production stack as plain processes on 127.0.0.1, no Docker: `infra/stack.sh up|down|status`.

The same services as infra/docker-compose.yml, with the same variables and permissions:

    postgres        PostgreSQL 15: databases mlflow, mlflow_auth (role mlflow), prefect (role prefect)
    s3              moto's S3 server: MLflow's artifact store (bucket S3_BUCKET, prefix mlflow/) and the DVC remote (dvc/)
    mlflow          mlflow server, basic-auth, PostgreSQL backend, artifacts proxied to S3, webhooks on
    prefect-server  Prefect API on PostgreSQL, API basic auth (PREFECT_AUTH_STRING)
    dask-scheduler, dask-worker-1, dask-worker-2   a Dask cluster (one thread per worker)
    prefect-worker  a worker of the process pool requant-pool; the deployment comes from prefect.yaml
    fleet-worker-1core, fleet-worker-2core   workers of the pools requant-1core and requant-2core, under
                    CPU affinity (taskset: CPU 0; CPUs 0-1): two instance sizes emulated on this host for
                    cost.fleet (params.yaml's emulated-1core and emulated-2core profiles)
    webhook-receiver   requant's MLflow webhook -> Prefect event bridge

Everything lives under a state folder (default `.stack/`, git-ignored): `secrets.env` (generated
once, mode 600, kept: a restarted MLflow must decrypt the webhook secrets it stored), `ports.env`
(free ports chosen once, or STACK_<SERVICE>_PORT), `env` (what a requant client exports: `source
.stack/env`), `pids/`, `logs/` and the PostgreSQL data (`postgres/`; as root, from a folder the `postgres`
user cannot enter, a link to its home: see postgres_data_dir). Processes are stopped by their PID (each
leads its own process group, so a worker's flow-run children go with it).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

INFRA = Path(__file__).resolve().parent
REPO = INFRA.parent
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
POOL = "requant-pool"
# The PostgreSQL major version the stack runs; infra/docker-compose.yml uses the same image major.
POSTGRES_MAJOR = "15"
S3_BUCKET_DEFAULT = "requant"
REQUANT_USER = "requant"
# Heartbeats every 30 s (Prefect's minimum); a run silent for ZOMBIE_AFTER_S is marked Crashed.
HEARTBEAT_S = 30
ZOMBIE_AFTER_S = 75
PORTS = ("postgres", "s3", "mlflow", "prefect", "dask", "dask-dashboard", "receiver")
# Start order; `down` stops in reverse.
SERVICES = ("postgres", "s3", "mlflow", "prefect-server", "dask-scheduler", "dask-worker-1", "dask-worker-2",
            "prefect-worker", "fleet-worker-1core", "fleet-worker-2core", "webhook-receiver")
# The fleet's emulated instance types: service -> (work pool, CPUs it may run on). The pools are those of
# params.yaml's emulated-1core and emulated-2core profiles; on real instances, run one worker of each
# pool on a machine of that type instead (docs/operations.md, "Pricing on a fleet").
FLEET_WORKERS = {"fleet-worker-1core": ("requant-1core", "0"), "fleet-worker-2core": ("requant-2core", "0,1")}
# Fleet workers beat every 10 s: the flow gives up on one silent for three beats (flows/fleet.py).
FLEET_HEARTBEAT_S = 10
SECRET_NAMES = ("MLFLOW_DB_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "PREFECT_AUTH_STRING",
                "REQUANT_MLFLOW_PASSWORD", "REQUANT_WEBHOOK_SECRET")


class StackError(RuntimeError):
    """A service did not start; the message says which and quotes its log."""


# ----------------------------------------------------------------------------- state folder
class Stack:
    """Paths, secrets and ports of one stack (one state folder)."""

    def __init__(self, state: Path) -> None:
        self.state = state.resolve()
        self.pids = self.state / "pids"
        self.logs = self.state / "logs"

    def prepare(self) -> None:
        for folder in (self.state, self.pids, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        # PostgreSQL runs as the `postgres` user when we are root: it must be able to reach its data folder.
        self.state.chmod(0o755)

    # -- secrets and ports are generated once and kept, so a restart keeps URLs and keys
    def secrets(self) -> dict[str, str]:
        path = self.state / "secrets.env"
        values = _read_env(path)
        if all(name in values for name in SECRET_NAMES):
            return values
        from cryptography.fernet import Fernet

        fresh = {name: secrets.token_urlsafe(24) for name in SECRET_NAMES}
        fresh["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] = Fernet.generate_key().decode()
        fresh["S3_ACCESS_KEY_ID"] = "requant" + secrets.token_hex(6)
        fresh["PREFECT_AUTH_STRING"] = "requant:" + secrets.token_urlsafe(18)
        values = {**fresh, **values}
        _write_env(path, values, mode=0o600)
        return values

    def ports(self) -> dict[str, int]:
        path = self.state / "ports.env"
        values = {k: int(v) for k, v in _read_env(path).items()}
        for name in PORTS:
            if name not in values:
                override = os.environ.get(f"STACK_{name.upper().replace('-', '_')}_PORT")
                values[name] = int(override) if override else _free_port()
        _write_env(path, {k: str(v) for k, v in values.items()})
        return values

    def config(self) -> dict:
        path = self.state / "stack.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_config(self, config: dict) -> None:
        (self.state / "stack.json").write_text(json.dumps(config, indent=2))

    def pid(self, service: str) -> int | None:
        path = self.pids / f"{service}.pid"
        if not path.is_file():
            return None
        pid = int(path.read_text().split()[0])
        return pid if _alive(pid) else None


def _read_env(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {key.removeprefix("export ").strip(): value.strip().strip("'") for key, value in pairs}


def _write_env(path: Path, values: dict[str, str], mode: int = 0o644, export: bool = False) -> None:
    prefix = "export " if export else ""
    path.touch(mode=mode, exist_ok=True)
    path.chmod(mode)
    path.write_text("".join(f"{prefix}{key}='{value}'\n" for key, value in values.items()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ----------------------------------------------------------------------------- environments
def urls(ports: dict[str, int]) -> dict[str, str]:
    return {"mlflow": f"http://{HOST}:{ports['mlflow']}", "prefect": f"http://{HOST}:{ports['prefect']}/api",
            "s3": f"http://{HOST}:{ports['s3']}", "dask": f"tcp://{HOST}:{ports['dask']}",
            "receiver": f"http://{HOST}:{ports['receiver']}/mlflow"}


def _base_env() -> dict[str, str]:
    # The stack's own processes must not inherit a user's tracking or Prefect settings.
    drop = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_URL",
            "PREFECT_API_AUTH_STRING", "PREFECT_HOME", "MLFLOW_S3_ENDPOINT_URL")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1"})
    return env


def client_env(stack: Stack) -> dict[str, str]:
    """What a requant process (CLI, worker, flow run, Dask worker) needs: requant's own user, not the admin."""
    s, u = stack.secrets(), urls(stack.ports())
    return {"MLFLOW_TRACKING_URI": u["mlflow"], "MLFLOW_TRACKING_USERNAME": REQUANT_USER,
            "MLFLOW_TRACKING_PASSWORD": s["REQUANT_MLFLOW_PASSWORD"], "PREFECT_API_URL": u["prefect"],
            "PREFECT_API_AUTH_STRING": s["PREFECT_AUTH_STRING"], "DASK_SCHEDULER_ADDRESS": u["dask"],
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _pythonpath(code: Path) -> str:
    # The code checkout first: flow runs and Dask workers import flows/ and tasks/ from it.
    return os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH", "")) if p)


# ----------------------------------------------------------------------------- processes
def _launch(stack: Stack, service: str, command: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
    if stack.pid(service):
        return stack.pid(service)
    with open(stack.logs / f"{service}.log", "a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   cwd=cwd, start_new_session=True)
    (stack.pids / f"{service}.pid").write_text(str(process.pid))
    return process.pid


def _log_tail(stack: Stack, service: str) -> str:
    path = stack.logs / f"{service}.log"
    return path.read_text(errors="replace")[-3000:] if path.is_file() else "(no log)"


def _wait_http(stack: Stack, service: str, url: str, timeout_s: float, auth: tuple[str, str] | None = None) -> None:
    """Wait until `url` answers with any HTTP status, or fail with the service's log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service != "postgres" and not stack.pid(service):
            raise StackError(f"{service} exited before answering {url}; its log:\n{_log_tail(stack, service)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise StackError(f"{service} did not answer {url} within {timeout_s:.0f} s; its log:\n{_log_tail(stack, service)}")


def _run(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, what: str = "") -> str:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StackError(f"{what or command[0]} failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    return done.stdout


def stop_service(stack: Stack, service: str, grace_s: float = 15.0) -> bool:
    """Stop one service by its PID (its whole process group); return whether it was running."""
    if service == "postgres":
        return _stop_postgres(stack)
    pid = stack.pid(service)
    (stack.pids / f"{service}.pid").unlink(missing_ok=True)
    if not pid:
        return False
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if not _alive(pid):
            return True
    return True


# ----------------------------------------------------------------------------- PostgreSQL
def _pg_bin() -> Path:
    configured = os.environ.get("PG_BIN")
    candidates = [Path(configured)] if configured else [Path(f"/usr/lib/postgresql/{POSTGRES_MAJOR}/bin")]
    for folder in candidates:
        if (folder / "initdb").exists():
            return folder
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise StackError("PostgreSQL server binaries not found: `apt-get install -y postgresql` (Debian), or set PG_BIN "
                     "to the folder holding initdb and pg_ctl")


def _as_postgres(command: list[str]) -> list[str]:
    # initdb refuses to run as root; the server then runs as the `postgres` system user.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _postgres_can_enter(folder: Path) -> bool:
    """Whether the `postgres` user can reach `folder` (execute on it and on every folder above it)."""
    done = subprocess.run(_as_postgres(["test", "-x", str(folder)]), capture_output=True, cwd="/", check=False)
    return done.returncode == 0


def postgres_data_dir(stack: Stack) -> Path:
    """The PostgreSQL data folder of this stack: STATE/postgres, or where that link points.

    As root, PostgreSQL runs as the `postgres` user, which cannot enter a private folder (a home
    folder, a `mktemp -d` folder: mode 0700). Then the data lives under that user's home,
    `~postgres/requant-stack/<hash of STATE>/`, and STATE/postgres is a link to it: `up`, `down` and
    `restart` find it there, and two stacks never share one. Chosen once, on the first start.

    Raises:
        StackError: the `postgres` user can reach neither STATE nor its own home folder.
    """
    link = stack.state / "postgres"
    if link.is_symlink() or link.exists():
        return link.resolve()
    if os.geteuid() != 0 or _postgres_can_enter(stack.state):
        return link
    import hashlib
    import pwd

    home = Path(pwd.getpwnam("postgres").pw_dir)
    data = home / "requant-stack" / hashlib.sha256(str(stack.state).encode()).hexdigest()[:16]
    if not _postgres_can_enter(home):
        raise StackError(f"the postgres user cannot enter {stack.state} (a private folder?) nor its home {home}: pass "
                         "--state DIR (or STACK_STATE) in a folder it can enter, e.g. /var/tmp/requant-stack")
    _run(_as_postgres(["mkdir", "-p", "-m", "700", str(data)]), cwd=Path("/"), what=f"mkdir {data}")
    link.symlink_to(data, target_is_directory=True)
    print(f"PostgreSQL data: {data} (the postgres user cannot enter {stack.state}; {link} links there)",
          file=sys.stderr)
    return data


def _start_postgres(stack: Stack) -> None:
    pg, data, port = _pg_bin(), postgres_data_dir(stack), stack.ports()["postgres"]
    fresh = not (data / "PG_VERSION").is_file()
    # The postgres user's commands run from /: it may not be able to enter the caller's working folder
    # (initdb fails on one it cannot change to).
    if fresh:
        data.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
        # Local socket: trust (only the stack's own set-up uses it); TCP: passwords (scram).
        _run(_as_postgres([str(pg / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                           "--auth-host=scram-sha-256", "-E", "UTF8"]), cwd=Path("/"), what="initdb")
    if not stack.pid("postgres"):
        _run(_as_postgres([str(pg / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "-t", "60",
                           "-o", f"-h {HOST} -p {port} -k {data}", "start"]), cwd=Path("/"), what="pg_ctl start")
        pid = (data / "postmaster.pid").read_text().split()[0]
        (stack.pids / "postgres.pid").write_text(pid)
    if fresh:
        s = stack.secrets()
        env = {**os.environ, "POSTGRES_USER": "postgres", "PGHOST": str(data), "PGPORT": str(port),
               "MLFLOW_DB_PASSWORD": s["MLFLOW_DB_PASSWORD"], "PREFECT_DB_PASSWORD": s["PREFECT_DB_PASSWORD"],
               "PATH": f"{pg}{os.pathsep}{os.environ.get('PATH', '')}"}
        # The compose stack's init script: the same roles, databases and owners.
        _run(["sh", str(INFRA / "postgres" / "init-databases.sh")], env=env, what="init-databases.sh")


def _stop_postgres(stack: Stack) -> bool:
    data = (stack.state / "postgres").resolve()  # through the link to the postgres user's home, if any
    running = stack.pid("postgres")
    (stack.pids / "postgres.pid").unlink(missing_ok=True)
    if not running:
        return False
    subprocess.run(_as_postgres([str(_pg_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                   capture_output=True, cwd="/", check=False)
    return True


# ----------------------------------------------------------------------------- services
def _start_s3(stack: Stack) -> None:
    port = stack.ports()["s3"]
    _launch(stack, "s3", [str(BIN / "moto_server"), "-H", HOST, "-p", str(port)], _base_env())


def _setup_s3(stack: Stack) -> None:
    import boto3

    s, u = stack.secrets(), urls(stack.ports())
    _wait_http(stack, "s3", u["s3"], 60)
    client = boto3.client("s3", endpoint_url=u["s3"], aws_access_key_id=s["S3_ACCESS_KEY_ID"],
                          aws_secret_access_key=s["S3_SECRET_ACCESS_KEY"], region_name="us-east-1")
    bucket = os.environ.get("S3_BUCKET", S3_BUCKET_DEFAULT)
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)


def _mlflow_auth_ini(stack: Stack) -> Path:
    # The compose file's settings, pointed at this PostgreSQL instead of the `postgres` service.
    port = stack.ports()["postgres"]
    text = (INFRA / "mlflow" / "basic_auth.ini").read_text().replace("@postgres:5432/", f"@{HOST}:{port}/")
    path = stack.state / "basic_auth.ini"
    path.write_text(text)
    return path


def _start_mlflow(stack: Stack) -> None:
    s, p, u = stack.secrets(), stack.ports(), urls(stack.ports())
    bucket = os.environ.get("S3_BUCKET", S3_BUCKET_DEFAULT)
    env = {**_base_env(), "PGPASSWORD": s["MLFLOW_DB_PASSWORD"], "MLFLOW_AUTH_CONFIG_PATH": str(_mlflow_auth_ini(stack)),
           "MLFLOW_AUTH_ADMIN_USERNAME": os.environ.get("MLFLOW_ADMIN_USERNAME", "admin"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": s["MLFLOW_ADMIN_PASSWORD"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": s["MLFLOW_FLASK_SERVER_SECRET_KEY"],
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": s["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"],
           # The receiver is on this host (a private address) and speaks http.
           "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "AWS_ACCESS_KEY_ID": s["S3_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": s["S3_SECRET_ACCESS_KEY"],
           "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": u["s3"]}
    _launch(stack, "mlflow", [
        str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(p["mlflow"]), "--workers", "1",
        # No password in the URI (it would show in `ps`): libpq reads PGPASSWORD.
        "--backend-store-uri", f"postgresql+psycopg2://mlflow@{HOST}:{p['postgres']}/mlflow",
        "--artifacts-destination", f"s3://{bucket}/mlflow", "--serve-artifacts",
        "--app-name", "basic-auth", "--allowed-hosts", f"{HOST}:{p['mlflow']},localhost:{p['mlflow']}",
    ], env)


def _setup_mlflow(stack: Stack, params: Path) -> None:
    sys.path.insert(0, str(REPO))
    from infra.mlflow_access import grant_requant_access, names_from_params

    s, u = stack.secrets(), urls(stack.ports())
    _wait_http(stack, "mlflow", f"{u['mlflow']}/health", 180)
    experiment, models = names_from_params(str(params))
    grant_requant_access(u["mlflow"], (os.environ.get("MLFLOW_ADMIN_USERNAME", "admin"), s["MLFLOW_ADMIN_PASSWORD"]),
                         (REQUANT_USER, s["REQUANT_MLFLOW_PASSWORD"]), experiment, models)


def _start_prefect_server(stack: Stack) -> None:
    s, p = stack.secrets(), stack.ports()
    env = {**_base_env(), "PREFECT_HOME": str(stack.state / "prefect-home"),
           "PREFECT_API_DATABASE_CONNECTION_URL":
               f"postgresql+asyncpg://prefect:{s['PREFECT_DB_PASSWORD']}@{HOST}:{p['postgres']}/prefect",
           "PREFECT_SERVER_API_AUTH_STRING": s["PREFECT_AUTH_STRING"], "PREFECT_UI_ENABLED": "false"}
    _launch(stack, "prefect-server", [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(p["prefect"])], env)


def _prefect_env(stack: Stack, code: Path) -> dict[str, str]:
    return {**_base_env(), **client_env(stack), "PREFECT_HOME": str(stack.state / "prefect-home"),
            "PYTHONPATH": _pythonpath(code)}


def _setup_prefect(stack: Stack, code: Path, prefect_file: Path) -> None:
    u = urls(stack.ports())
    _wait_http(stack, "prefect-server", f"{u['prefect']}/health", 180)
    env = _prefect_env(stack, code)
    prefect = str(BIN / "prefect")
    pools = _run([prefect, "work-pool", "ls"], env=env, what="prefect work-pool ls")
    if POOL not in pools:
        _run([prefect, "work-pool", "create", POOL, "--type", "process"], env=env, what="prefect work-pool create")
    _run([sys.executable, str(INFRA / "stack.py"), "_zombie-automation"], env=env, what="zombie automation")
    # The deployment as work-pool users get it: schedule, trigger and concurrency from prefect.yaml.
    _run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)], env=env, cwd=code,
         what="prefect deploy --all")


def _zombie_automation() -> None:
    """Mark a flow run Crashed when its heartbeats stop (its worker or machine died): Prefect's recipe."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    name = "requant: crash zombie flow runs"
    try:
        Automation.read(name=name)
        return
    except ValueError:
        pass
    Automation(
        name=name,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=ZOMBIE_AFTER_S)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {ZOMBIE_AFTER_S} s: its worker or machine died")],
    ).create()


def start_worker(stack: Stack) -> None:
    """The process worker; flow runs it starts send heartbeats so a killed worker's run is marked Crashed."""
    config = stack.config()
    code = Path(config["code"])
    env = {**_prefect_env(stack, code), "REQUANT_PROJECT_DIR": str(code),
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
    _launch(stack, "prefect-worker", [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
            env, cwd=code)


def start_fleet_worker(stack: Stack, service: str) -> None:
    """A worker of one fleet pool under its CPU affinity; its flow runs (and the models they serve) inherit it."""
    code = Path(stack.config()["code"])
    pool, cpus = FLEET_WORKERS[service]
    # Its flow runs beat too: the zombie automation crashes any run that stops beating, and one that never
    # beat after its first would be crashed mid-measurement (found measuring the default on the stack).
    env = {**_prefect_env(stack, code), "REQUANT_PROJECT_DIR": str(code), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
           "PREFECT_WORKER_HEARTBEAT_SECONDS": str(FLEET_HEARTBEAT_S)}
    _launch(stack, service, ["taskset", "-c", cpus, str(BIN / "prefect"), "worker", "start", "--pool", pool,
                             "--type", "process"], env, cwd=code)


def _setup_fleet(stack: Stack, code: Path, params: Path) -> None:
    """The fleet pools and the measurement deployment on each (`requant fleet-deploy`)."""
    _run([str(BIN / "requant"), "fleet-deploy", "--params", str(params), "--code", str(code)],
         env=_prefect_env(stack, code), cwd=code, what="requant fleet-deploy")


def _wait_worker(stack: Stack, service: str = "prefect-worker", pool: str = POOL, timeout_s: float = 120) -> None:
    import httpx

    u, s = urls(stack.ports()), stack.secrets()
    user, _, password = s["PREFECT_AUTH_STRING"].partition(":")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not stack.pid(service):
            raise StackError(f"{service} exited; its log:\n{_log_tail(stack, service)}")
        workers = httpx.post(f"{u['prefect']}/work_pools/{pool}/workers/filter", json={}, auth=(user, password), timeout=10)
        if workers.status_code == 200 and any(w.get("status") == "ONLINE" for w in workers.json()):
            return
        time.sleep(1)
    raise StackError(f"{service} did not come online in {timeout_s:.0f} s; its log:\n{_log_tail(stack, service)}")


def _start_dask(stack: Stack, code: Path) -> None:
    p = stack.ports()
    env = {**_base_env(), **client_env(stack), "PYTHONPATH": _pythonpath(code)}
    _launch(stack, "dask-scheduler", [str(BIN / "dask"), "scheduler", "--host", HOST, "--port", str(p["dask"]),
                                      "--dashboard-address", f"{HOST}:{p['dask-dashboard']}"], env, cwd=code)


def _start_dask_workers(stack: Stack, code: Path) -> None:
    u = urls(stack.ports())
    _wait_http(stack, "dask-scheduler", f"http://{HOST}:{stack.ports()['dask-dashboard']}/health", 90)
    env = {**_base_env(), **client_env(stack), "PYTHONPATH": _pythonpath(code)}
    for n in (1, 2):
        # One thread per worker: benchmarks must not share cores. Both run in the code checkout,
        # so candidates they write under models/work are the files the flow reads.
        _launch(stack, f"dask-worker-{n}", [str(BIN / "dask"), "worker", u["dask"], "--nworkers", "1", "--nthreads", "1",
                                            "--host", HOST, "--dashboard-address", f"{HOST}:0",
                                            "--local-directory", str(stack.state / f"dask-worker-{n}")], env, cwd=code)


def _wait_dask_workers(stack: Stack, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    url = f"http://{HOST}:{stack.ports()['dask-dashboard']}/json/counts.json"
    while time.monotonic() < deadline:
        for n in (1, 2):
            if not stack.pid(f"dask-worker-{n}"):
                raise StackError(f"dask-worker-{n} exited; its log:\n{_log_tail(stack, f'dask-worker-{n}')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as page:
                if json.loads(page.read()).get("workers", 0) >= 2:
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise StackError(f"two Dask workers did not join in {timeout_s:.0f} s; log:\n{_log_tail(stack, 'dask-worker-1')}")


def _start_receiver(stack: Stack, code: Path) -> None:
    env = {**_prefect_env(stack, code), "REQUANT_WEBHOOK_SECRET": stack.secrets()["REQUANT_WEBHOOK_SECRET"]}
    _launch(stack, "webhook-receiver", [sys.executable, "-m", "flows.cli", "webhook-receiver", "--host", HOST,
                                        "--port", str(stack.ports()["receiver"])], env, cwd=code)


def _register_webhook(stack: Stack, code: Path, params: Path) -> None:
    s, u = stack.secrets(), urls(stack.ports())
    _wait_http(stack, "webhook-receiver", u["receiver"], 60)
    # Webhooks are admin-only in MLflow: created with the admin's credentials, never requant's.
    env = {**_base_env(), "PYTHONPATH": _pythonpath(code), "MLFLOW_TRACKING_URI": u["mlflow"],
           "MLFLOW_TRACKING_USERNAME": os.environ.get("MLFLOW_ADMIN_USERNAME", "admin"),
           "MLFLOW_TRACKING_PASSWORD": s["MLFLOW_ADMIN_PASSWORD"], "REQUANT_WEBHOOK_SECRET": s["REQUANT_WEBHOOK_SECRET"]}
    _run([sys.executable, "-m", "flows.cli", "register-webhook", "--params", str(params), "--url", u["receiver"]],
         env=env, cwd=code, what="requant register-webhook")


def _dvc_remote(stack: Stack, project: Path) -> None:
    """The project's DVC remote on the stack's S3 (`--local`: credentials stay out of git)."""
    if not (project / ".dvc").is_dir():
        return
    s, u = stack.secrets(), urls(stack.ports())
    bucket = os.environ.get("S3_BUCKET", S3_BUCKET_DEFAULT)
    dvc = [sys.executable, "-m", "dvc"]
    _run(dvc + ["remote", "add", "--local", "--force", "--default", "stack", f"s3://{bucket}/dvc"], cwd=project, what="dvc remote add")
    for key, value in (("endpointurl", u["s3"]), ("access_key_id", s["S3_ACCESS_KEY_ID"]),
                       ("secret_access_key", s["S3_SECRET_ACCESS_KEY"]), ("verify", "true")):
        _run(dvc + ["remote", "modify", "--local", "stack", key, value], cwd=project, what="dvc remote modify")


# ----------------------------------------------------------------------------- commands
def up(stack: Stack, project: Path, code: Path) -> dict[str, float]:
    """Start every service (those already running are kept) and set them up; return seconds per step."""
    started, timings = time.monotonic(), {}
    stack.prepare()
    prefect_file = project / "prefect.yaml" if (project / "prefect.yaml").is_file() else code / "prefect.yaml"
    params = project / "params.yaml"
    stack.save_config({"project": str(project), "code": str(code), "prefect_file": str(prefect_file), "params": str(params)})
    stack.secrets(), stack.ports()

    def step(name: str, action) -> None:
        t0 = time.monotonic()
        action()
        timings[name] = round(time.monotonic() - t0, 1)

    step("postgres", lambda: _start_postgres(stack))
    # The slow starters first, then the quick set-up work while they boot.
    _start_mlflow(stack)
    _start_prefect_server(stack)
    _start_s3(stack)
    _start_dask(stack, code)
    step("s3", lambda: _setup_s3(stack))
    step("dask", lambda: (_start_dask_workers(stack, code), _wait_dask_workers(stack)))
    step("mlflow", lambda: _setup_mlflow(stack, params))
    step("prefect", lambda: _setup_prefect(stack, code, prefect_file))
    start_worker(stack)
    _start_receiver(stack, code)
    step("fleet", lambda: _setup_fleet(stack, code, params))
    for service in FLEET_WORKERS:
        start_fleet_worker(stack, service)
    step("worker", lambda: _wait_worker(stack))
    step("fleet-workers", lambda: [_wait_worker(stack, service, pool) for service, (pool, _) in FLEET_WORKERS.items()])
    step("webhook", lambda: _register_webhook(stack, code, params))
    step("dvc-remote", lambda: _dvc_remote(stack, project))
    _write_env(stack.state / "env", client_env(stack), mode=0o600, export=True)
    timings["total"] = round(time.monotonic() - started, 1)
    return timings


def down(stack: Stack) -> list[str]:
    """Stop every service by its PID, in reverse start order; return those that were running."""
    return [service for service in reversed(SERVICES) if stop_service(stack, service)]


def status(stack: Stack) -> dict[str, int | None]:
    """PID of each service, None where it is not running."""
    return {service: stack.pid(service) for service in SERVICES}


def restart(stack: Stack, service: str) -> None:
    """Stop one service by its PID and start it again with the same ports, secrets and state."""
    code = Path(stack.config()["code"])
    stop_service(stack, service)
    if service == "mlflow":
        _start_mlflow(stack)
        _wait_http(stack, "mlflow", f"{urls(stack.ports())['mlflow']}/health", 180)
    elif service == "prefect-worker":
        start_worker(stack)
        _wait_worker(stack)
    elif service in FLEET_WORKERS:
        start_fleet_worker(stack, service)
        _wait_worker(stack, service, FLEET_WORKERS[service][0])
    elif service == "webhook-receiver":
        _start_receiver(stack, code)
        _wait_http(stack, "webhook-receiver", urls(stack.ports())["receiver"], 60)
    else:
        raise StackError(f"restart supports mlflow, prefect-worker, {', '.join(FLEET_WORKERS)} and webhook-receiver, "
                         f"not {service}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/stack.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "restart", "env", "_zombie-automation"])
    parser.add_argument("service", nargs="?", help="restart: mlflow, prefect-worker, a fleet worker or webhook-receiver")
    parser.add_argument("--state", default=os.environ.get("STACK_STATE", str(REPO / ".stack")),
                        help="State folder (default .stack/ in the checkout, or $STACK_STATE).")
    parser.add_argument("--project", default=None,
                        help="Project whose params.yaml and prefect.yaml are deployed (default: the checkout).")
    args = parser.parse_args(argv)
    if args.command == "_zombie-automation":
        _zombie_automation()
        return 0
    stack = Stack(Path(args.state))
    try:
        if args.command == "up":
            timings = up(stack, Path(args.project or REPO).resolve(), REPO)
            print(json.dumps({"started_in_s": timings, **urls(stack.ports())}))
            print(f"stack up in {timings['total']:.0f} s; clients: source {stack.state / 'env'}", file=sys.stderr)
        elif args.command == "down":
            print("stopped: " + (", ".join(down(stack)) or "nothing was running"))
        elif args.command == "status":
            running = status(stack)
            for service, pid in running.items():
                print(f"{service:18} {'pid ' + str(pid) if pid else 'stopped'}")
            return 0 if all(running.values()) else 3
        elif args.command == "restart":
            restart(stack, args.service or "")
        elif args.command == "env":
            print((stack.state / "env").read_text(), end="")
    except StackError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        print("\n".join(str(exc).splitlines()[1:]), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
