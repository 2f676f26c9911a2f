"""Quantization-aware fine-tuning on Banking77: a precision that misses the bar after post-training
quantization, before and after QAT, its time, and its cost against the best post-training candidate.

Run on purpose (not a test), from a project whose MLflow store holds the default model
(`requant train` registers minilm-banking77@champion):

    .venv/bin/python benchmarks/qat_banking77.py [--params params.yaml] [--max-steps 200] [--max-minutes 5]
        [--target-config '{"per_channel": false}'] [--target-recipe int8-static]

What it does, with the same code the flow runs (nothing is registered; a temporary work folder):
  1. the FP32 reference of the default model on the prepared Banking77 split (evaluation rows from
     test.csv, calibration rows from train.csv);
  2. every post-training candidate of params.yaml, plus the target (default: static INT8 with
     per-tensor weights, which misses the bar on this model), scored with the flow's gate;
  3. QAT toward the target (tasks/train/qat.py: same recipe, same gate, training on calibration rows only),
     bounded by --max-steps and --max-minutes;
  4. the target, the QAT candidate and the passing post-training candidates timed in the same
     interleaved rounds, priced, and given to `select`.
It prints accuracy before and after QAT, the QAT time, and $/month against the best post-training
candidate, with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> int:
    """Run the comparison and print it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default=None, help="model folder or models:/ URI; default: model.source_uri")
    parser.add_argument("--target-recipe", default="int8-static")
    parser.add_argument("--target-config", default='{"per_channel": false, "calibration_method": "minmax"}')
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--max-minutes", type=float, default=5.0)
    parser.add_argument("--only-target", action="store_true", help="skip the params.yaml candidates (quicker)")
    args = parser.parse_args()

    from flows import runtime

    runtime.configure()
    import pandas as pd

    from tasks.build.candidates import build_candidate
    from tasks.build.reference import prepare_reference
    from tasks.config.loading import load_settings
    from tasks.config.search_space import expand_all
    from tasks.config.settings import CandidateSpec
    from tasks.data import version as data_version
    from tasks.decide.decision import for_selection
    from tasks.decide.selection import Reference as QualityReference
    from tasks.decide.selection import select
    from tasks.evaluate.candidates import score_candidate, time_candidates
    from tasks.measure.timing import cpu_info
    from tasks.models.base import open_model
    from tasks.track import Tracker
    from tasks.train import qat

    settings = load_settings(args.params)
    project = Path(args.params).resolve().parent
    host = cpu_info()
    profile = settings.cost.host_profile(host["cpu_model"])
    source = Tracker(settings.registry).fetch_source(args.model or settings.model.source_uri, project / "models" / "source")
    family = open_model(source.folder, settings.model.family, settings.model.max_length)
    data = data_version.reproduce_for_params(args.params)  # as `requant run --params`
    calibration = pd.read_csv(data.calibration_path, dtype=str, keep_default_na=False)
    evaluation = pd.read_csv(data.evaluation_path, dtype=str, keep_default_na=False)

    target_name = f"target-{args.target_recipe}"
    specs = [] if args.only_target else expand_all(settings.quantize.candidates)
    specs.append(CandidateSpec(name=target_name, recipe=args.target_recipe, config=json.loads(args.target_config)))
    settings = settings.model_copy(update={"qat": settings.qat.model_copy(update={
        "enabled": True, "target": target_name, "max_steps": args.max_steps, "max_minutes": args.max_minutes})})

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reference = prepare_reference(source.folder, evaluation, calibration, work / "source", settings.model,
                                      settings.evaluate, settings.quantize.calibration_batch_size)
        measured = [score_candidate(build_candidate(s, reference, source.digest, work), reference, settings.evaluate,
                                    settings.quality_bar) for s in specs]
        start = time.perf_counter()
        escalation = qat.escalate(measured, reference, family, calibration, evaluation, settings, source.digest, work,
                                  progress=lambda p: print(f"  qat step {p.step}/{p.total_steps} loss {p.loss:.4f} "
                                                           f"({p.seconds:.0f} s)", flush=True))
        escalation_seconds = time.perf_counter() - start
        measured += escalation.measured
        timed = [m for m in measured if not m.error and (m.built.name in (target_name, qat.PREFIX + target_name)
                                                         or qat.passes_quality(m, reference, settings))]
        time_candidates(timed, reference, settings.evaluate, profile, settings.cost.traffic)
        quality = QualityReference(reference.quality.accuracy, reference.quality.hard_slice_accuracy)
        decision = select([for_selection(m, reference.y_true) for m in timed], quality, settings.quality_bar)

    print(f"host: {host['cpu_model']} ({host['cpu_count']} cores; flags: {host['cpu_flags']}); priced as {profile.name}")
    print(f"source: {source.uri}; FP32 accuracy {reference.quality.accuracy:.2%} on {len(reference.y_true)} selection rows "
          f"(hard slice {reference.quality.hard_slice_accuracy:.2%})")
    print(f"escalation: {escalation.reason}")
    for a in escalation.attempts:
        print(f"attempt {a.candidate}: {a.steps} steps, training {a.train_seconds:.0f} s, with export and quantization "
              f"{escalation_seconds:.0f} s; {a.training_rows} training rows ({a.training_rows_dropped} dropped); "
              f"stopped: {a.stop_reason}; error: {a.error}")
    print(f"{'candidate':<48} {'accuracy':>9} {'hard':>7} {'passes':>7} {'sent/s':>8} {'$/month':>9}")
    for m in timed:
        v = decision.verdicts[m.built.name]
        print(f"{m.built.name:<48} {m.quality.accuracy:9.2%} {m.quality.hard_slice_accuracy:7.2%} "
              f"{'yes' if v.passed_bar else 'no':>7} {m.speed.throughput_per_s:8.0f} {m.cost.monthly_cost_usd:9,.0f}")
    best_ptq = next((m for m in sorted(timed, key=lambda m: m.cost.monthly_cost_usd)
                     if decision.verdicts[m.built.name].passed_bar and m.built.name != qat.PREFIX + target_name), None)
    result = next((m for m in timed if m.built.name == qat.PREFIX + target_name), None)
    before = next(m for m in measured if m.built.name == target_name)
    print(f"{target_name}: {before.quality.accuracy:.2%} after post-training quantization -> "
          f"{result.quality.accuracy:.2%} after QAT" if result and before.quality else "no QAT candidate")
    if result and best_ptq:
        print(f"cost: QAT candidate ${result.cost.monthly_cost_usd:,.0f}/month vs best post-training "
              f"{best_ptq.built.name} ${best_ptq.cost.monthly_cost_usd:,.0f}/month")
    print(f"selection: {decision.summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
