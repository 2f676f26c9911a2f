"""Quantization-aware fine-tuning: the bounded escalation when post-training quantization misses the bar.

Post-training quantization first; only when no post-training candidate of a lowered precision
passes the bar (or `qat.target` names one that fails) is the source model fine-tuned with the
target recipe's quantization simulated in the loop (tasks/train/fake_quant.py: fake-quantized weights,
and activations where the recipe quantizes them, straight-through gradients, optionally distilled
from the FP32 source's logits). The result is written back as a model folder of the source's own
family, exported like the source, quantized with the *same* recipe and config, and scored on the
*same* selection rows with the same gate; the flow then times it with the others, confirms it on
the same held-out rows if it wins, and `select` decides. It is a candidate like any other.

Training uses the calibration rows only (sampled from train.csv, with their labels); any row whose
text also appears among the evaluation rows (selection or confirmation) is dropped first, so the
rows a QAT candidate is judged and confirmed on are never seen in training.

No Prefect, no MLflow: the flow wires `escalate`, and flows/record.py logs each attempt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from tasks.build.candidates import BuiltCandidate, build_candidate
from tasks.build.reference import Reference
from tasks.config.settings import CandidateSpec, FinetuneSettings, QatSettings, Settings
from tasks.data.prepare import LABEL, TEXT
from tasks.decide.selection import Candidate, Decision, judge
from tasks.decide.selection import Reference as QualityReference
from tasks.evaluate.candidates import MeasuredCandidate, score_candidate
from tasks.measure.scoring import label_indices, predict_torch, tokenized_batches
from tasks.recipes.base import QuantizeInputs, recipe_class, runtime_versions
from tasks.train.fake_quant import (
    QatUnsupported,
    insert_fake_quant,
    scheme_for,
    strip_fake_quant,
)
from tasks.train.finetune import Distillation, Progress, fine_tune, total_steps

log = logging.getLogger("requant")

PREFIX = "qat-"
DONE_FILE = "qat.json"  # written last in an attempt folder: its presence means the trained model is complete
TRAINING_SOURCE = ("the calibration rows (sampled from train.csv, with their labels); rows whose text is also an "
                   "evaluation row were dropped, so the selection and confirmation rows stay unseen")
# Expected serving cost before timing, for choosing a target: fewer bits first (int4 < int8 < mixed < fp16).
_PRECISION_ORDER = {"int4": 0, "int8": 1, "mixed": 2, "fp16": 3}


@dataclass
class TrainingRows:
    """The rows QAT trains on, and how many calibration rows were dropped because evaluation holds their text."""

    texts: list[str]
    targets: np.ndarray
    dropped: int = 0

    def digest(self) -> str:
        """Content address of the rows (texts and labels)."""
        payload = json.dumps([self.texts, self.targets.tolist()])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def frame(self, labels: list[str]) -> pd.DataFrame:
        """The rows as text/label, for the record."""
        return pd.DataFrame({TEXT: self.texts, LABEL: [labels[i] for i in self.targets]})


@dataclass
class Attempt:
    """One fine-tuning run toward one target candidate, and what it produced."""

    target: str
    candidate: str
    recipe: str
    config: dict
    scheme: str = ""
    steps: int = 0
    planned_steps: int = 0
    train_seconds: float = 0.0
    seconds: float = 0.0  # training, write-back, export and quantization
    stop_reason: str = ""
    loss_curve: list[float] = field(default_factory=list)
    curve_steps: list[int] = field(default_factory=list)
    training_rows: int = 0
    training_rows_dropped: int = 0
    training_digest: str = ""
    target_accuracy: float | None = None  # the post-training candidate's accuracy it started from
    reused: bool = False
    error: str | None = None
    folder: Path | None = None
    started_at_ms: int = 0
    finished_at_ms: int = 0

    def as_dict(self) -> dict:
        """Plain dict for decision.json (the loss curve is in the attempt's MLflow run)."""
        out = dataclasses.asdict(self)
        out.pop("loss_curve"), out.pop("curve_steps")
        out["folder"] = str(self.folder) if self.folder else None
        out["final_loss"] = self.loss_curve[-1] if self.loss_curve else None
        return out


@dataclass
class Escalation:
    """Why escalation started or not, its attempts, and the candidates they produced."""

    ran: bool
    reason: str
    target: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    measured: list[MeasuredCandidate] = field(default_factory=list)
    training: TrainingRows | None = None
    settings: dict = field(default_factory=dict)

    def record(self, decision: Decision | None = None) -> dict:
        """The `qat` key of decision.json: why it started (or not) and what it gave."""
        out = {"ran": self.ran, "reason": self.reason, "target": self.target, "settings": self.settings,
               "training_rows_source": TRAINING_SOURCE if self.ran else None,
               "attempts": [a.as_dict() for a in self.attempts]}
        results = []
        for m in self.measured:
            verdict = decision.verdicts.get(m.built.name) if decision else None
            results.append({"candidate": m.built.name, "error": m.error,
                            "accuracy": m.quality.accuracy if m.quality else None,
                            "passed_bar": bool(verdict and verdict.passed_bar),
                            "winner": bool(decision and decision.winner == m.built.name),
                            "reason": verdict.reason if verdict else None})
        out["result"] = results
        out["outcome"] = _outcome(self, results)
        return out


def _outcome(escalation: Escalation, results: list[dict]) -> str:
    if not escalation.ran:
        return f"not run: {escalation.reason}"
    attempt = escalation.attempts[0] if escalation.attempts else None
    if attempt and attempt.error:
        return f"failed: {attempt.error}"
    if not results:
        return f"no candidate: {attempt.stop_reason if attempt else 'no attempt'}"
    r = results[0]
    if r["winner"]:
        return f"{r['candidate']} won"
    if r["passed_bar"]:
        return f"{r['candidate']} passes the bar but did not win ({r['reason']})"
    return f"{r['candidate']} still misses the bar ({r['reason'] or r['error']})"


def passes_quality(m: MeasuredCandidate, reference: Reference, settings: Settings) -> bool:
    """Whether a scored candidate meets the bar on quality (latency is judged after timing)."""
    if m.error or m.quality is None:
        return False
    bar = settings.quality_bar.model_copy(update={"max_p95_latency_ms": None})
    scored = Candidate(name=m.built.name, recipe=m.built.recipe, accuracy=m.quality.accuracy,
                       hard_slice_accuracy=m.quality.hard_slice_accuracy,
                       accuracy_loss_high=m.accuracy_loss.high if m.accuracy_loss else None,
                       hard_slice_loss_high=m.hard_slice_loss.high if m.hard_slice_loss else None)
    return judge(scored, QualityReference(reference.quality.accuracy, reference.quality.hard_slice_accuracy), bar).passed_bar


def _lowered(m: MeasuredCandidate) -> bool:
    b = m.built
    return not b.is_production and not b.name.startswith(PREFIX) and b.precision in _PRECISION_ORDER


def plan(measured: list[MeasuredCandidate], reference: Reference, settings: Settings) -> tuple[MeasuredCandidate | None, str]:
    """Choose the candidate to fine-tune toward, or say why escalation does not run.

    Off when disabled; otherwise it runs only when it can matter: a named target that fails the
    bar, or (no target named) when no post-training candidate of a lowered precision passes. The
    default target is the failing lowered-precision candidate with the lowest expected cost (fewest
    bits, then the smallest file), among those whose recipe QAT can simulate.
    """
    qat = settings.qat
    if not qat.enabled:
        return None, "disabled (qat.enabled is false)"
    by_name = {m.built.name: m for m in measured}
    if qat.target is not None:
        target = by_name.get(qat.target)
        if target is None:
            return None, f"target {qat.target} was not measured in this run"
        if target.built.error:
            return None, f"target {qat.target} failed to build ({target.built.error}); nothing to fine-tune toward"
        if passes_quality(target, reference, settings):
            return None, f"target {qat.target} already passes the bar after post-training quantization"
        return target, f"target {qat.target} (named in qat.target) misses the bar after post-training quantization"
    passing = [m.built.name for m in measured if _lowered(m) and passes_quality(m, reference, settings)]
    if passing:
        return None, f"not needed: post-training {', '.join(passing)} already pass{'es' if len(passing) == 1 else ''} the bar"
    failing = [m for m in measured if _lowered(m) and not m.built.error and _simulable(m)]
    if not failing:
        return None, "no target: no lowered-precision candidate built that quantization-aware training can simulate"
    target = min(failing, key=lambda m: (_PRECISION_ORDER[m.built.precision], m.built.size_ratio, m.built.name))
    return target, (f"no post-training candidate of a lowered precision passes the bar; fine-tuning toward "
                    f"{target.built.name}, the lowest expected cost ({target.built.precision}, "
                    f"{target.built.size_ratio:.2f}x the FP32 size)")


def _simulable(m: MeasuredCandidate) -> bool:
    try:
        scheme_for(m.built.recipe, m.built.config)
        return True
    except QatUnsupported:
        return False


def training_rows(calibration: pd.DataFrame, evaluation: pd.DataFrame, labels: list[str]) -> TrainingRows:
    """The calibration rows QAT may train on: every one whose text is not also an evaluation row.

    The evaluation frame holds both the selection and the confirmation rows (the reference splits
    it), so dropping its texts keeps both unseen. Texts are compared stripped and case-folded.
    """
    held_out = {str(t).strip().casefold() for t in evaluation[TEXT]}
    keep = ~calibration[TEXT].map(lambda t: str(t).strip().casefold() in held_out)
    kept = calibration[keep]
    return TrainingRows(kept[TEXT].tolist(), label_indices(kept[LABEL].tolist(), labels), int((~keep).sum()))


def attempt_key(source_digest: str, target: MeasuredCandidate, qat: QatSettings, rows: TrainingRows) -> str:
    """Content address of an attempt: same source, target, knobs, rows and runtimes -> the same trained model."""
    code = hashlib.sha256(b"".join(Path(__file__).with_name(n).read_bytes() for n in ("qat.py", "fake_quant.py", "finetune.py")))
    payload = json.dumps({"source": source_digest, "recipe": target.built.recipe, "config": target.built.config,
                          "qat": qat.model_dump(mode="json", exclude={"target", "enabled", "threads"}),
                          "rows": rows.digest(), "runtime": runtime_versions(), "code": code.hexdigest()[:16]},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _finetune_settings(qat: QatSettings) -> FinetuneSettings:
    return FinetuneSettings(epochs=qat.epochs, max_steps=qat.max_steps, batch_size=qat.batch_size,
                            learning_rate=qat.learning_rate, warmup_fraction=qat.warmup_fraction,
                            weight_decay=qat.weight_decay, threads=qat.threads)


def train_toward(family, target: MeasuredCandidate, rows: TrainingRows, qat: QatSettings, max_length: int,
                 out_dir: Path, progress: Callable[[Progress], None] | None = None) -> tuple[Attempt, Path | None]:
    """Fine-tune a fresh copy of the source with the target's quantization in the loop; write it back.

    Returns the attempt and the trained model folder (same family as the source), or None when the
    budget allowed no step (the attempt's stop_reason says so).
    """
    import torch

    scheme = scheme_for(target.built.recipe, target.built.config)
    attempt = Attempt(target=target.built.name, candidate=PREFIX + target.built.name, recipe=target.built.recipe,
                      config=target.built.config, scheme=scheme.describe(), training_rows=len(rows.texts),
                      training_rows_dropped=rows.dropped, training_digest=rows.digest(),
                      target_accuracy=target.quality.accuracy if target.quality else None)
    if qat.max_minutes == 0:
        attempt.stop_reason = "time budget is zero (qat.max_minutes: 0): stopped before the first step; no candidate"
        return attempt, None
    if not rows.texts:
        attempt.stop_reason = "no training rows left after dropping the evaluation texts; no candidate"
        return attempt, None
    torch.manual_seed(qat.seed)
    model = family.load_trainable()
    distillation = None
    if qat.distill:
        # The FP32 source's own logits on the training rows, computed before any weight moves.
        teacher = family.load_reference()
        batches = tokenized_batches(family.tokenizer, rows.texts, max_length, 64)
        distillation = Distillation(predict_torch(teacher, batches, len(rows.texts)), qat.distill_weight, qat.temperature)
    wrapped = insert_fake_quant(model, scheme)
    log.info("qat: %s toward %s: %d Linear layers simulated (%s), %d training rows", attempt.candidate,
             target.built.name, wrapped, scheme.describe(), len(rows.texts))
    result = fine_tune(model, family.tokenizer, rows.texts, rows.targets, _finetune_settings(qat), max_length,
                       seed=qat.seed, progress=progress, report_every=max(1, min(20, qat.max_steps // 10)),
                       max_seconds=qat.max_minutes * 60, distillation=distillation)
    attempt.steps, attempt.train_seconds, attempt.stop_reason = result.steps, result.seconds, result.stop_reason
    attempt.loss_curve, attempt.curve_steps = result.loss_curve, result.curve_steps
    attempt.planned_steps = total_steps(len(rows.texts), _finetune_settings(qat))
    if result.steps == 0:
        attempt.stop_reason += "; no step taken, no candidate"
        return attempt, None
    strip_fake_quant(model)
    return attempt, family.save_trained(model, out_dir)


def escalate(measured: list[MeasuredCandidate], reference: Reference, family, calibration: pd.DataFrame,
             evaluation: pd.DataFrame, settings: Settings, source_digest: str, work_dir: Path,
             progress: Callable[[Progress], None] | None = None) -> Escalation:
    """Run the escalation if it is due: train toward the target, then build and score the QAT candidate.

    The candidate is built by the target's own recipe and config from the fine-tuned model's FP32
    export, and scored against the *source's* FP32 reference on the same selection rows. It is not
    timed here: the flow times it with the others. Attempts are content-addressed under
    work_dir/qat/, so a rerun with the same inputs reuses the trained model.
    """
    from tasks.models.base import open_model

    target, reason = plan(measured, reference, settings)
    record = Escalation(ran=target is not None, reason=reason, target=target.built.name if target else None,
                        settings=settings.qat.model_dump(mode="json"))
    if target is None:
        log.info("qat: %s", reason)
        return record
    log.info("qat: escalating: %s", reason)
    rows = training_rows(calibration, evaluation, reference.card.labels)
    record.training = rows
    key = attempt_key(source_digest, target, settings.qat, rows)
    folder = Path(work_dir) / "qat" / key
    started, start = int(time.time() * 1000), time.perf_counter()
    try:
        attempt = _cached_attempt(folder)
        if attempt is None:
            shutil.rmtree(folder, ignore_errors=True)
            attempt, trained = train_toward(family, target, rows, settings.qat, family.max_length, folder / "model", progress)
            if trained is not None:
                attempt.folder = trained
                (folder / DONE_FILE).write_text(json.dumps({**attempt.as_dict(), "loss_curve": attempt.loss_curve,
                                                            "curve_steps": attempt.curve_steps}))
        attempt.started_at_ms = started
        record.attempts.append(attempt)
        if attempt.folder is not None:
            trained_family = open_model(attempt.folder, family.id, settings.model.max_length)
            built = _build(trained_family, target, attempt, reference, settings, key, folder, work_dir)
            record.measured.append(score_candidate(built, reference, settings.evaluate, settings.quality_bar))
            if built.error:
                attempt.error = built.error
    except QatUnsupported as exc:
        record.attempts.append(Attempt(target=target.built.name, candidate=PREFIX + target.built.name,
                                       recipe=target.built.recipe, config=target.built.config, error=str(exc)))
    except Exception as exc:  # noqa: BLE001 - a failed escalation must not fail the run: it is one more candidate
        log.warning("qat: attempt toward %s failed: %s", target.built.name, exc)
        if not record.attempts:
            record.attempts.append(Attempt(target=target.built.name, candidate=PREFIX + target.built.name,
                                           recipe=target.built.recipe, config=target.built.config))
        record.attempts[-1].error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    for attempt in record.attempts:
        attempt.seconds = time.perf_counter() - start
        attempt.finished_at_ms = int(time.time() * 1000)
    return record


def _cached_attempt(folder: Path) -> Attempt | None:
    done = folder / DONE_FILE
    if not (done.is_file() and (folder / "model").is_dir()):
        return None
    raw = json.loads(done.read_text())
    raw.pop("final_loss", None)
    attempt = Attempt(**{k: v for k, v in raw.items() if k in Attempt.__dataclass_fields__})
    attempt.folder, attempt.reused = folder / "model", True
    return attempt


def _build(trained_family, target: MeasuredCandidate, attempt: Attempt, reference: Reference, settings: Settings,
           key: str, folder: Path, work_dir: Path) -> BuiltCandidate:
    """Export the fine-tuned model as the source was exported, and quantize it with the target's recipe."""
    fp32 = trained_family.export_onnx(folder / "fp32" / "model.onnx", settings.model.onnx_opset)
    optimized = trained_family.optimize(fp32, folder / "fp32-optimized" / "model.onnx")
    # Same calibration feeds and proof feeds as every other candidate; only the graphs differ.
    trained = dataclasses.replace(reference, inputs=QuantizeInputs(fp32_model=fp32, optimized_model=optimized,
                                                                  calibration_feeds=reference.inputs.calibration_feeds))
    recipe_class(target.built.recipe)  # an unknown recipe fails here, in one line
    spec = CandidateSpec(name=attempt.candidate, recipe=target.built.recipe, config=target.built.config)
    return build_candidate(spec, trained, f"qat-{key}", work_dir)


def render_markdown(escalation_record: dict) -> str:
    """The decision.md section on quantization-aware fine-tuning."""
    lines = ["## Quantization-aware fine-tuning", ""]
    if not escalation_record["ran"]:
        return "\n".join(lines + [f"Not run: {escalation_record['reason']}."])
    lines += [f"Started: {escalation_record['reason']}.", ""]
    for a in escalation_record["attempts"]:
        if a.get("error"):
            lines.append(f"- `{a['candidate']}`: **failed**: {a['error']}")
            continue
        lines.append(f"- `{a['candidate']}` ({a['scheme']}): {a['steps']} steps in {a['train_seconds']:.0f} s on "
                     f"{a['training_rows']} training rows ({a['training_rows_dropped']} dropped: their text is an "
                     f"evaluation row); stopped: {a['stop_reason']}" + (" (reused)" if a.get("reused") else ""))
    lines += ["", f"Training rows: {escalation_record['training_rows_source']}.", "",
              f"Outcome: {escalation_record['outcome']}."]
    return "\n".join(lines)
