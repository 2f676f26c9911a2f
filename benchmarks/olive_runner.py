"""Run Microsoft Olive's own INT8 quantization search on an exported classifier (a benchmark peer).

This script runs in Olive's OWN virtual environment (olive-ai 0.13.0, torch 2.13.0, onnxruntime 1.32.0; see
benchmarks/README.md), never in requant's .venv, so it may import olive. It is called by
benchmarks/compare_peers.py, or by hand:

    /work/olive-venv/bin/python benchmarks/olive_runner.py --model FP32.onnx --tokenizer TOKENIZER_DIR \
        --eval-csv EVAL.csv --labels LABELS.json --out OUT_DIR [--max-iter 10] [--degradation 1.5]

What it asks Olive to do:
  * one ``OnnxQuantization`` pass with no parameters fixed, so Olive searches its own space
    (dynamic/static, int8/uint8, per-channel, reduce-range, preprocessing; for static also the
    calibration method, QOperator/QDQ and activation type);
  * an ``OnnxEvaluator`` (Olive needs the type spelt out, else ``None is not a valid ResourceType``) with one
    accuracy metric whose goal is ``percent-max-degradation`` = --degradation against the FP32 input model;
  * a joint TPE search bounded by ``max_iter`` (``max_samples`` alone did not bound it).

The data reach Olive through a user-script data config whose user script is this very file: the components
registered below load EVAL.csv, tokenize it with the model's tokenizer and pad each batch to its own longest
row. Static trials are calibrated on the first --calib-rows rows of the same CSV.

It writes OUT_DIR/olive_result.json: the chosen model's path ("model_path"), how many configurations Olive
tried ("configs_tried", failed ones included), the wall seconds ``olive.workflows.run`` took ("seconds"), Olive's
own accuracy for the chosen model ("accuracy") and for the FP32 input, and every trial's config and metric.
When no trial meets the goal Olive itself outputs no model; the runner then falls back to the most accurate
trial Olive evaluated and marks the result "olive_chose": false. It exits 1 only if no trial produced a model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from olive.data.registry import Registry

# Names under which the components below are registered in Olive's data registry.
DATASET = "requant_csv_dataset"
DATALOADER = "requant_padded_dataloader"
METRIC = "accuracy"
SUB_METRIC = "accuracy_score"


# ---------------------------------------------------------------------------------------------------------------
# Data components. Olive imports this file as the data configs' user_script (in its own process), which runs
# these decorators and registers the components by name; the main() below never calls them directly.
# ---------------------------------------------------------------------------------------------------------------

@Registry.register_dataset(DATASET)
def requant_csv_dataset(csv_path: str, tokenizer_dir: str, labels_path: str, max_length: int = 128,
                        limit: int | None = None, sort_by_length: bool = True):
    """Load (text, label) rows of a CSV as a list of (token ids, class index), tokenized but not padded.

    Tokenizing happens once per data loader here; padding is left to the collate function so that every batch
    is padded only to its own longest row (as the exported model, with dynamic sequence length, allows).
    Rows are sorted by token length when ``sort_by_length`` (evaluation only: accuracy does not depend on the
    order, and similar lengths in one batch mean little padding, hence less time on a 2-core machine).
    """
    import pandas as pd
    from transformers import AutoTokenizer

    labels = json.loads(Path(labels_path).read_text())
    index = {name: i for i, name in enumerate(labels)}
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if limit:
        frame = frame.head(int(limit))
    unknown = sorted(set(frame["label"]) - set(index))
    if unknown:
        raise ValueError(f"{csv_path}: labels not in {labels_path}: {unknown[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Same tokenizer settings as requant's own evaluation: truncation at the model card's max_length.
    ids = tokenizer(list(frame["text"]), truncation=True, max_length=int(max_length))["input_ids"]
    rows = [(np.asarray(tok, dtype=np.int64), index[label]) for tok, label in zip(ids, frame["label"])]
    if sort_by_length:
        rows.sort(key=lambda row: len(row[0]))
    return rows


@Registry.register_dataloader(DATALOADER)
def requant_padded_dataloader(dataset, batch_size: int = 32, pad_token_id: int = 0, fixed_width: bool = False):
    """Batch (token ids, class) rows into ({input_ids, attention_mask}, labels), padded per batch.

    Olive's ONNX evaluator wants (inputs dict, labels) batches; its calibration reader takes the inputs dict.
    With ``fixed_width`` every batch is padded to the longest row of the whole dataset instead: onnxruntime's
    histogram calibrators (Entropy, Percentile) stack the activations of all batches with np.asarray and fail
    ("inhomogeneous shape") when batches differ in sequence length, so calibration data need one width.
    """
    from torch.utils.data import DataLoader

    dataset_width = max(len(tokens) for tokens, _ in dataset) if fixed_width else None

    def collate(rows):
        width = dataset_width or max(len(tokens) for tokens, _ in rows)
        input_ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, (tokens, _) in enumerate(rows):
            input_ids[i, : len(tokens)] = tokens
            attention_mask[i, : len(tokens)] = 1
        labels = torch.tensor([label for _, label in rows], dtype=torch.long)
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}, labels

    return DataLoader(dataset, batch_size=int(batch_size), shuffle=False, collate_fn=collate)


# ---------------------------------------------------------------------------------------------------------------
# Workflow config
# ---------------------------------------------------------------------------------------------------------------

def data_config(name: str, args, limit: int | None, batch_size: int, pad_token_id: int, calibration: bool) -> dict:
    """An Olive data config whose components are the ones this file registers."""
    return {
        "name": name,
        "type": "DataContainer",
        "user_script": str(Path(__file__).resolve()),
        "load_dataset_config": {"type": DATASET, "params": {
            "csv_path": str(Path(args.eval_csv).resolve()), "tokenizer_dir": str(Path(args.tokenizer).resolve()),
            "labels_path": str(Path(args.labels).resolve()), "max_length": args.max_length, "limit": limit,
            "sort_by_length": not calibration}},
        "dataloader_config": {"type": DATALOADER, "params": {"batch_size": batch_size, "pad_token_id": pad_token_id,
                                                             "fixed_width": calibration}},
        # Built-in: argmax over the logits, which is what the accuracy metric compares with the labels.
        "post_process_data_config": {"type": "text_classification_post_process"},
    }


def build_config(args, num_classes: int, pad_token_id: int, out_dir: Path) -> dict:
    """The olive.workflows.run config: one OnnxQuantization pass searched by TPE under an accuracy goal."""
    return {
        "input_model": {"type": "ONNXModel", "model_path": str(Path(args.model).resolve())},
        "systems": {"local_system": {"type": "LocalSystem",
                                     "accelerators": [{"device": "cpu",
                                                       "execution_providers": ["CPUExecutionProvider"]}]}},
        "data_configs": [
            data_config("eval_data", args, None, args.batch_size, pad_token_id, calibration=False),
            # Calibration: the first --calib-rows rows of the same CSV, all padded to one width (see the dataloader).
            data_config("calib_data", args, args.calib_rows, 16, pad_token_id, calibration=True),
        ],
        "evaluators": {"accuracy_evaluator": {
            "type": "OnnxEvaluator",
            "metrics": [{
                "name": METRIC, "type": "accuracy", "data_config": "eval_data",
                "sub_types": [{"name": SUB_METRIC, "priority": 1, "higher_is_better": True,
                               "goal": {"type": "percent-max-degradation", "value": args.degradation},
                               "metric_config": {"task": "multiclass", "num_classes": num_classes}}],
            }],
        }},
        # No parameter fixed: every searchable OnnxQuantization parameter keeps Olive's own search defaults.
        # data_config is only used by static trials (dynamic ones ignore it).
        "passes": {"quantization": {"type": "OnnxQuantization", "data_config": "calib_data"}},
        "engine": {
            "search_strategy": {"execution_order": "joint", "sampler": "tpe", "max_iter": args.max_iter,
                                "sampler_config": {"seed": args.seed}},
            "evaluator": "accuracy_evaluator",
            "evaluate_input_model": True,   # the FP32 accuracy is the baseline of percent-max-degradation
            "host": "local_system", "target": "local_system",
            "cache_dir": str(out_dir / "olive_cache"), "clean_cache": True,
            "output_dir": str(out_dir / "olive_output"),
            "log_severity_level": 1,
        },
    }


def compact_pass_config(config: dict | None) -> dict | None:
    """The effective OnnxQuantization parameters of one trial.

    Drops the data config, unset values and parameters that do not apply to the trial's mode (Olive leaves
    those either as OLIVE_IGNORED_PARAM_VALUE or as the unresolved search-parameter dict).
    """
    if not config:
        return None
    return {k: v for k, v in config.items()
            if k != "data_config" and v is not None and v != "OLIVE_IGNORED_PARAM_VALUE"
            and not (isinstance(v, dict) and "olive_parameter_type" in v)}


def trial_records(footprint, input_model_id: str) -> list[dict]:
    """One record per configuration Olive ran: config, model path, Olive's metric (if evaluated), failure flag."""
    records = []
    for node in footprint.nodes.values():
        if node.model_id == input_model_id or node.from_pass is None:
            continue
        model_config = node.model_config_data or {}
        failed = bool(model_config.get("is_pruned"))
        metrics = node.metrics.value.to_json() if (node.metrics and node.metrics.value) else None
        records.append({"model_id": node.model_id, "pass_config": compact_pass_config(node.pass_run_config),
                        "model_path": None if failed else model_config.get("config", {}).get("model_path"),
                        "failed": failed, "metrics": metrics,
                        "goals_met": bool(node.metrics and node.metrics.if_goals_met),
                        "seconds": round(node.end_time - node.start_time, 2) if node.end_time else None})
    return records


