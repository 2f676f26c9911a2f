"""Time the full default requantize run and print wall time per phase.

Run on purpose (not a test):  .venv/bin/python benchmarks/time_default_run.py [--params params.yaml]

It requantizes the default source model from scratch (fresh work folder, fresh temporary MLflow
store, so your own store and production alias are untouched) and prints:
  - wall time per phase (setup, data, quantize, evaluate, track, select) as measured inside the flow,
  - the outer wall time of the flow call, and the part of it outside any phase (Prefect's
    temporary server start with the library imports `requant run` does meanwhile, task orchestration),
  - Prefect + MLflow overhead as a share of the whole run,
  - the candidate table, with the CPU it was measured on.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    """Run the default flow once and print the timing breakdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    from flows import runtime

    runtime.configure()
    from tasks.config.loading import load_settings
    from tasks.measure.timing import cpu_info
    from tasks.track import Tracker

    settings = load_settings(args.params)
    project = Path(args.params).resolve().parent
    # The source model comes from your store; everything the benchmark writes goes to a temp store.
    source = Tracker(settings.registry).fetch_source(settings.model.source_uri, project / "models" / "source")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        from flows.requantize import requantize

        start = time.perf_counter()
        with runtime.prefect_api():  # as `requant run`: its temporary Prefect server starts while libraries load
            summary = requantize(params_path=args.params, model_uri=str(source.folder), project_dir=str(project),
                                 force=True, work_dir=str(Path(tmp) / "work"))
        total = time.perf_counter() - start

    host = cpu_info()
    inside = sum(summary.phases.values())
    outside = total - inside
    mlflow_seconds = summary.phases.get("track", 0.0)
    print(f"host: {host['cpu_model']} ({host['cpu_count']} cores; flags: {host['cpu_flags']})")
    print(f"{'phase':<10} {'seconds':>8} {'share':>7}")
    for phase, seconds in summary.phases.items():
        print(f"{phase:<10} {seconds:8.1f} {seconds / total:7.1%}")
    print(f"{'(outside)':<10} {outside:8.1f} {outside / total:7.1%}   Prefect server start (with imports meanwhile) + orchestration")
    print(f"{'total':<10} {total:8.1f}")
    overhead = outside + mlflow_seconds
    print(f"Prefect + MLflow overhead: {overhead:.1f} s = {overhead / total:.1%} of the run "
          f"(target < 10%); whole run target < 300 s: {'met' if total < 300 else 'NOT met'}")
    screening = summary.decision.get("screening") or {}
    print(f"full evaluations: {screening.get('full_evaluations', '?')} of {screening.get('candidates', '?')} candidates; "
          f"screened out: {', '.join(screening.get('screened_out', {})) or 'none'}; "
          f"rows scored by ONNX Runtime: {screening.get('rows_scored', '?')}")
    speed = screening.get("speed") or {}
    print(f"speed screen: {speed.get('seconds', 0):.1f} s; deferred (never scored or timed): "
          f"{', '.join(screening.get('speed_screened_out', [])) or 'none'}; brought back: "
          f"{', '.join(speed.get('brought_back', [])) or 'none'}; timed in full: {screening.get('timed_in_full', '?')}")
    search = summary.decision.get("search") or {}
    if search:
        print(f"search: {search.get('stop_reason')} (sensitivity computed: {search.get('sensitivity_computed')})")
    print()
    print(summary.table)
    print(f"\noutcome: {summary.outcome}; winner: {summary.winner}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
