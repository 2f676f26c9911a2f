"""The served model and what runs beside it: the classifier that ships with every logged model
(serving.py, batching.py, serving_pyfunc.py: they import nothing of requant, because MLflow copies them
into the model), the text generator that ships with every
logged decoder (generation.py, generation_pyfunc.py), requant's HTTP front (front.py), server processes (processes.py), and the
rollout and rollback rules (rollout.py, rollback.py).

May import: core, config, models.
"""
