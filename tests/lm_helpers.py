"""A tiny random decoder LM for tests: a 2-layer Llama with a byte-level BPE tokenizer built on the spot.

Nothing is downloaded: the tokenizer is trained on a few sentences (about 300 tokens, bos/eos/pad and a
chat template) and the model is a random `LlamaForCausalLM` with grouped-query attention (4 heads,
2 key/value heads), so the served generator's KV-cache shapes are those of real Llama-family models.
"""

from __future__ import annotations

from pathlib import Path

VOCAB_SIZE = 300
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Llama-like: a turn per message, then the assistant's prefix when a reply is asked for.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SENTENCES = [
    "where is my refund for the card payment",
    "how do I top up my account with a bank transfer",
    "the exchange rate on my card was wrong",
    "I lost my card yesterday, please block it",
    "can you tell me a short story about a quantized model",
    "the served model answers every request in a few milliseconds",
]


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE `PreTrainedTokenizerFast` (VOCAB_SIZE tokens) that prepends bos, with `chat_template`."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(SENTENCES, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=chat_template, model_max_length=256)


def tiny_llama_folder(dst: Path, chat_template: str | None = CHAT_TEMPLATE, seed: int = 0) -> Path:
    """Save a random 2-layer Llama (safetensors) and its tiny tokenizer into `dst`; returns `dst`.

    Args:
        dst: the folder to write (created if missing).
        chat_template: the tokenizer's chat template; None saves a tokenizer without one.
        seed: torch's seed for the weights (the same folder in every session).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(dst), safe_serialization=True)
    tokenizer.save_pretrained(str(dst))
    return dst


def export_decoder(folder: Path, dst: Path) -> Path:
    """Export the decoder in `folder` with Optimum ("text-generation-with-past"); the path of dst/model.onnx."""
    from optimum.exporters.onnx import main_export

    dst = Path(dst)
    main_export(str(folder), output=str(dst), task="text-generation-with-past", do_validation=False)
    return dst / "model.onnx"
