"""The promoted model as a service: raw text in, label and score out (ONNX graph + tokenizer + labels).

`TextClassifier` is what the served model runs, under `mlflow models serve` (tasks/serve/serving_pyfunc.py
wraps it) and under requant's own front (tasks/serve/front.py). Concurrent requests are merged
into one tokenizer call and one ONNX Runtime run (tasks/serve/batching.py), and bad input is refused
with a `BadRequest` that names what is wrong. It depends only on onnxruntime, transformers'
tokenizer and numpy, and reads everything from the model's own artifacts: this file and
tasks/serve/batching.py are shipped with the model (MLflow `code_paths`), nothing else from requant.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:  # where the model is served: batching.py ships beside this file (MLflow code_paths)
    from batching import AdaptiveBatcher, QueueFull
except ImportError:  # inside the requant project
    from tasks.serve.batching import AdaptiveBatcher, QueueFull

CLASSIFIER_FILE = "classifier.json"
log = logging.getLogger("requant.serving")
# Set to DEBUG where the model is served to log every batch's size on stderr: how much merging the
# load produces. Unset, the served model logs only warnings, like MLflow's server.
LOG_LEVEL_ENV = "REQUANT_SERVING_LOG_LEVEL"

__all__ = ["BadRequest", "CLASSIFIER_FILE", "QueueFull", "ServingAssets", "ServingLimits", "TextClassifier",
           "check_texts", "texts_of"]


class BadRequest(ValueError):
    """The request's input is not what the model takes (answered with HTTP 400 and this message)."""


@dataclass(frozen=True)
class ServingLimits:
    """How the served model batches and what it accepts (params.yaml `serving`, written into the model's card)."""

    max_batch_size: int = 16  # texts merged into one model run at most
    max_batch_tokens: int = 2048  # estimated padded tokens (texts x longest) per run at most
    max_wait_ms: float = 0.0  # how long a batch may wait for company once the worker is free
    max_queue: int = 512  # texts waiting at most; beyond it requests are shed (HTTP 503)
    max_texts_per_request: int = 256
    max_text_chars: int = 2000
    max_body_bytes: int = 1_048_576  # request body size limit of the front (HTTP 413 beyond)

    @classmethod
    def from_dict(cls, values: dict | None) -> "ServingLimits":
        """Limits from a card's `serving` section; unknown keys are ignored (a newer card, an older server)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})


@dataclass(frozen=True)
class ServingAssets:
    """What turns a candidate's ONNX graph into a text-in service."""

    tokenizer_dir: Path
    labels: list[str]
    max_length: int
    limits: ServingLimits = field(default_factory=ServingLimits)

    def write_card(self, path: Path) -> Path:
        """The labels, truncation length and serving limits as one JSON file."""
        path.write_text(json.dumps({"labels": self.labels, "max_length": self.max_length,
                                    "serving": asdict(self.limits)}, indent=2))
        return path


def check_texts(texts: Any, limits: ServingLimits) -> list[str]:
    """The request's texts, or a BadRequest that says what is wrong with them.

    Raises:
        BadRequest: not a list of strings, an empty or blank text, a text over max_text_chars, or
            more texts than max_texts_per_request.
    """
    if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
        raise BadRequest(f"inputs must be a list of strings, got {type(texts).__name__}: send "
                         '{"inputs": ["text", ...]}')
    if len(texts) > limits.max_texts_per_request:
        raise BadRequest(f"{len(texts)} texts in one request; at most {limits.max_texts_per_request} "
                         "(serving.max_texts_per_request): split the request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadRequest(f"inputs[{i}] is a {type(text).__name__}, not a string")
        if not text.strip():
            raise BadRequest(f"inputs[{i}] is empty: send non-blank text")
        if len(text) > limits.max_text_chars:
            raise BadRequest(f"inputs[{i}] has {len(text)} characters; at most {limits.max_text_chars} "
                             "(serving.max_text_chars): shorten it")
    return list(texts)


class TextClassifier:
    """Tokenize, run the ONNX graph, return the top label and its softmax score per text, batching callers."""

    def __init__(self, model_path: str | Path, tokenizer_dir: str | Path, card_path: str | Path, threads: int = 0,
                 limits: ServingLimits | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import onnxruntime as ort
        from transformers import AutoTokenizer

        _configure_logging()
        card = json.loads(Path(card_path).read_text())
        self.labels, self.max_length = list(card["labels"]), int(card["max_length"])
        self.limits = limits or ServingLimits.from_dict(card.get("serving"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # ONNX Runtime's threads spin after each run by default, waiting for the next: in a server
        # that burns the cores the event loop and tokenizer need between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        # The tokenizer returns exactly the graph's inputs (BERT graphs take token_type_ids, others not).
        self.tokenizer.model_input_names = self.input_names
        self.batcher: AdaptiveBatcher[str, dict] = AdaptiveBatcher(
            self.classify_batch, max_batch_size=self.limits.max_batch_size,
            max_batch_tokens=self.limits.max_batch_tokens, max_wait_ms=self.limits.max_wait_ms,
            max_queue=self.limits.max_queue, tokens_of=self._estimated_tokens,
            on_batch=lambda size: log.debug("batch of %d texts", size))

    def _estimated_tokens(self, text: str) -> int:
        # About 4 characters a word piece in English; only the budget uses it, never the model.
        return min(self.max_length, len(text) // 4 + 2)

    def classify_batch(self, texts: list[str]) -> list[dict[str, Any]]:
        """One tokenizer call and one ONNX Runtime run for all `texts`; a label and score per text."""
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        logits = self.session.run(["logits"], {name: encoded[name].astype(np.int64) for name in self.input_names})[0]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        best = probabilities.argmax(axis=1)
        scores = probabilities[np.arange(len(texts)), best]
        return [{"label": self.labels[i], "score": float(s)} for i, s in zip(best, scores)]

    def classify(self, texts: Any) -> list[dict[str, Any]]:
        """Check the texts, then answer them through the batcher (merged with concurrent callers).

        Raises:
            BadRequest: the input is not a list of acceptable texts.
            QueueFull: too many texts are waiting already (shed the request).
        """
        return self.batcher(check_texts(texts, self.limits))

    def predict(self, texts: Sequence[str]):
        """One row per text as a DataFrame: `label` and `score` (for callers that want pandas)."""
        import pandas as pd

        answers = self.classify([str(t) for t in texts]) if len(texts) else []
        return pd.DataFrame({"label": pd.Series([a["label"] for a in answers], dtype=object),
                             "score": pd.Series([a["score"] for a in answers], dtype=float)})


def _configure_logging() -> None:
    level = os.environ.get(LOG_LEVEL_ENV)
    if level and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(level.upper())
        log.propagate = False


def texts_of(model_input) -> Any:
    """The texts in whatever shape MLflow hands over: a DataFrame's first column, a Series or array as a
    list; a list or anything else as it is (`check_texts` then says what is wrong with it)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return model_input.iloc[:, 0].tolist()
    if isinstance(model_input, (pd.Series, np.ndarray)):
        return np.asarray(model_input).ravel().tolist()
    if isinstance(model_input, dict) and len(model_input) == 1:
        return texts_of(next(iter(model_input.values())))
    return model_input
