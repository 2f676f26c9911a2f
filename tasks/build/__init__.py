"""Candidates made: the FP32 reference every recipe starts from and is judged by (reference.py), one
candidate built from its recipe into a content-addressed folder and proven (candidates.py), and the
checks run before any work starts (preflight.py).

May import: core, recipes, config, data, models, serve, track, measure.
"""
