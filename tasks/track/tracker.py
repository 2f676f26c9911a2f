"""`Tracker`: the one object the flows use for MLflow, made of its three concerns.

runs.py (runs and what they log), registry.py (versions, aliases, promotion, rollback records) and
repair.py (runs a dead process left open) each work on one `Connection` (connection.py). This
package is the only code in requant that imports MLflow.
"""

from __future__ import annotations

from tasks.track.registry import Registry
from tasks.track.repair import RunRepair
from tasks.track.runs import RunLog


class Tracker(RunLog, Registry, RunRepair):
    """MLflow experiment, runs and registry for one flow run."""
