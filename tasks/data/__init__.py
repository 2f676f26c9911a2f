"""Calibration and evaluation data: fetch and hash-check (fetch.py), cut the sets (prepare.py), version
them with DVC (version.py), validate them with Great Expectations (validate.py); held-out text for decoder language models
(text.py: WikiText-style documents, fetched and hash-checked, cut into token windows).

May import: core, config.
"""
