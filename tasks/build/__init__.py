"""Candidates made: the FP32 reference every recipe starts from and is judged by (reference.py), one
candidate built from its recipe into a content-addressed folder and proven (candidates.py), the
checks run before any work starts (preflight.py), and a decoder's FP32 reference (decoder_reference.py).

May import: core, recipes, config, data, models, serve, track, measure.
"""
