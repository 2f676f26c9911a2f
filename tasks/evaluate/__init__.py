"""Built candidates evaluated: scored against FP32 (screened, cached), timed side by side, priced and
confirmed (candidates.py), and the speed screen that defers clearly slower ones (speed.py).

May import: every package above except decide and train.
"""
