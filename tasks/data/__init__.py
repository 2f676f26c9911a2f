"""Calibration and evaluation data: fetch and hash-check (fetch.py), cut the sets (prepare.py), version
them with DVC (version.py), validate them with Great Expectations (validate.py).

May import: core, config.
"""
