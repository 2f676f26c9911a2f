"""The stack's PostgreSQL starts from a private checkout (mode 0700: a home folder, a `mktemp -d` folder).

As root, PostgreSQL runs as the `postgres` user, which cannot enter such a folder; `make stack` used
to fail there with `initdb failed (1): could not change directory ...: Permission denied`. Only
PostgreSQL of the stack is started here (a real initdb and pg_ctl start, about 2 s), from a
process whose working folder is the private one, as `make stack` run in the checkout is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO

INFRA = REPO / "infra"
PG_BIN = Path("/usr/lib/postgresql/15/bin")

pytestmark = pytest.mark.skipif(not (PG_BIN / "initdb").exists() and not shutil.which("initdb"),
                                reason="PostgreSQL server binaries are not installed")


def stack_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` with infra/stack.py imported as `stack`, from `cwd`."""
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(INFRA)!r}); import stack\n{code}"],
                          cwd=cwd, capture_output=True, text=True, timeout=180)


def test_postgres_of_the_stack_starts_and_stops_from_a_private_folder(tmp_path):
    private = tmp_path / "checkout"
    private.mkdir(mode=0o700)
    private.chmod(0o700)  # whatever the umask
    state = private / ".stack"
    start = (f"from pathlib import Path\ns = stack.Stack(Path({str(state)!r})); s.prepare()\n"
             "stack._start_postgres(s)\nprint(s.ports()['postgres'], stack.postgres_data_dir(s))")
    started = stack_python(start, cwd=private)
    data = (state / "postgres").resolve()
    try:
        assert started.returncode == 0, started.stderr
        port = started.stdout.split()[0]
        secrets = dict(line.split("=", 1) for line in (state / "secrets.env").read_text().splitlines())
        # What MLflow does next: its role logs in over TCP with its password, to its own database.
        login = subprocess.run(["psql", "-h", "127.0.0.1", "-p", port, "-U", "mlflow", "-d", "mlflow", "-tAc",
                                "select current_user"], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PGPASSWORD": secrets["MLFLOW_DB_PASSWORD"].strip("'")})
        assert login.returncode == 0 and login.stdout.strip() == "mlflow", login.stderr
        if os.geteuid() == 0:
            # The postgres user cannot enter the private folder: the data lives where it can, linked from the state.
            assert (state / "postgres").is_symlink() and private not in data.parents
            assert f"PostgreSQL data: {data}" in started.stderr
    finally:
        stopped = stack_python(f"from pathlib import Path\nprint(stack.stop_service(stack.Stack(Path({str(state)!r})), "
                               "'postgres'))", cwd=private)
        if private not in data.parents:
            shutil.rmtree(data, ignore_errors=True)
    assert stopped.stdout.strip() == "True", stopped.stderr
    assert not (data / "postmaster.pid").exists()


def test_postgres_data_stays_in_the_state_folder_when_postgres_can_enter_it():
    # pytest's tmp_path is private (0700): an open folder of its own, as /var/tmp/requant-stack would be.
    open_folder = Path(tempfile.mkdtemp(prefix="requant-open-state-"))
    try:
        open_folder.chmod(0o755)
        state = open_folder / ".stack"
        chosen = stack_python(f"from pathlib import Path\ns = stack.Stack(Path({str(state)!r})); s.prepare()\n"
                              "print(stack.postgres_data_dir(s))", cwd=open_folder)
        assert chosen.returncode == 0, chosen.stderr
        assert chosen.stdout.strip() == str(state / "postgres") and not (state / "postgres").is_symlink()
    finally:
        shutil.rmtree(open_folder, ignore_errors=True)
