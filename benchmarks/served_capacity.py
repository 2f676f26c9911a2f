"""Served capacity against batched throughput: does quantization's gain survive serving?

Run on purpose (not a test), after `make run` has promoted a version, on a quiet host:

    PYTHONPATH=. .venv/bin/python benchmarks/served_capacity.py [--params params.yaml] [--texts wikitext]

In one run on this host it measures, for three models: a model that does (almost) nothing (the
tokenizer and a 3-node graph: the ceiling of the front and the load generator themselves), the
FP32 graph and the promoted winner:

  (b) batched in-process throughput: texts/s through ONNX Runtime in batches of 32, pre-tokenized,
      median of 5 rounds (what the flow measures);
  (c) served capacity: requests/s at p95 <= target, 1 text per request, open-loop load from
      tasks/measure/load_driver.py refined to within 10%, through
        - `mlflow models serve` with batching off (max_batch_size 1: one model run per request,
          as before the batcher),
        - `mlflow models serve` with the batcher (its scoring server calls predict from at most
          6 threads on 2 cores, so batches stay small),
        - requant's front (tasks/serve/front.py) with the batcher: the documented way to serve.

The load generator shares the host's cores with the server; its own CPU is printed per row. Name
the CPU next to any figure quoted from this. `--texts wikitext` sends WikiText-2 lines (longer
texts, truncated to the model's max_length) instead of the evaluation set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SLO_MS = 100.0


def batched_throughput(model_path: Path, tokenizer_dir: Path, texts: list[str], max_length: int,
                       batch_size: int = 32, rounds: int = 5) -> float:
    """Texts/s through ONNX Runtime in pre-tokenized batches (median over rounds), 2 intra-op threads."""
    import numpy as np

    from tasks.models.graph import onnx_session
    from tasks.models.io import load_tokenizer

    session = onnx_session(model_path, 2)
    names = [i.name for i in session.get_inputs()]
    tokenizer = load_tokenizer(tokenizer_dir)
    batches = []
    for start in range(0, min(len(texts), 512), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="np")
        batches.append({n: encoded[n].astype(np.int64) for n in names})
    for feed in batches[:2]:
        session.run(None, feed)
    rates = []
    for _ in range(rounds):
        begin = time.perf_counter()
        for feed in batches:
            session.run(None, feed)
        rates.append(sum(len(next(iter(f.values()))) for f in batches) / (time.perf_counter() - begin))
    return statistics.median(rates)


def idle_latency_ms(url: str, texts: list[str], count: int = 200) -> float:
    """Median round trip of one request at a time (1 text): what a request costs when nothing queues."""
    import urllib.request

    times = []
    for i in range(count):
        body = json.dumps({"inputs": [texts[i % len(texts)]]}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        begin = time.perf_counter()
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()
        times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times[count // 10:])


def in_process_ms(files, texts: list[str], count: int = 300) -> dict[str, float]:
    """Median in-process cost of one text's steps: tokenizer call, ONNX Runtime run, JSON in and out."""
    import numpy as np

    from tasks.serve.serving import TextClassifier

    classifier = TextClassifier(files.onnx_model, files.tokenizer, files.card)
    steps = {"tokenizer": [], "onnx runtime": [], "json": [], "classify (batcher, all steps)": []}
    for i in range(count):
        text = texts[i % len(texts)]
        begin = time.perf_counter()
        encoded = classifier.tokenizer([text], padding=True, truncation=True, max_length=classifier.max_length,
                                       return_tensors="np")
        steps["tokenizer"].append(time.perf_counter() - begin)
        feed = {n: encoded[n].astype(np.int64) for n in classifier.input_names}
        begin = time.perf_counter()
        classifier.session.run(["logits"], feed)
        steps["onnx runtime"].append(time.perf_counter() - begin)
        begin = time.perf_counter()
        json.dumps({"predictions": classifier.classify(json.loads(json.dumps({"inputs": [text]}))["inputs"])})
        steps["classify (batcher, all steps)"].append(time.perf_counter() - begin)
        begin = time.perf_counter()
        json.dumps({"predictions": [{"label": "x", "score": 0.5}]}), json.loads(json.dumps({"inputs": [text]}))
        steps["json"].append(time.perf_counter() - begin)
    classifier.batcher.close()
    return {k: 1000 * statistics.median(v[count // 10:]) for k, v in steps.items()}


def load(url: str, pid: int, texts: list[str], work: Path, expected_rps: float):
    """The refined capacity of a served model (tasks/loadtest.run_ramp)."""
    from tasks.config.settings import LoadtestSettings
    from tasks.measure.loadtest import run_ramp

    knobs = LoadtestSettings(start_rps=max(5.0, expected_rps / 3), step_factor=1.5, step_seconds=3, max_steps=14,
                             max_seconds=60, max_requests=10**7, resolution=0.10, max_connections=256)
    return run_ramp(url, pid, texts, knobs, SLO_MS, work)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--texts", choices=["evaluation", "wikitext"], default="evaluation")
    parser.add_argument("--only", default=None, help="Comma-separated subset of models: noop,fp32,winner.")
    args = parser.parse_args()

    from flows import runtime

    runtime.configure()
    import pandas as pd

    from tasks.config.loading import load_settings
    from tasks.measure.loadtest import served_model
    from tasks.measure.timing import cpu_info
    from tasks.serve.front import ServedFiles, files_of_mlflow_model, served_front
    from tasks.serve.serving import ServingAssets, ServingLimits
    from tasks.track import DECISION_FILE, TAG_PARENT_RUN, Tracker
    from tests.registry_helpers import constant_label_graph

    settings = load_settings(args.params)
    tracker = Tracker(settings.registry)
    production = tracker.production()
    if production is None:
        print("error: no production version: run `make run` first", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="requant-served-bench-"))
    winner_files = files_of_mlflow_model(tracker.download_version(production.version, work / "winner"))
    card = json.loads(winner_files.card.read_text())
    decision = json.loads(Path(tracker.client.download_artifacts(production.tags[TAG_PARENT_RUN],
                                                                 DECISION_FILE, str(work))).read_text())
    fp32 = decision["candidates"]["fp32"]
    project = Path(args.params).resolve().parent
    fp32_graph = project / "models" / "work" / "candidates" / f"fp32-{fp32['config_hash']}" / "model.onnx"
    noop_graph = constant_label_graph(work / "noop.onnx", 0, classes=len(card["labels"]))
    models = {"noop": noop_graph, "fp32": fp32_graph, "winner": winner_files.onnx_model}
    if args.only:
        models = {k: v for k, v in models.items() if k in args.only.split(",")}

    if args.texts == "wikitext":
        lines = (Path(settings.data.train_csv).parents[1] / "wikitext-2" / "test.txt").read_text().splitlines()
        texts = [line.strip() for line in lines if len(line.strip()) > 40 and not line.strip().startswith("=")][:2000]
    else:
        texts = pd.read_csv(settings.data.output_dir / "evaluation.csv")["text"].astype(str).tolist()
    host = cpu_info()
    print(f"host: {host['cpu_model']} ({host.get('cpu_count')} cores); flags: "
          f"{'avx512_vnni' if 'avx512_vnni' in host.get('cpu_flags', '') else 'no avx512_vnni'}; "
          f"texts: {args.texts} ({len(texts)}, mean {statistics.mean(len(t) for t in texts):.0f} chars); "
          f"winner: {decision['winner']}; p95 target {SLO_MS:.0f} ms, 1 text per request")

    # An MLflow registry of its own for `mlflow models serve` (the three models, batching off and on).
    tracker_bench = Tracker(settings.registry.model_copy(update={
        "tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "artifact_location": str(work / "art")}))
    rows = []
    for name, graph in models.items():
        batched = batched_throughput(graph, winner_files.tokenizer, texts, card["max_length"])
        steps = in_process_ms(ServedFiles(graph, winner_files.tokenizer, winner_files.card), texts)
        print(f"{name}: one text in process: " + ", ".join(f"{k} {v:.2f} ms" for k, v in steps.items()), flush=True)
        rows.append((name, "batched in process (32/batch)", batched, None, None, None))
        print(f"{name}: batched {batched:.0f} texts/s", flush=True)
        for label, limits in (("mlflow models serve, no batching", ServingLimits(max_batch_size=1)),
                              ("mlflow models serve, batching", ServingLimits()),
                              ("requant front, batching", ServingLimits())):
            card_path = ServingAssets(winner_files.tokenizer, card["labels"], card["max_length"], limits).write_card(
                work / f"{name}-{len(rows)}.json")
            files = ServedFiles(graph, winner_files.tokenizer, card_path)
            if label.startswith("mlflow"):
                run_id = tracker_bench.client.create_run(tracker_bench.experiment_id()).info.run_id
                uri = tracker_bench.log_serving_model(run_id, graph, ServingAssets(
                    winner_files.tokenizer, card["labels"], card["max_length"], limits), name)
                server = served_model(uri, tracker_bench.uri, 1, 180)
            else:
                server = served_front(files)
            with server as (url, pid):
                idle = idle_latency_ms(url, texts)
                # The no-op model's batched figure says nothing about serving: its ramp starts low.
                result = load(url, pid, texts, work / f"load-{len(rows)}", batched if name != "noop" else 300)
            rows.append((name, label, result.capacity_rps, result.capacity_high_rps, result.p95_ms_at_capacity,
                         result.generator_cpu_percent))
            print(f"  {label}: one request at a time: median {idle:.1f} ms", flush=True)
            print(f"  {label}: {result.capacity_rps:.0f}-{result.capacity_high_rps or 0:.0f} requests/s "
                  f"(p95 {result.p95_ms_at_capacity or 0:.0f} ms, generator {result.generator_cpu_percent or 0:.0f}% "
                  f"of a core, {len(result.steps)} steps)", flush=True)

    print()
    print(f"{'model':<8} {'how':<36} {'held/s':>8} {'failed/s':>9} {'p95 ms':>7} {'gen cpu%':>8}")
    for name, how, held, failed, p95, cpu in rows:
        print(f"{name:<8} {how:<36} {held:>8.0f} {failed or 0:>9.0f} {p95 or 0:>7.0f} {cpu or 0:>8.0f}")
    served = {(n, h): v for n, h, v, *_ in rows}
    if "fp32" in models and "winner" in models:
        for how in ("batched in process (32/batch)", "mlflow models serve, no batching", "requant front, batching"):
            fp, win = served[("fp32", how)], served[("winner", how)]
            print(f"winner / FP32, {how}: {win / fp:.2f}x" if fp else f"winner / FP32, {how}: -")
    return 0


if __name__ == "__main__":
    sys.exit(main())
