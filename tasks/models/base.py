"""A model family: a registered unit that knows one on-disk model format (a classifier or a decoder).

A family loads the FP32 PyTorch reference (safely), exports it to ONNX, fuses the graph, and
tokenizes text into exactly the inputs its graph takes. Everything after that (recipes,
evaluation, search, selection) only sees ONNX files, feeds and labels, so it does not care which
family a model came from. Adding a format means adding one module under tasks/models/.

Families are detected from the folder's files (`requant_model.json`, config.json `architectures`)
or named in params.yaml (`model.family`). torch and transformers are imported inside methods, so
detection stays cheap.
"""

from __future__ import annotations

import inspect
import json
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from tasks.core.errors import DataError, ModelSourceError

AUTO = "auto"


class ModelFamily(ABC):
    """One classifier format: how to load, export, optimize and tokenize it."""

    registry: ClassVar[dict[str, type["ModelFamily"]]] = {}
    id: ClassVar[str]
    # What the model does: "text-classification" (logits per class) or "text-generation" (a decoder).
    task: ClassVar[str] = "text-classification"
    # Lower is tried first by auto-detection (the most specific format first).
    detect_order: ClassVar[int] = 100

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not inspect.isabstract(cls):
            ModelFamily.registry[cls.id] = cls

    def __init__(self, folder: Path, max_length: int, allow_pickle_weights: bool = False) -> None:
        self.folder = Path(folder)
        self.requested_max_length = max_length
        self.allow_pickle_weights = allow_pickle_weights
        self._tokenizer = None

    # ------------------------------------------------------------------ what every family declares
    @classmethod
    @abstractmethod
    def detect(cls, folder: Path) -> bool:
        """Whether `folder` holds a model of this family (cheap: reads small files only)."""

    @abstractmethod
    def check(self) -> None:
        """Refuse what must not be loaded (pickles, remote code, wrong task), in one line.

        Raises:
            ModelSourceError: what is wrong with the folder and how to fix it.
        """

    @property
    @abstractmethod
    def labels(self) -> list[str]:
        """Class names in logit order."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Tokenizer truncation length used for every feed."""

    @property
    @abstractmethod
    def input_names(self) -> tuple[str, ...]:
        """Inputs of the exported ONNX graph, `input_ids` first (the tokenizer produces exactly these)."""

    @abstractmethod
    def tokenizer_dir(self) -> Path:
        """Folder holding the tokenizer files."""

    @abstractmethod
    def load_reference(self):
        """The eager FP32 PyTorch classifier: `model(**feed)` returns logits [batch, classes]."""

    @abstractmethod
    def export_onnx(self, out_path: Path, opset: int) -> Path:
        """Write one FP32 ONNX file with inputs `input_names` and output `logits`; return its path."""

    @abstractmethod
    def optimize(self, fp32_path: Path, out_path: Path) -> Path:
        """Write the graph with ONNX Runtime's transformer fusions (a copy if none applies)."""

    # ------------------------------------------------------------------ fine-tuning (optional per family)
    def load_trainable(self):
        """A fresh FP32 PyTorch copy to train: `model(**tokenizer_feed).logits` is [batch, classes].

        Raises:
            ModelSourceError: this family cannot be fine-tuned.
        """
        raise ModelSourceError(f"model family {self.id} cannot be fine-tuned (it has no trainable PyTorch form)")

    def save_trained(self, model, folder: Path) -> Path:
        """Write a model trained from `load_trainable()` as a folder of this same family; return it."""
        raise ModelSourceError(f"model family {self.id} cannot write a fine-tuned model")

    # ------------------------------------------------------------------ shared behaviour
    @property
    def tokenizer(self):
        """The fast tokenizer, offline, set to return exactly the graph's inputs."""
        if self._tokenizer is None:
            from tasks.models.io import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_dir(), self.input_names)
        return self._tokenizer

    def save_tokenizer(self, out_dir: Path) -> Path:
        """Save the tokenizer (with its input names) for the serving model."""
        shutil.rmtree(out_dir, ignore_errors=True)
        self.tokenizer.save_pretrained(str(out_dir))
        return out_dir

    def class_names_for(self, data_labels: Sequence[str]) -> list[str]:
        """The model's class names as the data spells them.

        Labels match the model's by name; numeric labels ("0", "1", ...) match class indices when
        the data does not use the names.

        Raises:
            DataError: no data label is one of the model's names or a valid class index (the wrong
                model or the wrong data); a partial mismatch is left to the data validation suite,
                which names the unknown labels.
        """
        names = self.labels
        present = sorted(set(map(str, data_labels)))
        unknown = [label for label in present if label not in names]
        if all(label.isdigit() and int(label) < len(names) for label in present) and unknown:
            return [str(i) for i in range(len(names))]
        if len(unknown) < len(present):
            # Some labels match: the data validation suite names any that do not, with its other checks.
            return names
        raise DataError(
            f"{len(unknown)} data label(s) are not the model's classes: {', '.join(unknown[:8])}"
            f"{' ...' if len(unknown) > 8 else ''} (model has {len(names)}: {', '.join(names[:8])}"
            f"{' ...' if len(names) > 8 else ''}); relabel the data or use the matching model"
        )


