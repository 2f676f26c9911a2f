"""The FP32 reference of a decoder language model: the graph every recipe starts from, and what
candidates are judged against (the same windows of held-out text, the same prompts).

The reference is the exported FP32 ONNX graph itself, checked once against PyTorch eager on a
window (its next-token predictions must agree everywhere): candidates and FP32 then run on the same
runtime, and the comparison measures the quantization, not the export.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.config.settings import GenerationSettings, TextDataSettings
from tasks.core.errors import RecipeError
from tasks.data.text import Document, DocumentWindows, windows
from tasks.models.graph import onnx_session
from tasks.models.hf_causal_lm import HfCausalLm, window_feed
from tasks.recipes.base import QuantizeInputs

log = logging.getLogger("requant")

GENERATOR_CARD = "generator-card.json"
EXPORT_MARK = "fp32-export.json"  # written last: its presence means the folder holds a finished export


@dataclass
class DecoderReference:
    """Everything decoder candidates are built from and compared against, computed once per run."""

    inputs: QuantizeInputs
    # Windows every candidate must run finite on: a real one and one of the full context length.
    proof_feeds: list[dict[str, np.ndarray]]
    evaluation: list[DocumentWindows]  # the documents the decision is made on
    prompt_ids: list[list[int]]  # the generation prompts, tokenized (chat template applied when asked)
    greedy_ids: list[list[int]]  # FP32's greedy continuation of each prompt
    timing_prompt: list[int]  # a prompt of generation.prompt_tokens tokens, for time to first token
    tokenizer_dir: Path
    card_path: Path  # the served generator's card (max new tokens, chat template use, end of sequence)
    eos_token_id: int | None = None
    export_check: dict = field(default_factory=dict)  # ONNX FP32 against PyTorch eager, on one window


def prepare_decoder_reference(family: HfCausalLm, evaluation: list[Document], calibration: list[Document],
                              work_dir: Path, text: TextDataSettings, generation: GenerationSettings,
                              opset: int, threads: int, output_tokens: int = 0) -> DecoderReference:
    """Export FP32 (reused when already exported here), check it against PyTorch, tokenize the
    evaluation windows and prompts, and generate FP32's greedy answers.

    `output_tokens` (the traffic's tokens per request) is a request the served card must accept.

    Raises:
        RecipeError: the exported graph disagrees with PyTorch on next-token predictions.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    fp32 = work_dir / "fp32.onnx"
    if not (work_dir / EXPORT_MARK).is_file():
        start = time.perf_counter()
        family.export_onnx(fp32, opset)
        (work_dir / EXPORT_MARK).write_text(json.dumps({"seconds": time.perf_counter() - start}))
    tokenizer = family.tokenizer
    context = min(text.context_length, family.max_positions)
    scored = windows(tokenizer, evaluation, context, text.windows_per_document, text.min_document_tokens)
    calibrating = windows(tokenizer, calibration, context, 1, text.min_document_tokens)
    if not scored:
        from tasks.core.errors import DataError

        raise DataError(f"no evaluation document has {text.min_document_tokens} tokens or more: give longer text in "
                        "text_data.evaluation_txt or lower text_data.min_document_tokens")
    session = onnx_session(fp32, threads)
    first = scored[0].windows[0]
    stress = np.resize(first, context)
    proof = [window_feed(session, first), window_feed(session, stress)]
    calibration_feeds = [window_feed(session, w) for doc in calibrating for w in doc.windows]
    check = _check_export(family, session, first)
    card_path = generator_card(family, generation, output_tokens).write(work_dir / GENERATOR_CARD)
    prompt_ids = [_prompt_ids(tokenizer, p, generation.use_chat_template) for p in generation.prompts]
    greedy = _greedy(fp32, family.tokenizer_dir(), card_path, prompt_ids, generation.max_new_tokens, family.eos_token_id)
    timing_prompt = np.resize(np.concatenate([w for doc in scored for w in doc.windows]),
                              generation.prompt_tokens).astype(int).tolist()
    return DecoderReference(
        inputs=QuantizeInputs(fp32_model=fp32, optimized_model=fp32, calibration_feeds=calibration_feeds),
        proof_feeds=proof, evaluation=scored, prompt_ids=prompt_ids, greedy_ids=greedy, timing_prompt=timing_prompt,
        tokenizer_dir=family.tokenizer_dir(), card_path=card_path, eos_token_id=family.eos_token_id,
        export_check=check)


def generator_card(family: HfCausalLm, generation: GenerationSettings, output_tokens: int = 0):
    """The served generator's card: greedy defaults, and limits that keep every request inside the
    context while taking at least `output_tokens` new tokens (the traffic's, for the served measurement)."""
    from tasks.serve.generation import GenerationLimits, GeneratorCard

    context = family.max_positions
    cap = max(generation.max_new_tokens, output_tokens, min(256, context // 4))
    return GeneratorCard(max_new_tokens=generation.max_new_tokens, max_prompt_tokens=context - cap,
                         context_length=context, use_chat_template=generation.use_chat_template,
                         eos_token_id=family.eos_token_id, limits=GenerationLimits(max_new_tokens_cap=cap)).check()


def _check_export(family: HfCausalLm, session, window: np.ndarray) -> dict:
    """ONNX FP32 against PyTorch eager on one window: next-token predictions must agree everywhere."""
    import torch

    ids = np.asarray(window, dtype=np.int64)[None, :]
    onnx_logits = session.run(["logits"], window_feed(session, ids))[0][0]
    with torch.no_grad():
        torch_logits = family.load_reference()(input_ids=torch.from_numpy(ids)).logits[0].numpy()
    agreement = float((onnx_logits.argmax(-1) == torch_logits.argmax(-1)).mean())
    largest = float(np.abs(onnx_logits - torch_logits).max())
    if agreement < 1.0:
        raise RecipeError(f"the exported FP32 graph predicts a different next token than PyTorch on "
                          f"{(1 - agreement):.1%} of a window's positions (largest logit gap {largest:.3g}): the export "
                          "is wrong for this model; report it with the model type")
    log.info("FP32 export matches PyTorch: next-token agreement 100%%, largest logit gap %.2g", largest)
    return {"tokens": int(ids.shape[1]), "next_token_agreement": agreement, "max_abs_logit_gap": largest}


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True))
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _greedy(model_path: Path, tokenizer_dir: Path, card_path: Path, prompt_ids: list[list[int]], max_new_tokens: int,
            eos_token_id: int | None) -> list[list[int]]:
    from tasks.serve.generation import TextGenerator

    generator = TextGenerator(model_path, tokenizer_dir, card_path, threads=1)
    try:
        return [generator.generate_ids([ids], max_new_tokens)[0] for ids in prompt_ids]
    finally:
        generator.close()
