"""Any Hugging Face causal language model (`*ForCausalLM`: Llama, Qwen2, Mistral, Phi, GPT-2, SmolLM)
that Optimum exports to ONNX with a KV cache.

Export is Optimum's `main_export(..., task="text-generation-with-past")`: one graph taking
`input_ids`, `attention_mask`, `position_ids` and the past keys and values of every layer, and
returning `logits` and the present keys and values. Fed an empty past it scores a whole window
(perplexity); fed its own present it decodes one token at a time (generation). Optimum's export
was chosen over onnxruntime-genai's model builder because its graph is plain ONNX that every
recipe (dynamic INT8, MatMulNBits INT4) and plain ONNX Runtime run as they are, and because
requant already depends on Optimum; the builder's graph needs onnxruntime-genai to generate.

Loading is safe: safetensors only (unless model.allow_pickle_weights), never `trust_remote_code`.
The tokenizer and its chat template are kept for the served model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from tasks.core.errors import ModelSourceError
from tasks.models.base import ModelFamily, read_json

log = logging.getLogger("requant")

TASK = "text-generation-with-past"
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def is_causal_lm(config: dict) -> bool:
    """Whether a config.json names a causal language model architecture."""
    return any(str(a).endswith(CAUSAL_SUFFIXES) for a in config.get("architectures") or [])


class HfCausalLm(ModelFamily):
    """A Hugging Face decoder language model, exported with its KV cache by Optimum."""

    id = "hf-causal-lm"
    task = "text-generation"
    detect_order = 40  # before hf-sequence-classifier, which recognises any Hugging Face folder

    @classmethod
    def detect(cls, folder: Path) -> bool:
        return is_causal_lm(read_json(Path(folder) / "config.json"))

    # ------------------------------------------------------------------ safety and shape checks
    def check(self) -> None:
        self.config = read_json(self.folder / "config.json")
        if not self.config:
            raise ModelSourceError(f"{self.folder} has no config.json: point --model at a Hugging Face causal LM folder")
        architectures = self.config.get("architectures") or []
        if "auto_map" in self.config or any(not _known_class(a) for a in architectures):
            raise ModelSourceError(
                f"{self.folder}: {', '.join(architectures) or 'the model'} needs custom code from the model repository "
                "(auto_map or an architecture transformers does not ship), and requant never sets trust_remote_code: "
                "use a model whose architecture is built into transformers")
        if not is_causal_lm(self.config):
            raise ModelSourceError(f"{self.folder}: {architectures[0] if architectures else 'the model'} is not a causal "
                                   "language model: set model.family to auto or to the model's family")
        self.model_type = str(self.config.get("model_type", ""))
        if not any((self.folder / name).is_file() for name in SAFE_WEIGHTS):
            if any((self.folder / name).is_file() for name in PICKLE_WEIGHTS):
                if not self.allow_pickle_weights:
                    raise ModelSourceError(
                        f"{self.folder} holds only pickle weights (pytorch_model.bin), and unpickling a file can run "
                        "arbitrary code from it: convert the weights to safetensors, or set model.allow_pickle_weights: "
                        "true only if you trust where the file came from")
            else:
                raise ModelSourceError(f"{self.folder} holds no weights (model.safetensors): save the model with "
                                       "save_pretrained(..., safe_serialization=True)")
        if not any((self.folder / name).is_file() for name in TOKENIZER_FILES):
            raise ModelSourceError(f"{self.folder} holds no tokenizer (tokenizer.json): save the tokenizer with the model")

    def check_context(self, context_length: int) -> None:
        """Refuse a scoring window longer than the model's positions (one line, nothing moved)."""
        if context_length > self.max_positions:
            raise ModelSourceError(
                f"text_data.context_length {context_length} is over the model's {self.max_positions} positions "
                f"(config.json max_position_embeddings): set text_data.context_length to {self.max_positions} or less")

    def check_chat_template(self) -> None:
        """Refuse a tokenizer without a chat template where generation.use_chat_template asks for one."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelSourceError(
                f"{self.folder}: the tokenizer has no chat template, and generation.use_chat_template is true: "
                "save the tokenizer with its chat_template, or set generation.use_chat_template: false")

    # ------------------------------------------------------------------ what the pipeline uses
    @property
    def labels(self) -> list[str]:
        return []  # a language model has no classes

    @property
    def max_positions(self) -> int:
        return int(self.config.get("max_position_embeddings") or self.config.get("n_positions") or 2048)

    @property
    def max_length(self) -> int:
        return min(self.requested_max_length, self.max_positions)

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask")

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        return int(eos) if eos is not None else None

    def tokenizer_dir(self) -> Path:
        return self.folder

    def class_names_for(self, data_labels) -> list[str]:
        from tasks.core.errors import DataError

        raise DataError(f"{self.folder} is a causal language model, but params.yaml gives labelled `data`: give "
                        "`text_data` (held-out text) for a language model, or point model.source_uri at a classifier")

    def load_reference(self):
        """The eager FP32 PyTorch model (`model(input_ids=...).logits` is [batch, tokens, vocab])."""
        if getattr(self, "_reference", None) is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import torch
            from transformers import AutoModelForCausalLM

            self._reference = AutoModelForCausalLM.from_pretrained(
                str(self.folder), local_files_only=True, trust_remote_code=False,
                use_safetensors=None if self.allow_pickle_weights else True, dtype=torch.float32).eval()
        return self._reference

    def export_onnx(self, out_path: Path, opset: int) -> Path:
        """One FP32 graph with a KV cache (inputs: ids, mask, positions, past; outputs: logits, present)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from optimum.exporters.onnx import main_export

        out_path = Path(out_path)
        with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
            # Llama-style models need opset 18 or later for their attention export.
            main_export(str(self.folder), output=tmp, task=TASK, opset=max(opset, 18), do_validation=False,
                        local_files_only=True, trust_remote_code=False)
            exported = Path(tmp) / "model.onnx"
            _move_onnx(exported, out_path)
        return out_path

    def optimize(self, fp32_path: Path, out_path: Path) -> Path:
        """A copy: ONNX Runtime's transformer fusions are for encoders; the decoder graph is quantized as exported."""
        _move_onnx(Path(fp32_path), Path(out_path), copy=True)
        return Path(out_path)