def metric_value(metrics: dict | None) -> float | None:
    """The accuracy value out of Olive's metric dict ({"accuracy-accuracy_score": {"value": ...}})."""
    entry = (metrics or {}).get(f"{METRIC}-{SUB_METRIC}")
    return None if entry is None else float(entry["value"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="FP32 ONNX classifier (inputs input_ids, attention_mask).")
    parser.add_argument("--tokenizer", required=True, help="Folder of the model's Hugging Face tokenizer.")
    parser.add_argument("--eval-csv", required=True, help="CSV with columns text,label.")
    parser.add_argument("--labels", required=True, help="JSON list of class names in logit order.")
    parser.add_argument("--out", required=True, help="Output folder (olive_result.json, Olive's output and cache).")
    parser.add_argument("--max-iter", type=int, default=10, help="Bound on Olive's search steps.")
    parser.add_argument("--degradation", type=float, default=1.5, help="Max accuracy loss in percent (relative).")
    parser.add_argument("--calib-rows", type=int, default=256, help="First rows of the CSV used for calibration.")
    parser.add_argument("--max-length", type=int, default=128, help="Tokenizer truncation length.")
    parser.add_argument("--batch-size", type=int, default=32, help="Evaluation batch size.")
    parser.add_argument("--seed", type=int, default=1, help="Seed of Olive's TPE sampler.")
    args = parser.parse_args(argv)

    from olive.workflows import run as olive_run
    from transformers import AutoTokenizer

    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = json.loads(Path(args.labels).read_text())
    pad_token_id = AutoTokenizer.from_pretrained(args.tokenizer).pad_token_id or 0
    config = build_config(args, len(labels), pad_token_id, out_dir)
    (out_dir / "olive_config.json").write_text(json.dumps(config, indent=2))

    start = time.perf_counter()
    workflow = olive_run(config)
    seconds = time.perf_counter() - start

    # One accelerator (CPU EP) was configured, so the workflow output holds one footprint.
    footprint = workflow.footprint
    trials = trial_records(footprint, footprint.input_model_id)
    best = workflow.get_best_candidate()
    if best is not None:
        # Olive's own choice: the best output model among those that met the accuracy goal, saved to its
        # output_dir.
        node = footprint.nodes[best.model_id]
        chosen = {"model_id": best.model_id, "model_path": str(Path(best.model_path).resolve()),
                  "metrics": best.metrics_value, "pass_config": compact_pass_config(node.pass_run_config)}
    else:
        # Olive outputs no model when no trial meets the goal. So that a benchmark still has something to
        # compare, fall back to the most accurate trial Olive evaluated (its model stays in Olive's cache),
        # and say so: "olive_chose" is false and "goal_met" is false.
        evaluated = [t for t in trials if metric_value(t["metrics"]) is not None and t["model_path"]]
        fallback = max(evaluated, key=lambda t: metric_value(t["metrics"]), default=None)
        chosen = None if fallback is None else {
            "model_id": fallback["model_id"], "model_path": fallback["model_path"],
            "metrics": fallback["metrics"], "pass_config": fallback["pass_config"]}

    result = {
        "model_path": chosen["model_path"] if chosen else None,
        "olive_chose": best is not None,
        "goal_met": best is not None,
        "accuracy": metric_value(chosen["metrics"]) if chosen else None,
        "input_accuracy": metric_value(workflow.get_input_model_metrics()),
        "degradation_goal_percent": args.degradation,
        "configs_tried": len(trials),
        "configs_failed": sum(t["failed"] for t in trials),
        "seconds": round(seconds, 2),
        "chosen": chosen,
        "trials": trials,
        "olive_config": str(out_dir / "olive_config.json"),
    }
    (out_dir / "olive_result.json").write_text(json.dumps(result, indent=2, default=str))
    summary = ("model_path", "olive_chose", "accuracy", "input_accuracy", "configs_tried", "configs_failed", "seconds")
    print(json.dumps({key: result[key] for key in summary}, indent=2, default=str))
    print(json.dumps(chosen["pass_config"] if chosen else None))
    return 0 if chosen is not None else 1


if __name__ == "__main__":
    sys.exit(main())
