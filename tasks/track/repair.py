"""Repair of runs a dead process left RUNNING: finished when its promotion completed, failed otherwise."""

from __future__ import annotations

from tasks.track.connection import Connection, version_behind_alias
from tasks.track.runs import process_is_gone
from tasks.track.tags import (
    TAG_FAILURE,
    TAG_PROCESS,
    TAG_PROMOTED_ALIAS,
    TAG_PROMOTED_VERSION,
    TAG_PROMOTION,
    TAG_RECONCILED,
)


class RunRepair(Connection):
    """Closes the runs of processes that are gone."""

    def reconcile_stale_runs(self) -> list[dict[str, str]]:
        """Close RUNNING runs whose process is gone, finishing an interrupted promotion's record.

        A run killed after its decision was recorded and the alias moved is complete: it is marked
        FINISHED (tagged as reconciled). One killed before the alias moved is marked FAILED, so its
        decision key does not count as decided and the next run decides again (the version it
        registered is reused). Any other dead run (and its RUNNING candidate runs) is marked FAILED
        with the reason. Runs of live processes, and of processes on other hosts, are left alone.

        Returns:
            One {"run_id", "status", "reason"} per run closed.
        """
        found = self.client.get_experiment_by_name(self.settings.experiment)
        if not found:
            return []
        running = self.client.search_runs([found.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                          max_results=1000)
        by_id = {r.info.run_id: r for r in running}
        at_alias = {}  # alias -> version behind it, read once
        closed = []
        for run in running:
            identity = run.data.tags.get(TAG_PROCESS)
            parent_id = run.data.tags.get("mlflow.parentRunId")
            if identity is None and parent_id in by_id:
                identity = by_id[parent_id].data.tags.get(TAG_PROCESS)  # a candidate run of that parent
            if identity is None or not process_is_gone(identity):
                continue
            promoted = run.data.tags.get(TAG_PROMOTED_VERSION)
            alias = run.data.tags.get(TAG_PROMOTED_ALIAS, self.settings.production_alias)
            if promoted and alias not in at_alias:
                at_alias[alias] = version_behind_alias(self.client, self.settings.serving_model_name, alias)
            alias_version = at_alias.get(alias)
            if promoted and alias_version is not None and str(alias_version.version) == promoted:
                status, reason = "FINISHED", f"process {identity} died after the alias moved to version {promoted}; promotion complete"
                self.client.set_tag(run.info.run_id, TAG_PROMOTION, "done")
                self.client.set_tag(run.info.run_id, TAG_RECONCILED, reason)
            else:
                status = "FAILED"
                reason = (f"process {identity} died before the alias moved to version {promoted}; the next run decides again"
                          if promoted else f"process {identity} died before the run finished")
                self.client.set_tag(run.info.run_id, TAG_FAILURE, reason)
            self.client.set_terminated(run.info.run_id, status)
            closed.append({"run_id": run.info.run_id, "status": status, "reason": reason})
        return closed