def _load_all() -> None:
    import tasks.models  # noqa: F401  (importing the package registers every family)


def family_ids() -> list[str]:
    """Registered family ids, for params.yaml and messages."""
    _load_all()
    return sorted(ModelFamily.registry)


def detect_family(folder: Path) -> type[ModelFamily]:
    """The family whose files are in `folder`.

    Raises:
        ModelSourceError: the folder is missing or no family recognises it.
    """
    _load_all()
    folder = Path(folder)
    if folder.is_file():
        raise ModelSourceError(f"model path {folder} is a file, not a model folder: point --model (or model.source_uri) "
                               "at the folder that holds the model")
    if not folder.is_dir():
        raise ModelSourceError(f"model folder {folder} does not exist: pass a registered model URI or an existing folder")
    for cls in sorted(ModelFamily.registry.values(), key=lambda c: c.detect_order):
        if cls.detect(folder):
            return cls
    if not (folder / "config.json").is_file() and not (folder / "MLmodel").is_file():
        # Not Hugging Face-shaped: say which parts of requant's own format are missing.
        from tasks.models.io import read_model_card

        read_model_card(folder)
    raise ModelSourceError(
        f"{folder} is not a requant model folder nor a Hugging Face classifier folder (needs requant_model.json, "
        "or config.json with its weights and tokenizer): train one with `requant train` or point --model at such a folder"
    )


def open_model(folder: Path, family: str = AUTO, max_length: int = 128, allow_pickle_weights: bool = False) -> ModelFamily:
    """Open a model folder as its family (detected, or named in params.yaml) and run its safety checks.

    Raises:
        ModelSourceError: unknown family name, unrecognised folder, or a check failed.
    """
    _load_all()
    if family == AUTO:
        cls = detect_family(folder)
    elif family in ModelFamily.registry:
        cls = ModelFamily.registry[family]
        if not Path(folder).is_dir():
            raise ModelSourceError(f"model folder {folder} does not exist: pass a registered model URI or an existing folder")
    else:
        raise ModelSourceError(f"unknown model family '{family}': set model.family to auto or one of {', '.join(family_ids())}")
    model = cls(folder, max_length=max_length, allow_pickle_weights=allow_pickle_weights)
    model.check()
    return model


def read_json(path: Path) -> dict:
    """A small JSON file, or {} if it is absent."""
    return json.loads(path.read_text()) if path.is_file() else {}


def as_int64(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds are int64, as exported graphs declare them."""
    return {name: np.asarray(value).astype(np.int64) for name, value in feed.items()}
