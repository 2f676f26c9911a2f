"""Any Hugging Face `AutoModelForSequenceClassification` that Optimum can export to ONNX.

Two layouts are recognised:

    a Hugging Face folder          config.json, model.safetensors, tokenizer files side by side
    an MLflow transformers model   MLmodel (flavor `transformers`), model/ (config + weights),
                                   components/tokenizer/ (as `mlflow.transformers.log_model` writes it)

Export is Optimum's (`main_export(..., task="text-classification")`); the graph is then fused
with ONNX Runtime's transformer optimizer where one exists for the model type. Loading is safe by
default: safetensors only, never `trust_remote_code`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import yaml

from tasks.core.errors import ModelSourceError
from tasks.models.base import ModelFamily, read_json

log = logging.getLogger("requant")

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "spm.model")
# ONNX Runtime's fusion optimizer per Hugging Face model type (the encoder-only types share BERT's
# fusions; others are exported and quantized without fusion).
ORT_OPTIMIZER_TYPES = {t: "bert" for t in ("bert", "distilbert", "roberta", "xlm-roberta", "camembert", "electra",
                                          "albert", "mpnet", "deberta", "deberta-v2", "megatron-bert")}
# Position ids start after the padding index in RoBERTa-style models, so two positions are unusable.
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}
TASK = "text-classification"
OTHER_HEADS = {
    "ForTokenClassification": "a token-classification model",
    "ForCausalLM": "a causal language model",
    "LMHeadModel": "a causal language model",
    "ForMaskedLM": "a masked language model",
    "ForQuestionAnswering": "a question-answering model",
    "ForConditionalGeneration": "a sequence-to-sequence model",
    "ForMultipleChoice": "a multiple-choice model",
}


def _layout(folder: Path) -> tuple[Path, Path] | None:
    """(weights and config folder, tokenizer folder), or None if this is no Hugging Face layout."""
    folder = Path(folder)
    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
        flavor = flavors.get("transformers")
        if flavor is None:
            return None
        model_dir = folder / str(flavor.get("model_binary", "model"))
        return model_dir, folder / "components" / "tokenizer"
    if (folder / "config.json").is_file():
        return folder, folder
    return None


class HfSequenceClassifier(ModelFamily):
    """A Hugging Face sequence classifier, exported with Optimum and fused with ONNX Runtime."""

    id = "hf-sequence-classifier"
    detect_order = 50

    @classmethod
    def detect(cls, folder: Path) -> bool:
        return _layout(folder) is not None

    # ------------------------------------------------------------------ safety and shape checks
    def check(self) -> None:
        layout = _layout(self.folder)
        if layout is None:
            raise ModelSourceError(f"{self.folder} holds neither config.json nor an MLflow transformers model: "
                                   "point --model at a Hugging Face classifier folder or a transformers-flavor model version")
        self.model_dir, self._tokenizer_dir = layout
        where = self.model_dir
        self.config = read_json(where / "config.json")
        if not self.config:
            raise ModelSourceError(f"{where} has no config.json (an MLflow model logged with save_pretrained=False holds "
                                   "no weights): log the model with its weights or pass a complete folder")
        architectures = self.config.get("architectures") or []
        if "auto_map" in self.config or any(not self._known_class(a) for a in architectures):
            raise ModelSourceError(
                f"{where}: {', '.join(architectures) or 'the model'} needs custom code from the model repository "
                "(auto_map or an architecture transformers does not ship), and requant never sets trust_remote_code: "
                "use a model whose architecture is built into transformers")
        arch = architectures[0] if architectures else ""
        if not arch.endswith("ForSequenceClassification"):
            kind = next((label for suffix, label in OTHER_HEADS.items() if arch.endswith(suffix)), "not a sequence classifier")
            raise ModelSourceError(
                f"{where}: {arch or 'config.json names no architecture, so it'} is {kind}, not a text classifier: "
                "requant requantizes AutoModelForSequenceClassification models; register a sequence classifier")
        self.model_type = str(self.config.get("model_type", ""))
        self._onnx_config()  # refuses an architecture Optimum cannot export, before any weights are read
        if not any((where / name).is_file() for name in SAFE_WEIGHTS):
            if any((where / name).is_file() for name in PICKLE_WEIGHTS):
                if not self.allow_pickle_weights:
                    raise ModelSourceError(
                        f"{where} holds only pickle weights (pytorch_model.bin), and unpickling a file can run arbitrary "
                        "code from it: convert the weights to safetensors, or set model.allow_pickle_weights: true in "
                        "params.yaml only if you trust where the file came from")
                log.warning("loading pickle weights from %s (model.allow_pickle_weights is true)", where)
            else:
                raise ModelSourceError(f"{where} holds no weights (model.safetensors): save the model with "
                                       "save_pretrained(..., safe_serialization=True)")
        if not any((self._tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
            raise ModelSourceError(
                f"{self._tokenizer_dir} holds no tokenizer (tokenizer.json or vocab files): save the tokenizer with the model "
                "(tokenizer.save_pretrained(folder)) or log the whole pipeline with mlflow.transformers.log_model")

    @staticmethod
    def _known_class(name: str) -> bool:
        import transformers

        return hasattr(transformers, name)

    def _onnx_config(self):
        """Optimum's export config for this model type and the text-classification task."""
        if getattr(self, "_export_config", None) is None:
            import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the exportable model types)
            from optimum.exporters.tasks import TasksManager
            from transformers import AutoConfig

            try:
                constructor = TasksManager.get_exporter_config_constructor(
                    exporter="onnx", model_type=self.model_type, task=TASK, library_name="transformers")
            except (KeyError, ValueError) as exc:
                raise ModelSourceError(
                    f"{self.model_dir}: Optimum cannot export {self.config['architectures'][0]} (model type "
                    f"'{self.model_type}') for {TASK}: use an architecture Optimum exports (BERT, DistilBERT, RoBERTa, "
                    "ELECTRA, DeBERTa-v2, ...)") from exc
            config = AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True, trust_remote_code=False)
            self._export_config = constructor(config, task=TASK)
        return self._export_config

    # ------------------------------------------------------------------ what the pipeline uses
    @property
    def labels(self) -> list[str]:
        id2label = self.config.get("id2label") or {}
        count = len(id2label) or int(self.config.get("num_labels", 2))
        return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count)]

    @property
    def max_length(self) -> int:
        limit = self.config.get("max_position_embeddings")
        if limit is None:
            return self.requested_max_length
        return min(self.requested_max_length, int(limit) - POSITION_OFFSET.get(self.model_type, 0))

    @property
    def input_names(self) -> tuple[str, ...]:
        names = list(self._onnx_config().inputs)
        return tuple(sorted(names, key=lambda n: n != "input_ids"))

    def tokenizer_dir(self) -> Path:
        return self._tokenizer_dir

    def load_reference(self):
        if getattr(self, "_reference", None) is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import torch
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(
                str(self.model_dir), local_files_only=True, trust_remote_code=False,
                use_safetensors=None if self.allow_pickle_weights else True, dtype=torch.float32)

            class Logits(torch.nn.Module):
                """The classifier with the tokenizer's feed as keyword arguments, returning logits only."""

                def __init__(self) -> None:
                    super().__init__()
                    self.model = model

                def forward(self, **feed):
                    return self.model(**feed).logits

            self._reference = Logits().eval()
        return self._reference

    def load_trainable(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForSequenceClassification

        # A fresh copy (its output already has `.logits`); the reference stays untouched.
        return AutoModelForSequenceClassification.from_pretrained(
            str(self.model_dir), local_files_only=True, trust_remote_code=False,
            use_safetensors=None if self.allow_pickle_weights else True, dtype=torch.float32)

    def save_trained(self, model, folder: Path) -> Path:
        # A plain Hugging Face folder (config, safetensors, tokenizer), whatever layout the source had.
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(folder), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))
        return folder

    def export_onnx(self, out_path: Path, opset: int) -> Path:
        from optimum.exporters.onnx import main_export

        from tasks.models.graph import check_external_data

        out_path.parent.mkdir(parents=True, exist_ok=True)
        # check() has refused pickle-only folders unless allowed, so Optimum's own loading is safe here.
        # It writes config and tokenizer copies beside the graph; only the graph is kept.
        with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
            main_export(str(self.model_dir), output=tmp, task=TASK, opset=opset, device="cpu", local_files_only=True,
                        trust_remote_code=False, do_validation=False, library_name="transformers")
            exported = Path(tmp) / "model.onnx"
            check_external_data(exported)
            for data_file in Path(tmp).glob("model.onnx*"):
                shutil.move(str(data_file), str(out_path.parent / data_file.name.replace("model.onnx", out_path.name)))
        return out_path

    def optimize(self, fp32_path: Path, out_path: Path) -> Path:
        from tasks.models.graph import optimize_graph

        model_type = ORT_OPTIMIZER_TYPES.get(self.model_type)
        if model_type is not None:
            heads = int(self.config.get("num_attention_heads") or self.config.get("n_heads") or 0)
            hidden = int(self.config.get("hidden_size") or self.config.get("dim") or 0)
            try:
                optimize_graph(fp32_path, out_path, heads, hidden, model_type=model_type)
                if self._same_logits(fp32_path, out_path):
                    return out_path
                log.warning("fused %s graph disagrees with the exported one; using the exported graph", self.model_type)
            except Exception as exc:  # the optimizer may not know this graph's patterns
                log.warning("ONNX Runtime could not fuse the %s graph (%s); using the exported graph", self.model_type, exc)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fp32_path, out_path)
        return out_path

    def _same_logits(self, a: Path, b: Path) -> bool:
        from tasks.models.graph import onnx_session
        from tasks.models.io import tokenize

        feed = tokenize(self.tokenizer, ["a short example", "a somewhat longer example sentence to compare"], self.max_length)
        left, right = (onnx_session(p, 1).run(["logits"], feed)[0] for p in (a, b))
        return bool(np.isfinite(right).all() and np.allclose(left, right, atol=1e-3, rtol=1e-3))
