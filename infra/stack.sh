#!/usr/bin/env bash
# requant's production stack as processes on 127.0.0.1, without Docker (see infra/README.md):
#   infra/stack.sh up [--project DIR] [--state DIR]   start PostgreSQL, S3, MLflow, Prefect, Dask, worker, receiver
#   infra/stack.sh status | down | env                 PIDs | stop everything by PID | client variables
#   infra/stack.sh restart mlflow|prefect-worker|fleet-worker-1core|fleet-worker-2core|webhook-receiver
# Runs with the project's virtualenv (.venv, or $PYTHON).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$python" ] || { echo "error: $python not found: run 'make setup' first, or set PYTHON to the venv's python" >&2; exit 2; }
exec "$python" "$here/stack.py" "$@"
