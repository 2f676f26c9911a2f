"""Built candidates evaluated: scored against FP32 (screened, cached), timed side by side, priced and
confirmed (candidates.py), the speed screen that defers clearly slower ones (speed.py), and decoder candidates
scored on text, timed (time to first token, decode tokens/s) and priced per token (decoders.py).

May import: every package above except decide and train.
"""
