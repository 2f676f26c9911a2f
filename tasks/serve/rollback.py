"""Rollback rules: who is rolling back, and whether a winner repeats a rolled-back version.

Pure functions; the registry side (moving the alias, the record, the query of rolled-back
versions) is in tasks.track.
"""

from __future__ import annotations

import getpass
import os

USER_ENV = "REQUANT_USER"


def current_user() -> str:
    """Who is acting: $REQUANT_USER (for a bot or a shared account), else the login name."""
    if os.environ.get(USER_ENV):
        return os.environ[USER_ENV]
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry (some containers)
        return os.environ.get("USER", "unknown")


def blocking_rollback(decision_key: str, config_hash: str, rolled_back: list[dict[str, str]]) -> dict[str, str] | None:
    """The rollback that forbids promoting this winner again, or None.

    A winner is blocked when a version registered for the same decision key (the same source
    model, data, params and host) or built from the same config hash was rolled back: promoting it
    again would undo a person's decision without anything having changed. `rolled_back` comes from
    `Tracker.rolled_back_versions()` (newest first).
    """
    for record in rolled_back:
        if (decision_key and record.get("decision_key") == decision_key) or (config_hash and record.get("config_hash") == config_hash):
            return record
    return None


def kept_summary(record: dict[str, str]) -> str:
    """The decision summary of a run whose winner was rolled back before."""
    return (f"kept production: the winner repeats version {record['version']}, rolled back on {record['at']} by "
            f"{record['by'] or 'unknown'} ({record['reason'] or 'no reason given'}); change the model, data or params, "
            "or move the alias by hand, to promote it again")
