"""Does the cheap sensitivity ranking (search.sensitivity_samples) agree with the full sweep?

Run on purpose (not a test):  .venv/bin/python benchmarks/sensitivity_agreement.py [--params params.yaml] [--samples 64]

On the default source model and calibration data, it ranks the weight groups twice, on `--samples`
texts and on every calibration text, and prints the wall time of each, the Spearman correlation
and the top-k overlap (k = 3, 5, 8), and the top groups of each ranking.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    """Rank twice and print the agreement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--samples", type=int, default=None, help="Default: search.sensitivity_samples.")
    args = parser.parse_args()

    from flows import runtime

    runtime.configure()
    import pandas as pd

    from tasks.build.reference import prepare_reference
    from tasks.config.loading import load_settings
    from tasks.data.version import reproduce_for_params
    from tasks.measure.sensitivity import rank_groups, ranking_agreement, spread_rows
    from tasks.measure.timing import cpu_info
    from tasks.recipes.base import parse_config
    from tasks.track import Tracker

    settings = load_settings(args.params)
    samples = args.samples or settings.search.sensitivity_samples
    project = Path(args.params).resolve().parent
    source = Tracker(settings.registry).fetch_source(settings.model.source_uri, project / "models" / "source")
    data = reproduce_for_params(args.params)  # as `requant run --params`: that file's own data stage
    evaluation = pd.read_csv(data.evaluation_path, dtype=str, keep_default_na=False)
    calibration = pd.read_csv(data.calibration_path, dtype=str, keep_default_na=False)
    with tempfile.TemporaryDirectory() as tmp:
        reference = prepare_reference(source.folder, evaluation.head(200), calibration, Path(tmp) / "ref",
                                      settings.model, settings.evaluate, settings.quantize.calibration_batch_size)
        base = parse_config("int8-dynamic", settings.search.base_config, "search.base_config")
        graph = reference.inputs.optimized_model if base.graph == "optimized" else reference.inputs.fp32_model
        feeds = reference.inputs.calibration_feeds
        timings, rankings = {}, {}
        for label, chosen in (("cheap", spread_rows(feeds, samples)), ("full", feeds)):
            start = time.perf_counter()
            rankings[label] = rank_groups(graph, chosen, Path(tmp) / label, per_channel=base.per_channel,
                                          threads=settings.evaluate.intra_op_threads)
            timings[label] = (time.perf_counter() - start, sum(len(f["input_ids"]) for f in chosen))
    host = cpu_info()
    print(f"host: {host['cpu_model']} ({host['cpu_count']} cores; {host['cpu_flags']})")
    for label, (seconds, rows) in timings.items():
        print(f"{label:<6} {rows:5d} texts  {seconds:6.1f} s")
    for k in (3, 5, 8):
        agreement = ranking_agreement(rankings["cheap"], rankings["full"], top_k=k)
        print(f"top-{k} overlap {agreement['top_k_overlap']:.2f}; Spearman {agreement['spearman']:.3f}")
    print("top 8 full :", ", ".join(g.group for g in rankings["full"][:8]))
    print("top 8 cheap:", ", ".join(g.group for g in rankings["cheap"][:8]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
