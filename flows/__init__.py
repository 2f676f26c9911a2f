"""Prefect flows: they compose the work in `tasks/` and hold every Prefect decorator."""
