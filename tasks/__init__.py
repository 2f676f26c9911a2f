"""requant's work: data, models, recipes, evaluation, cost and selection.

Nothing here imports Prefect; MLflow is used only by `tasks.tracking`, the registry adapter.
"""
