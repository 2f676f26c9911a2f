"""Training the baseline head (training.py), fine-tuning (finetune.py), and quantization-aware
training with fake quantization (qat.py, fake_quant.py).

May import: every other package of tasks.
"""
