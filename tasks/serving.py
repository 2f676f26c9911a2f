"""The promoted model as a service: raw text in, label and score out (ONNX graph + tokenizer + labels).

`TextClassifier` is what the served MLflow model runs (tasks/serving_pyfunc.py wraps it for
`mlflow models serve`). It depends only on onnxruntime, transformers' tokenizer, numpy and pandas,
and reads everything from the model's own artifacts: no requant code beyond this file is needed
where it is served. It is shipped with the model (MLflow `code_paths`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

CLASSIFIER_FILE = "classifier.json"


@dataclass(frozen=True)
class ServingAssets:
    """What turns a candidate's ONNX graph into a text-in service."""

    tokenizer_dir: Path
    labels: list[str]
    max_length: int

    def write_card(self, path: Path) -> Path:
        """The labels and truncation length as one JSON file."""
        path.write_text(json.dumps({"labels": self.labels, "max_length": self.max_length}, indent=2))
        return path


class TextClassifier:
    """Tokenize, run the ONNX graph, return the top label and its softmax score per text."""

    def __init__(self, model_path: str | Path, tokenizer_dir: str | Path, card_path: str | Path, threads: int = 0) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import onnxruntime as ort
        from transformers import AutoTokenizer

        card = json.loads(Path(card_path).read_text())
        self.labels, self.max_length = list(card["labels"]), int(card["max_length"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        # The tokenizer returns exactly the graph's inputs (BERT graphs take token_type_ids, others not).
        self.tokenizer.model_input_names = self.input_names

    def predict(self, texts: Sequence[str]) -> pd.DataFrame:
        """One row per text: `label` (the class name) and `score` (its probability)."""
        texts = [str(t) for t in texts]
        if not texts:
            return pd.DataFrame({"label": pd.Series(dtype=str), "score": pd.Series(dtype=float)})
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        logits = self.session.run(["logits"], {name: encoded[name].astype(np.int64) for name in self.input_names})[0]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        best = probabilities.argmax(axis=1)
        return pd.DataFrame({"label": [self.labels[i] for i in best],
                             "score": probabilities[np.arange(len(texts)), best].astype(float)})


def texts_of(model_input) -> list[str]:
    """The texts in whatever shape MLflow hands over: a DataFrame's first column, a Series, a list, a string."""
    if isinstance(model_input, pd.DataFrame):
        return model_input.iloc[:, 0].astype(str).tolist()
    if isinstance(model_input, (pd.Series, np.ndarray)):
        return [str(t) for t in np.asarray(model_input).ravel()]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        return texts_of(next(iter(model_input.values())))
    return [str(t) for t in model_input]
