"""Hugging Face models that must be refused, through the real `requant` command: one clear line,
exit 2, and the production alias never set. Each folder is what a team could really hand over."""

import json

import numpy as np
import pytest

from tests.cli_helpers import assert_one_clear_error, requant
from tests.conftest import TINY_LABELS, tiny_hf_classifier, tiny_project


def _save_tiny(folder, model, tokenizer_dir, safe=True):
    from transformers import AutoTokenizer

    model.save_pretrained(str(folder), safe_serialization=safe)
    AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True).save_pretrained(str(folder))
    return folder


def pickle_only(folder, minilm_dir):
    """A BERT classifier saved as pytorch_model.bin (a pickle), no safetensors."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, num_labels=len(TINY_LABELS))
    return _save_tiny(folder, BertForSequenceClassification(config), minilm_dir, safe=False)


def remote_code(folder, minilm_dir):
    """A classifier whose config points at custom modelling code (auto_map), as hub models with custom heads do."""
    tiny_hf_classifier(folder, "bert", minilm_dir)
    config = json.loads((folder / "config.json").read_text())
    config.update({"architectures": ["FancyBertForSequenceClassification"],
                   "auto_map": {"AutoModelForSequenceClassification": "modeling_fancy.FancyBertForSequenceClassification"}})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_fancy.py").write_text("raise SystemExit('remote code ran')\n")
    return folder


def token_classifier(folder, minilm_dir):
    from transformers import BertConfig, BertForTokenClassification

    return _save_tiny(folder, BertForTokenClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)), minilm_dir)


def causal_lm(folder, minilm_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    return _save_tiny(folder, GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=1, n_head=4, n_positions=128)),
                      minilm_dir)


def unexportable(folder, minilm_dir):
    """T5ForSequenceClassification exists in transformers, but Optimum exports T5 only for generation."""
    from transformers import T5Config, T5ForSequenceClassification

    return _save_tiny(folder, T5ForSequenceClassification(T5Config(
        vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
        num_labels=len(TINY_LABELS))), minilm_dir)


def no_tokenizer(folder, minilm_dir):
    tiny_hf_classifier(folder, "bert", minilm_dir)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    return folder


def no_production(project) -> bool:
    """Whether the serving model's production alias is still unset (what `requant status` reports)."""
    from tasks.config.loading import load_settings
    from tasks.track import Tracker

    return Tracker(load_settings(project / "params.yaml").registry).production() is None


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_bert_classifier):
    return tiny_project(tmp_path_factory.mktemp("bad-hf"), tiny_bert_classifier)


@pytest.mark.parametrize("make, fragments", [
    (pickle_only, ["pickle", "model.allow_pickle_weights: true", "arbitrary code"]),
    (remote_code, ["trust_remote_code", "FancyBertForSequenceClassification"]),
    (token_classifier, ["token-classification", "BertForTokenClassification"]),
    (causal_lm, ["causal language model", "GPT2LMHeadModel"]),
    (unexportable, ["Optimum cannot export", "T5ForSequenceClassification"]),
    (no_tokenizer, ["no tokenizer"]),
], ids=["pickle-only", "remote-code", "token-classifier", "causal-lm", "unexportable", "no-tokenizer"])
def test_cli_refuses_hf_model(project, minilm_dir, tmp_path, make, fragments):
    folder = make(tmp_path / "model", minilm_dir)
    done, errors = requant("run", "--params", str(project / "params.yaml"), "--model", str(folder))
    assert_one_clear_error(done, errors, *fragments)
    assert "remote code ran" not in done.stderr + done.stdout
    print(errors[0])
    assert no_production(project)


def test_cli_refuses_labels_that_are_not_the_models(project, minilm_dir, tmp_path, monkeypatch):
    # This case needs the data, so the flow (and Prefect's temporary server) starts: give it time on a busy host.
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    folder = tiny_hf_classifier(tmp_path / "model", "bert", minilm_dir, labels=["w", "x", "y", "z"])
    done, errors = requant("run", "--params", str(project / "params.yaml"), "--model", str(folder))
    assert_one_clear_error(done, errors, "not the model's classes", "card_lost", "model has 4: w, x, y, z")
    print(errors[0])
    assert no_production(project)


def test_pickle_weights_load_when_allowed_and_numeric_labels_match_class_indices(minilm_dir, tmp_path):
    from tasks.models.base import open_model

    folder = pickle_only(tmp_path / "model", minilm_dir)
    model = open_model(folder, allow_pickle_weights=True)
    assert model.class_names_for(["0", "3", "1"]) == ["0", "1", "2", "3"]
    feed = {k: __import__("torch").from_numpy(v) for k, v in model.tokenizer(["hi there"], return_tensors="np").items()}
    assert np.isfinite(model.load_reference()(**feed).detach().numpy()).all()