def _known_class(name: str) -> bool:
    import transformers

    return hasattr(transformers, name)


def _move_onnx(src: Path, dst: Path, copy: bool = False) -> None:
    """Move (or copy) an ONNX file with its external-data file, if it has one, keeping the data file's name."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = [p for p in src.parent.iterdir() if p.name.startswith(src.name) and p != src]
    if data:  # external data is referenced by file name from inside the graph: rewrite it to sit beside dst
        import onnx

        model = onnx.load(str(src))
        onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.name + ".data", size_threshold=1024)
        return
    (shutil.copyfile if copy else shutil.move)(str(src), str(dst))


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past keys and values for every layer of a decoder graph (a first forward pass)."""
    feeds = {}
    for node in session.get_inputs():
        if node.name.startswith("past_key_values."):
            heads, head_dim = node.shape[1], node.shape[3]
            feeds[node.name] = np.zeros((batch, int(heads), 0, int(head_dim)), dtype=np.float32)
    return feeds


def window_feed(session, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The feed that scores whole windows [batch, tokens] in one pass (positions 0.., an empty past)."""
    ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
    batch, length = ids.shape
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "position_ids": np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy(),
            **empty_past(session, batch)}
    # Some decoder graphs (onnxruntime-genai's) derive positions from the mask and take no position_ids.
    declared = {node.name for node in session.get_inputs()}
    return {name: value for name, value in feed.items() if name in declared}


def read_source_note(folder: Path) -> dict:
    """requant_source.json beside a converted model (where its weights came from), or {}."""
    path = Path(folder) / "requant_source.json"
    return json.loads(path.read_text()) if path.is_file() else {}
