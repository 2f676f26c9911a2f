"""Instruments, with no notion of a candidate: scoring predictions (scoring.py), timing
(timing.py), memory (memory.py), paired quality intervals (quality_intervals.py), the statistics of
the accuracy and speed screens (screening.py, speed_screen.py), result reuse (result_cache.py),
quantization sensitivity (sensitivity.py), the dollar price of a throughput (cost.py), and served
capacity under load (loadtest.py, load_driver.py, served_pricing.py), and a decoder's quality
against FP32 per document (lm_quality.py: perplexity, token agreement, KL, greedy agreement).

May import: core, recipes, config, data, models, serve.
"""
