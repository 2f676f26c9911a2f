"""requant's search against Optimum's one-line INT8 (and, optionally, Olive's search), side by side.

Run on purpose (not a test):

    .venv/bin/python benchmarks/compare_peers.py [--rounds 3] [--olive-python /path/to/olive-venv/bin/python]

In one run, on the same model, data and machine, it:
  1. runs requant's requantize flow (grid + sensitivity + mixed search) from scratch into a
     temporary MLflow store and work folder, and takes the candidate it selected;
  2. quantizes the same FP32 ONNX export with Optimum's ORTQuantizer and
     AutoQuantizationConfig.avx2(is_static=False) (QOperator, u8/u8, per channel);
  3. optionally runs Olive's OnnxQuantization search (benchmarks/olive_runner.py, in Olive's own
     virtual environment) with the same goal (1.5% max degradation) and budget (max_iter 10);
  4. scores every model with the same code (accuracy vs PyTorch FP32 on the whole evaluation set)
     and times them in alternating rounds (so drift on a shared machine hits all of them), and
     prints accuracy loss, batch-1 p50/p95, throughput, size and $/month, with ratios and their
     spread over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating timing rounds per model.")
    parser.add_argument("--olive-python", default=None, help="Python of a venv with olive-ai (see benchmarks/README.md).")
    parser.add_argument("--olive-max-iter", type=int, default=10)
    args = parser.parse_args()

    from flows import runtime

    runtime.configure()
    import pandas as pd

    from tasks.build.reference import prepare_reference
    from tasks.config.loading import load_settings
    from tasks.config.search_space import expand_all
    from tasks.data.version import reproduce_for_params
    from tasks.measure.cost import monthly_cost
    from tasks.measure.quality_intervals import paired_relative_loss
    from tasks.measure.scoring import predict_onnx, quality_metrics
    from tasks.measure.timing import cpu_info, measure_speed
    from tasks.models.graph import onnx_session
    from tasks.models.io import ENCODER_DIR
    from tasks.track import Tracker

    settings = load_settings(args.params)
    grid_size = len(expand_all(settings.quantize.candidates))
    project = Path(args.params).resolve().parent
    source = Tracker(settings.registry).fetch_source(settings.model.source_uri, project / "models" / "source")
    tmp = Path(tempfile.mkdtemp(prefix="requant-peers-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    models: dict[str, Path] = {}
    search_seconds: dict[str, float] = {}

    from flows.requantize import requantize

    start = time.perf_counter()
    with runtime.prefect_api():  # as `requant run`: its temporary Prefect server starts while libraries load
        summary = requantize(params_path=args.params, model_uri=str(source.folder), project_dir=str(project),
                             force=True, work_dir=str(tmp / "work"))
    search_seconds["requant"] = time.perf_counter() - start  # the server's shutdown included
    if summary.winner is None:
        print("requant selected no candidate; nothing to compare")
        return 1
    chosen = summary.decision["candidates"][summary.winner]
    models[f"requant ({summary.winner})"] = tmp / "work" / "candidates" / f"{chosen['recipe']}-{chosen['config_hash']}" / "model.onnx"

    # The flow exports the FP32 graph into a folder of its own per source model (work/sources/<digest>/).
    fp32 = next((tmp / "work" / "sources").glob("*/fp32/model.onnx"))
    start = time.perf_counter()
    models["optimum avx2 dynamic"] = optimum_one_line(fp32, tmp / "optimum")
    search_seconds["optimum"] = time.perf_counter() - start

    data = reproduce_for_params(args.params)  # the data the flow just used (a no-op `dvc repro`)
    evaluation = pd.read_csv(data.evaluation_path, dtype=str, keep_default_na=False)
    calibration = pd.read_csv(data.calibration_path, dtype=str, keep_default_na=False)
    reference = prepare_reference(source.folder, evaluation, calibration, tmp / "reference", settings.model,
                                  settings.evaluate, settings.quantize.calibration_batch_size)
    if args.olive_python:
        path, seconds, tried = olive_search(args.olive_python, fp32, source.folder / ENCODER_DIR, reference.card.labels,
                                            data.evaluation_path, tmp / "olive", args.olive_max_iter)
        models[f"olive ({tried} configs)"] = path
        search_seconds["olive"] = seconds

    quality, speeds = {}, {name: [] for name in models}
    ref_correct = reference.predictions == reference.y_true
    for name, path in models.items():
        session = onnx_session(path, settings.evaluate.intra_op_threads)
        logits = predict_onnx(session, reference.eval_batches, len(reference.y_true))
        quality[name] = (quality_metrics(logits, reference.y_true, reference.predictions, reference.hard_idx),
                         paired_relative_loss(ref_correct, logits.argmax(axis=1) == reference.y_true))
    for _ in range(args.rounds):  # alternate models each round: drift on a shared host hits all alike
        for name, path in models.items():
            session = onnx_session(path, settings.evaluate.intra_op_threads)
            speeds[name].append(measure_speed(session, path, reference.latency_feeds, reference.throughput_feeds,
                                              settings.evaluate))

    host = cpu_info()
    profile = settings.cost.host_profile(host["cpu_model"])
    print(f"host: {host['cpu_model']} ({host['cpu_count']} cores; {host['cpu_flags']}); "
          f"{settings.evaluate.intra_op_threads} threads; priced as {profile.name}")
    print(f"PyTorch FP32 accuracy: {reference.quality.accuracy:.2%} on {len(reference.y_true)} rows; "
          f"{args.rounds} timing rounds, medians shown with min-max")
    header = f"{'model':<44} {'accuracy':>8} {'loss pts':>8} {'p50 ms':>14} {'p95 ms':>7} {'sent/s':>16} {'MB':>6} {'$/month':>8}"
    print(header)
    print("-" * len(header))
    rows = {}
    for name in models:
        q, loss = quality[name]
        p50 = [s.latency_p50_ms for s in speeds[name]]
        p95 = [s.latency_p95_ms for s in speeds[name]]
        thr = [s.throughput_per_s for s in speeds[name]]
        # Priced like requant prices candidates: on the slowest measured repeat.
        slowest = min(s.throughput_low_per_s for s in speeds[name])
        cost = monthly_cost(slowest, profile, settings.cost.traffic).monthly_cost_usd
        rows[name] = (p50, thr, speeds[name][0].size_mb, cost)
        print(f"{name:<44} {q.accuracy:8.2%} {(reference.quality.accuracy - q.accuracy) * 100:8.2f} "
              f"{np.median(p50):6.2f} ({min(p50):.2f}-{max(p50):.2f}) {np.median(p95):7.2f} "
              f"{np.median(thr):6.0f} ({min(thr):.0f}-{max(thr):.0f}) {speeds[name][0].size_mb:6.1f} {cost:8.0f}")

    ours = next(n for n in models if n.startswith("requant"))
    for peer in (n for n in models if n != ours):
        p50_ratio = [a / b for a, b in zip(rows[peer][0], rows[ours][0])]
        thr_ratio = [b / a for a, b in zip(rows[peer][1], rows[ours][1])]
        print(f"requant vs {peer}: batch-1 speed-up {np.median(p50_ratio):.2f}x ({min(p50_ratio):.2f}-{max(p50_ratio):.2f}), "
              f"throughput {np.median(thr_ratio):.2f}x ({min(thr_ratio):.2f}-{max(thr_ratio):.2f}), "
              f"size {rows[ours][2] / rows[peer][2]:.2f}x, cost {rows[ours][3] / rows[peer][3]:.2f}x, "
              f"accuracy loss {(reference.quality.accuracy - quality[ours][0].accuracy) * 100:.2f} vs "
              f"{(reference.quality.accuracy - quality[peer][0].accuracy) * 100:.2f} pts")
    print("search wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in search_seconds.items()))
    screening = summary.decision.get("screening") or {}
    print(f"requant full evaluations: {screening.get('full_evaluations', '?')} of {screening.get('candidates', '?')} "
          f"candidates (grid {grid_size} + search trials + production); screened out: "
          f"{', '.join(screening.get('screened_out', {})) or 'none'}; rows scored {screening.get('rows_scored', '?')}")
    print(f"requant speed screen: deferred {', '.join(screening.get('speed_screened_out', [])) or 'none'} "
          f"(brought back: {', '.join((screening.get('speed') or {}).get('brought_back', [])) or 'none'}); "
          f"timed in full: {screening.get('timed_in_full', '?')}; search: "
          f"{(summary.decision.get('search') or {}).get('stop_reason', 'off')}")
    print(f"requant decision: {summary.winner} ({summary.outcome}); phases: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in summary.phases.items()))
    if "olive" in search_seconds:
        ratio = search_seconds["requant"] / search_seconds["olive"]
        print(f"requant whole run {search_seconds['requant']:.0f} s vs Olive search {search_seconds['olive']:.0f} s: "
              f"{ratio:.2f}x (target <= 0.50x: {'met' if ratio <= 0.5 else 'not met'})")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def optimum_one_line(fp32_model: Path, out_dir: Path) -> Path:
    """Optimum's documented one-liner: dynamic INT8 for AVX2 CPUs."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(fp32_model, out_dir / "model.onnx")
    quantizer = ORTQuantizer.from_pretrained(str(out_dir), file_name="model.onnx")
    quantizer.quantize(save_dir=str(out_dir / "quantized"),
                       quantization_config=AutoQuantizationConfig.avx2(is_static=False))
    return out_dir / "quantized" / "model_quantized.onnx"


def olive_search(python: str, fp32_model: Path, tokenizer_dir: Path, labels: list[str], eval_csv: Path, out_dir: Path,
                 max_iter: int) -> tuple[Path, float, int]:
    """Run Olive's OnnxQuantization search in its own venv; return (model, wall seconds, configs tried)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels_path = out_dir / "labels.json"
    labels_path.write_text(json.dumps(labels))
    runner = Path(__file__).with_name("olive_runner.py")
    start = time.perf_counter()
    subprocess.run([python, str(runner), "--model", str(fp32_model), "--tokenizer", str(tokenizer_dir),
                    "--eval-csv", str(eval_csv), "--labels", str(labels_path), "--out", str(out_dir),
                    "--max-iter", str(max_iter), "--degradation", "1.5"], check=True)
    seconds = time.perf_counter() - start
    result = json.loads((out_dir / "olive_result.json").read_text())
    return Path(result["model_path"]), seconds, int(result.get("configs_tried", 0))


if __name__ == "__main__":
    sys.exit(main())
