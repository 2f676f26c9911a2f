"""requant's own format: encoder + mean pooling + L2 norm + a linear head (see tasks/models/io.py)."""

from __future__ import annotations

from pathlib import Path

from tasks.models.base import ModelFamily
from tasks.models.graph import encoder_shape, optimize_graph
from tasks.models.io import (
    ENCODER_DIR,
    HEAD_FILE,
    MODEL_CARD,
    ONNX_INPUTS,
    ModelCard,
    check_safetensors,
    export_onnx,
    load_classifier,
    read_model_card,
)


class RequantHead(ModelFamily):
    """Encoder + mean pooling + a logistic-regression head, as `requant train` writes it."""

    id = "requant-head"
    detect_order = 10

    @classmethod
    def detect(cls, folder: Path) -> bool:
        return (Path(folder) / MODEL_CARD).is_file()

    def check(self) -> None:
        self.card = read_model_card(self.folder)
        if not (self.folder / ENCODER_DIR / "model.safetensors").is_file():
            from tasks.core.errors import ModelSourceError

            raise ModelSourceError(f"{self.folder / ENCODER_DIR} holds no model.safetensors: requant model folders "
                                   "store the encoder as safetensors; re-train it with `requant train`")
        # A truncated or corrupt weight file fails here, on its header, before any work starts.
        check_safetensors(self.folder / HEAD_FILE, self.folder / ENCODER_DIR / "model.safetensors")

    @property
    def labels(self) -> list[str]:
        return self.card.labels

    @property
    def max_length(self) -> int:
        return self.card.max_length

    @property
    def input_names(self) -> tuple[str, ...]:
        return ONNX_INPUTS

    def tokenizer_dir(self) -> Path:
        return self.folder / ENCODER_DIR

    def load_reference(self):
        if getattr(self, "_classifier", None) is None:
            # load_classifier reports a file that cannot be loaded in one line (ModelSourceError).
            self._classifier, _, _ = load_classifier(self.folder)
        return self._classifier

    def export_onnx(self, out_path: Path, opset: int) -> Path:
        return export_onnx(self.load_reference(), self.tokenizer, out_path, self.max_length, opset)

    def optimize(self, fp32_path: Path, out_path: Path) -> Path:
        heads, hidden = encoder_shape(self.folder / ENCODER_DIR)
        return optimize_graph(fp32_path, out_path, heads, hidden)

    def load_trainable(self):
        import types

        import torch

        classifier, _, _ = load_classifier(self.folder)  # a fresh copy: the reference stays untouched

        class WithLogits(torch.nn.Module):
            """The classifier with the tokenizer's feed as keyword arguments and a `.logits` output."""

            def __init__(self) -> None:
                super().__init__()
                self.classifier = classifier

            def forward(self, input_ids, attention_mask, **_):
                return types.SimpleNamespace(logits=self.classifier(input_ids, attention_mask))

        return WithLogits()

    def save_trained(self, model, folder: Path) -> Path:
        from safetensors.torch import save_file

        classifier = model.classifier
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        classifier.encoder.save_pretrained(str(folder / ENCODER_DIR), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder / ENCODER_DIR))
        save_file({"weight": classifier.head.weight.detach().contiguous(), "bias": classifier.head.bias.detach().contiguous()},
                  str(folder / HEAD_FILE))
        (folder / MODEL_CARD).write_text(self.card.to_json())
        return folder

    def model_card(self) -> ModelCard:
        """The card as written by `requant train`."""
        return self.card
