"""MLflow, and only here: runs and what they log (runs.py), the model registry: versions, aliases,
promotion, rollback records (registry.py), repair of runs a dead process left open (repair.py),
and the retune webhook's payloads (webhooks.py). `Tracker` (tracker.py) puts them together.
No other package imports MLflow.

May import: core, config, data, models, serve.
"""
