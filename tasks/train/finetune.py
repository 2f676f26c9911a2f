"""Fine-tune an encoder end to end as a Hugging Face sequence classifier, on this CPU.

The loop is deliberately small and reusable: `fine_tune` takes any `torch.nn.Module` that maps a
tokenizer feed to an output with `.logits` (a Hugging Face `...ForSequenceClassification`, or the
same model with fake-quantize modules inserted for quantization-aware training) and trains it with
AdamW and a linear warm-up/decay schedule, bounded by epochs and an optional step cap. No Prefect,
no MLflow: the flow (flows/train.py) wires it and the tracking adapter registers the result.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tasks.config.settings import FinetuneSettings


@dataclass
class FinetuneResult:
    """What a fine-tuning run did."""

    steps: int
    epochs: float
    seconds: float
    final_loss: float
    loss_curve: list[float] = field(default_factory=list)  # mean loss per logged window
    curve_steps: list[int] = field(default_factory=list)  # the step at the end of each logged window
    stop_reason: str = "finished"  # finished | max_steps | time budget


@dataclass(frozen=True)
class Progress:
    """One progress report from the loop."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    seconds: float


def build_sequence_classifier(base_dir: Path, labels: Sequence[str], seed: int = 0):
    """A `AutoModelForSequenceClassification` on a base encoder folder, with a fresh head for `labels`.

    For the packaged MiniLM (a BertModel) this is a `BertForSequenceClassification`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        str(base_dir), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)}, local_files_only=True, use_safetensors=True,
        trust_remote_code=False)


def total_steps(rows: int, settings: FinetuneSettings) -> int:
    """Optimizer steps the loop will take: epochs x batches per epoch, capped by max_steps."""
    steps = math.ceil(settings.epochs * math.ceil(rows / settings.batch_size))
    return min(steps, settings.max_steps) if settings.max_steps else steps


@dataclass(frozen=True)
class Distillation:
    """Match a teacher's logits as well as the labels: loss = (1-w) CE + w T^2 KL(teacher_T || student_T)."""

    teacher_logits: np.ndarray  # [rows, classes], one row per training text
    weight: float = 0.5
    temperature: float = 2.0


def fine_tune(model, tokenizer, texts: Sequence[str], targets: np.ndarray, settings: FinetuneSettings, max_length: int,
              seed: int = 0, progress: Callable[[Progress], None] | None = None, report_every: int = 20,
              max_seconds: float | None = None, distillation: Distillation | None = None) -> FinetuneResult:
    """Train `model` in place on (texts, targets) with cross-entropy; return what happened.

    Batches are drawn from a seeded shuffle each epoch; within a batch texts are padded to the
    longest one. Weight decay skips biases and LayerNorm weights, as BERT fine-tuning does.
    The time budget is checked before every step, so a budget of 0 takes no step and says so in
    `stop_reason`; a step already started always completes.

    Args:
        model: maps `**feed` to an output with `.logits` [batch, classes].
        tokenizer: a Hugging Face tokenizer for the model.
        texts: training texts.
        targets: class index per text.
        settings: epochs, step cap, batch size, learning rate, warm-up, weight decay, threads.
        max_length: tokenizer truncation length.
        seed: seed of the batch order.
        progress: called every `report_every` steps and at the end.
        report_every: steps between progress reports.
        max_seconds: wall-time budget of the loop; None = unbounded.
        distillation: optional teacher logits to match (quantization-aware training uses the FP32 model's).
    """
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    steps = total_steps(len(texts), settings)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not _no_decay(n)]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and _no_decay(n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.learning_rate)
    warmup = int(settings.warmup_fraction * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets, dtype=np.int64)
    batches_per_epoch = math.ceil(len(texts) / settings.batch_size)
    model.train()
    start, step, window, curve, curve_steps = time.perf_counter(), 0, [], [], []
    stop_reason = "max_steps" if settings.max_steps and steps == settings.max_steps else "finished"
    out_of_time = False
    while step < steps and not out_of_time:
        order = rng.permutation(len(texts))
        for b in range(batches_per_epoch):
            if step >= steps:
                break
            if max_seconds is not None and time.perf_counter() - start >= max_seconds:
                out_of_time, stop_reason = True, f"time budget of {max_seconds:.0f} s reached after {step} of {steps} steps"
                break
            idx = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            feed = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt")
            logits = model(**feed).logits
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(targets[idx]))
            if distillation is not None:
                t = distillation.temperature
                teacher = torch.from_numpy(np.asarray(distillation.teacher_logits[idx], dtype=np.float32))
                soft = torch.nn.functional.kl_div(torch.log_softmax(logits / t, dim=-1), torch.log_softmax(teacher / t, dim=-1),
                                                  reduction="batchmean", log_target=True) * t * t
                loss = (1 - distillation.weight) * loss + distillation.weight * soft
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            window.append(loss.item())
            if step % report_every == 0 or step == steps:
                curve.append(float(np.mean(window)))
                curve_steps.append(step)
                window = []
                if progress:
                    progress(Progress(step, steps, step / batches_per_epoch, curve[-1], time.perf_counter() - start))
    if window:  # stopped by the time budget mid-window: its loss is still part of the curve
        curve.append(float(np.mean(window)))
        curve_steps.append(step)
    model.eval()
    return FinetuneResult(steps=step, epochs=step / batches_per_epoch, seconds=time.perf_counter() - start,
                          final_loss=curve[-1] if curve else float("nan"), loss_curve=curve, curve_steps=curve_steps,
                          stop_reason=stop_reason)


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name


def save_classifier(model, tokenizer, folder: Path) -> Path:
    """Write a Hugging Face folder: config.json (with id2label), model.safetensors, tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder
