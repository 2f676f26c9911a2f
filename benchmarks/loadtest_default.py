"""Served capacity of the promoted (default) winner at the p95 target, against the flow's estimate.

Run on purpose (not a test), after `make run` has promoted a version:

    PYTHONPATH=. .venv/bin/python benchmarks/loadtest_default.py [--params params.yaml] [--version production]
        [--slo-ms 100] [--texts-per-request 1] [--max-seconds 180] [--max-requests 20000]

It serves the version as `requant loadtest` does (loadtest.front: requant's front, or `mlflow models
serve`) on 127.0.0.1, drives it with the open-loop load generator (tasks/measure/load_driver.py), ramps
until a step misses the p95 target and refines to within loadtest.resolution, and prints per step:
offered and served requests/s, p50/p95, errors, the server's and the generator's CPU. Then the two
figures side by side, with what each costs per month on the host's hardware profile:

  - the decision's figure: the served capacity the flow priced the version on (serving.price_from:
    served), or its batched throughput for versions decided before;
  - the served capacity now: requests/s held at p95 <= target, each request carrying
    --texts-per-request texts, through HTTP, JSON, tokenization and the served model.

The load generator runs on the same host as the server: on a 2-core machine they share the cores
(its CPU is printed); name the CPU next to any number quoted from it. The result is also
recorded as loadtest_* metrics on the version's run (same as `requant loadtest --reprice`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    """Load-test the version and print capacity and $/month against the flow's estimate."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--version", default="production", help="Version number or alias.")
    parser.add_argument("--slo-ms", type=float, default=None, help="p95 target (default: loadtest.slo_p95_ms).")
    parser.add_argument("--texts-per-request", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--max-requests", type=int, default=None)
    args = parser.parse_args()

    from flows import runtime

    runtime.configure()
    from flows.after_decision import loadtest_version
    from tasks.measure.timing import cpu_info

    overrides = {k: v for k, v in {"slo_p95_ms": args.slo_ms, "texts_per_request": args.texts_per_request,
                                   "max_seconds": args.max_seconds, "max_requests": args.max_requests}.items()
                 if v is not None}
    host = cpu_info()
    print(f"host: {host['cpu_model']} ({host.get('cpu_count')} cores)")
    done = loadtest_version(args.params, args.version, reprice=True, overrides=overrides)
    print(done.report)
    comparison, result = done.comparison, done.result
    print()
    print(f"{'':<28}{'sentences/s':>12}{'$/month':>12}")
    assumed_cost = (f"{comparison.assumed_monthly_cost_usd:,.2f}" if comparison.assumed_monthly_cost_usd is not None
                    else "-")
    assumed = f"{comparison.assumed_sentences_per_s:.1f}" if comparison.assumed_sentences_per_s else "-"
    print(f"{'flow estimate (batched)':<28}{assumed:>12}{assumed_cost:>12}")
    served_cost = f"{comparison.served_cost.monthly_cost_usd:,.2f}" if comparison.served_cost else "-"
    bound = "" if result.limit_found else " (lower bound: budget ended the ramp)"
    print(f"{'served at p95 target':<28}{result.capacity_sentences_per_s:>12.1f}{served_cost:>12}{bound}")
    print(f"recorded on run {done.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
