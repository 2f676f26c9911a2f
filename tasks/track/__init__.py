"""MLflow, and only here: runs and what they log (runs.py), the model registry: versions, aliases,
promotion, rollback records (registry.py), repair of runs a dead process left open (repair.py), the
tag vocabulary (tags.py), one-line service failures (services.py) and the retune webhook's payloads
(webhooks.py). `Tracker` (tracker.py) puts runs, registry and repair together on one connection.
No other package imports MLflow.

May import: core, config, data, models, serve.

The public surface is what this module exports; flows and tests use `from tasks import track`.
"""

from tasks.track.connection import tracking_uri
from tasks.track.registry import (
           ProductionBroken,
           ProductionVersion,
           SourceModel,
           parse_model_uri,
)
from tasks.track.runs import process_identity
from tasks.track.services import service_failure, unmarked_note
from tasks.track.tags import *  # noqa: F403  (the tag keys: track.TAG_KEY, ...)
from tasks.track.tags import __all__ as _tag_names
from tasks.track.tracker import Tracker

__all__ = ["ProductionBroken", "ProductionVersion", "SourceModel", "Tracker", "parse_model_uri",
           "process_identity", "service_failure", "tracking_uri", "unmarked_note", *_tag_names]
