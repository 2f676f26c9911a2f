"""How stable is the decision? Re-time every candidate N times and decide again each time.

Run on purpose (not a test):

    .venv/bin/python benchmarks/decision_stability.py [--params params.yaml] [--runs 10] [--rounds 5]

It builds (or reuses) the default source model's grid candidates and scores their quality once
(ONNX Runtime on the CPU is deterministic, so quality does not change between runs), then repeats
N times: fresh interleaved timing rounds -> prices -> selection -> confirmation of the winner on the
held-out rows. It prints how often each winner was chosen, the spread of each candidate's price,
and every promotion whose loss on the confirmation rows exceeds the bar. Nothing is logged to MLflow
and no alias moves. Target (issue 8): the same winner in at least 9 of 10 runs, zero promotions
over the bar. The mixed-precision search is left out: its trials are grid-like int8 candidates,
and timing them adds minutes without telling more about stability.
"""

from __future__ import annotations

import argparse
import collections
import sys
from dataclasses import replace
from pathlib import Path


def main() -> int:
    """Decide N times on fresh timings and print the stability figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per run (default: evaluate.timing_rounds)")
    parser.add_argument("--throughput-batches", type=int, default=None, help="batches per round (default: evaluate's)")
    parser.add_argument("--latency-runs", type=int, default=None, help="batch-1 runs per run (default: evaluate's)")
    parser.add_argument("--work-dir", default=None, help="candidate cache (default: PROJECT/models/work)")
    args = parser.parse_args()

    from flows import runtime

    runtime.configure()
    import numpy as np
    import pandas as pd

    from tasks.build.candidates import build_candidate
    from tasks.build.reference import prepare_reference
    from tasks.config.loading import load_settings
    from tasks.config.search_space import expand_all
    from tasks.data.version import reproduce_for_params
    from tasks.decide.decision import (
        check_reference,
        confirm_winner,
        for_selection,
        passes_quality,
    )
    from tasks.decide.selection import Reference as QualityReference
    from tasks.decide.selection import select
    from tasks.evaluate.candidates import score_candidate, time_candidates
    from tasks.measure.timing import cpu_info
    from tasks.track import Tracker

    settings = load_settings(args.params)
    evaluate = settings.evaluate.model_copy(update={
        "timing_rounds": args.rounds or settings.evaluate.timing_rounds,
        "throughput_batches": args.throughput_batches or settings.evaluate.throughput_batches,
        "latency_runs": args.latency_runs or settings.evaluate.latency_runs})
    project = Path(args.params).resolve().parent
    work_dir = Path(args.work_dir) if args.work_dir else project / "models" / "work"
    host = cpu_info()
    profile = settings.cost.host_profile(host["cpu_model"])
    source = Tracker(settings.registry).fetch_source(settings.model.source_uri, project / "models" / "source")
    data = reproduce_for_params(args.params)  # as `requant run --params`: that file's own data stage
    calibration = pd.read_csv(data.calibration_path, dtype=str, keep_default_na=False)
    evaluation = pd.read_csv(data.evaluation_path, dtype=str, keep_default_na=False)
    reference = prepare_reference(source.folder, evaluation, calibration, work_dir / "sources" / source.digest[:16],
                                  settings.model, evaluate, settings.quantize.calibration_batch_size)
    check_reference(reference)
    specs = expand_all(settings.quantize.candidates)
    built = [build_candidate(spec, reference, source.digest, work_dir) for spec in specs]
    scored = [score_candidate(b, reference, evaluate, settings.quality_bar) for b in built]
    quality = QualityReference(reference.quality.accuracy, reference.quality.hard_slice_accuracy)

    winners, prices, over_bar = collections.Counter(), collections.defaultdict(list), []
    for run in range(args.runs):
        measured = [replace(m, speed=None, cost=None, confirmation=None) for m in scored]  # fresh timing, same scores
        # As in the flow: only candidates that pass the bar on their scores are timed.
        time_candidates(measured, reference, evaluate, profile, settings.cost.traffic, measure_memory=False,
                        passes=lambda m: passes_quality(m, reference, settings.quality_bar))
        decision = select([for_selection(m, reference.y_true) for m in measured], quality, settings.quality_bar)
        winner = next((m for m in measured if m.built.name == decision.winner), None)
        confirmation = confirm_winner(winner, decision, reference, settings)
        winners[decision.winner or "(none)"] += 1
        for m in measured:
            if m.cost:
                prices[m.built.name].append(m.cost.monthly_cost_usd)
        if decision.promote and confirmation and (confirmation["relative_accuracy_loss"] or 0) > settings.quality_bar.max_relative_accuracy_loss:
            over_bar.append((run, decision.winner, confirmation["relative_accuracy_loss"]))
        print(f"run {run + 1}/{args.runs}: winner {decision.winner} "
              f"({'promote' if decision.promote else 'no promotion'}); "
              + ", ".join(f"{m.built.name} {m.speed.throughput_per_s:.0f}/s ${m.cost.monthly_cost_usd:.0f}"
                          for m in measured if m.speed and m.cost), flush=True)

    print()
    print(f"host: {host['cpu_model']} ({host['cpu_count']} cores; flags: {host['cpu_flags']}); priced as {profile.name}; "
          f"{evaluate.timing_rounds} interleaved timing rounds per run ({evaluate.throughput_batches} batches of "
          f"{evaluate.throughput_batch_size}, {evaluate.latency_runs} batch-1 runs); {len(reference.y_true)} selection rows, "
          f"{len(reference.confirmation.y_true) if reference.confirmation else 0} confirmation rows")
    print("winner frequency: " + ", ".join(f"{name} {count}/{args.runs}" for name, count in winners.most_common()))
    print(f"{'candidate':<44} {'$/month min':>11} {'median':>8} {'max':>8}")
    for name, values in prices.items():
        print(f"{name:<44} {min(values):11.0f} {np.median(values):8.0f} {max(values):8.0f}")
    top = winners.most_common(1)[0][1] if winners else 0
    print(f"same winner in {top} of {args.runs} runs (target >= {int(np.ceil(0.9 * args.runs))}); "
          f"promotions over the bar on the confirmation rows: {len(over_bar)} (target 0)")
    for run, name, loss in over_bar:
        print(f"  run {run + 1}: {name} loses {loss:.2%} on the confirmation rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
