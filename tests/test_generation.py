"""The served text-generation model: greedy decoding over an Optimum-exported decoder, checked against PyTorch.

A tiny random Llama (2 layers, grouped-query attention) and a byte-level BPE tokenizer are built once
per session (tests/lm_helpers.py) and exported with Optimum; the ONNX generator must pick exactly the
tokens that `model.generate(do_sample=False)` picks, alone and in a left-padded batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.serve.generation import (
    BadCard,
    BadRequest,
    GenerationLimits,
    GeneratorCard,
    TextGenerator,
)
from tests.lm_helpers import export_decoder, tiny_llama_folder, tiny_tokenizer

PROMPTS = ["where is my refund", "how do I top up my account with a bank transfer please", "hi"]
LIMITS = GenerationLimits(max_batch_size=8, max_texts_per_request=4, max_text_chars=200, max_new_tokens_cap=32)


@dataclass(frozen=True)
class TinyDecoder:
    folder: Path  # safetensors weights and the tokenizer with its chat template
    onnx: Path
    no_template_tokenizer: Path  # the same tokenizer without a chat template


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> TinyDecoder:
    folder = tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"))
    onnx = export_decoder(folder, tmp_path_factory.mktemp("tiny-llama-onnx"))
    bare = tmp_path_factory.mktemp("tokenizer-without-template")
    tiny_tokenizer(chat_template=None).save_pretrained(str(bare))
    return TinyDecoder(folder, onnx, bare)


@pytest.fixture(scope="session")
def torch_llama(tiny_decoder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_decoder.folder)).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny_decoder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_decoder.folder))


def card(**values) -> GeneratorCard:
    values = {"max_new_tokens": 8, "max_prompt_tokens": 64, "context_length": 256, "limits": LIMITS, **values}
    return GeneratorCard(**values)


@pytest.fixture
def make_generator(tiny_decoder, tmp_path):
    made: list[TextGenerator] = []

    def make(tokenizer_dir: Path | None = None, **card_values) -> TextGenerator:
        path = card(**card_values).write(tmp_path / f"generator-{len(made)}.json")
        made.append(TextGenerator(tiny_decoder.onnx, tokenizer_dir or tiny_decoder.folder, path))
        return made[-1]

    yield make
    for generator in made:
        generator.close()


def torch_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, eos_token_id=None) -> list[list[int]]:
    """PyTorch's greedy new ids per prompt (left-padded batch), cut after the EOS like the generator's."""
    import torch

    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    extra = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **extra)
    new = out[:, longest:].tolist()
    stop = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
    return [row[:row.index(stop) + 1] if stop in row else row for row in new]


def prompt_ids(tokenizer, texts=PROMPTS) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in texts]


def test_generate_ids_equals_pytorch_greedy_for_one_prompt(make_generator, torch_llama, tokenizer):
    generator = make_generator()
    for prompt in prompt_ids(tokenizer):
        assert generator.generate_ids([prompt], 20) == torch_greedy(torch_llama, tokenizer, [prompt], 20)


def test_generate_ids_equals_pytorch_greedy_for_a_left_padded_batch(make_generator, torch_llama, tokenizer):
    generator = make_generator()
    prompts = prompt_ids(tokenizer)
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ: padding is exercised
    batched = generator.generate_ids(prompts, 20)
    assert batched == torch_greedy(torch_llama, tokenizer, prompts, 20)
    assert batched == [generator.generate_ids([p], 20)[0] for p in prompts]  # padding changes no answer
    assert all(len(ids) == 20 for ids in batched)


def test_generate_ids_stops_each_sequence_at_its_eos(make_generator, torch_llama, tokenizer):
    generator = make_generator()
    prompts = prompt_ids(tokenizer)
    free = generator.generate_ids(prompts, 12, eos_token_id=[])
    eos = free[0][3]  # a token the first prompt produces early: take it as the EOS
    stopped = generator.generate_ids(prompts, 12, eos_token_id=eos)
    assert stopped[0] == free[0][:free[0].index(eos) + 1]
    for free_row, row in zip(free, stopped):  # the others go on to their own EOS or the budget
        assert row == (free_row[:free_row.index(eos) + 1] if eos in free_row else free_row)
    assert stopped == torch_greedy(torch_llama, tokenizer, prompts, 12, eos_token_id=eos)


def test_generate_ids_gives_each_prompt_its_own_budget(make_generator, tokenizer):
    generator = make_generator()
    prompts = prompt_ids(tokenizer)
    free = generator.generate_ids(prompts, 9, eos_token_id=[])
    assert generator.generate_ids(prompts, [2, 9, 0], eos_token_id=[]) == [free[0][:2], free[1], []]


def test_generate_timed_reports_time_to_first_token_and_decode_speed(make_generator, tokenizer):
    generator = make_generator()
    prompts = prompt_ids(tokenizer)
    run = generator.generate_timed(prompts, 6, eos_token_id=[])
    timing = run.timing
    assert [len(ids) for ids in run.ids] == [6, 6, 6]
    assert timing.batch_size == 3 and timing.prompt_tokens == max(len(p) for p in prompts)
    assert timing.ttft_s > 0 and len(timing.decode_steps_s) == 5 and all(s > 0 for s in timing.decode_steps_s)
    assert timing.decode_tokens == 3 * 5  # the first token of each sequence is the prefill's
    assert timing.decode_tokens_per_s == pytest.approx(15 / timing.decode_s)
    assert timing.mean_decode_step_s == pytest.approx(timing.decode_s / 5)
    assert timing.total_s == pytest.approx(timing.prefill_s + timing.decode_s)


def test_generate_applies_the_chat_template_when_the_card_asks(make_generator, tokenizer):
    chat = make_generator(use_chat_template=True)
    plain = make_generator(use_chat_template=False)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    assert chat.encode(PROMPTS[0]) == list(expected)
    assert tokenizer.decode(expected).startswith("<s><|user|>\nwhere is my refund</s>\n<|assistant|>")
    assert plain.encode(PROMPTS[0]) == tokenizer(PROMPTS[0])["input_ids"]
    for generator in (chat, plain):
        ids = generator.generate_ids([generator.encode(PROMPTS[0])], 5)[0]
        assert generator.generate(PROMPTS[:1], 5) == [tokenizer.decode(ids, skip_special_tokens=True)]
    assert chat.generate(PROMPTS[:1], 5) != plain.generate(PROMPTS[:1], 5)


def test_generator_refuses_a_card_that_asks_for_a_missing_chat_template(make_generator, tiny_decoder):
    with pytest.raises(BadCard, match="use_chat_template: true but the tokenizer .* has no chat_template"):
        make_generator(tokenizer_dir=tiny_decoder.no_template_tokenizer, use_chat_template=True)
    plain = make_generator(tokenizer_dir=tiny_decoder.no_template_tokenizer, use_chat_template=False)
    assert len(plain.generate(["hi"], 3)) == 1


@pytest.mark.parametrize(("texts", "max_new_tokens", "message"), [
    ("where is my refund", None, "inputs must be a list of strings"),
    ({"inputs": ["hi"]}, None, "inputs must be a list of strings"),
    ([], None, "inputs is empty"),
    (["hi", 3], None, r"inputs\[1\] is a int"),
    (["hi", "  "], None, r"inputs\[1\] is empty"),
    (["x" * 201], None, "201 characters; at most 200"),
    (["hi"] * 5, None, "5 prompts in one request; at most 4"),
    (["hi"], 0, "max_new_tokens is 0; it must lie in 1..32"),
    (["hi"], 33, "max_new_tokens is 33"),
    (["hi"], "8", "max_new_tokens must be a whole number"),
    (["hi"], True, "max_new_tokens must be a whole number"),
    (["hi"], 2.5, "max_new_tokens must be a whole number"),
    (["Q" * 100], None, r"inputs\[0\] has \d+ tokens; at most 64 \(max_prompt_tokens\)"),
])
def test_generate_refuses_bad_input_with_a_one_line_bad_request(make_generator, texts, max_new_tokens, message):
    generator = make_generator()
    with pytest.raises(BadRequest, match=message) as refused:
        generator.generate(texts, max_new_tokens)
    assert "\n" not in str(refused.value)
    assert generator.batcher.stats.batches == 0  # refused before anything ran


def test_generate_accepts_a_whole_float_max_new_tokens(make_generator, tokenizer):
    generator = make_generator()
    assert generator.generate(["hi"], 4.0) == generator.generate(["hi"], 4)


def test_ignore_eos_generates_the_whole_budget_past_an_eos(make_generator):
    # The card's EOS is the token the model answers first, so an ordinary request stops after one token.
    probe = make_generator()
    first = probe.generate_ids([probe.encode("hi")], 1, eos_token_id=[])[0][0]
    generator = make_generator(eos_token_id=first)
    stopped = generator.submit(["hi"], 6).result(60)
    whole = generator.submit(["hi"], 6, ignore_eos=True).result(60)
    assert stopped == [[first]] and len(whole[0]) == 6 and whole[0][0] == first
    # What the front's /stats reports: prompts answered and the tokens generated for them.
    assert generator.prompts_answered == 2 and generator.generated_tokens == 7
    with pytest.raises(BadRequest, match="ignore_eos must be true or false"):
        generator.generate(["hi"], 6, ignore_eos="yes")


def test_card_round_trips_and_refuses_budgets_over_the_context(tmp_path):
    written = card(use_chat_template=True, eos_token_id=[2, 5]).write(tmp_path / "generator.json")
    assert GeneratorCard.read(written) == card(use_chat_template=True, eos_token_id=[2, 5])
    with pytest.raises(BadCard, match=r"max_prompt_tokens \(240\) \+ serving.max_new_tokens_cap \(32\) exceeds"):
        card(max_prompt_tokens=240).check()
    with pytest.raises(BadCard, match="max_new_tokens is 40"):
        card(max_new_tokens=40).check()


def test_concurrent_callers_each_get_their_own_answer_in_merged_batches(make_generator):
    # A batch waits up to 200 ms for company, so threads released together are merged deterministically.
    generator = make_generator(max_new_tokens=6, limits=GenerationLimits(max_batch_size=8, max_wait_ms=200,
                                                                                 max_new_tokens_cap=32))
    texts = [f"where is my refund number {i}" if i % 2 else f"top up {i} please" for i in range(20)]
    alone = [generator.generate_ids([generator.encode(t)], 6)[0] for t in texts]
    expected = [generator.tokenizer.decode(ids, skip_special_tokens=True) for ids in alone]
    answers: list = [None] * len(texts)
    start = threading.Barrier(len(texts))

    def ask(i: int) -> None:
        start.wait()
        answers[i] = generator.generate([texts[i]])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == [[e] for e in expected]
    assert len(set(expected)) > 1  # the answers differ, so a mix-up would show
    stats = generator.batcher.stats
    assert stats.items == len(texts) and stats.largest > 1 and stats.batches < len(texts)


def test_logged_pyfunc_generates_text_from_the_mlflow_model(tiny_decoder, tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks.serve import batching, generation

    served_card = card(use_chat_template=True)
    card_path = served_card.write(tmp_path / "generator.json")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("generation", artifact_location=str(tmp_path / "artifacts"))
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pyfunc.log_model(
                name="generator", python_model=str(Path(generation.__file__).with_name("generation_pyfunc.py")),
                code_paths=[generation.__file__, batching.__file__],
                artifacts={"onnx_model": str(tiny_decoder.onnx), "tokenizer": str(tiny_decoder.folder),
                           "generator_card": str(card_path)},
                # An example with params, so the signature declares max_new_tokens and MLflow passes it on;
                # MLflow makes the example's value the default, so it is the card's.
                input_example=(["where is my refund"], {"max_new_tokens": served_card.max_new_tokens}),
                pip_requirements=["onnxruntime", "transformers", "tokenizers", "numpy"])
        served = mlflow.pyfunc.load_model(info.model_uri)
    finally:
        # set_tracking_uri exported MLFLOW_TRACKING_URI (for subprocesses); None unsets both, else every
        # later test's tracker and `requant` subprocess would use this test's store.
        mlflow.set_tracking_uri(None)
    direct = TextGenerator(tiny_decoder.onnx, tiny_decoder.folder, card_path)
    try:
        assert served.predict(PROMPTS) == direct.generate(PROMPTS)
        assert served.predict(PROMPTS[:1], params={"max_new_tokens": 3}) == direct.generate(PROMPTS[:1], 3)
        assert direct.generate(PROMPTS[:1], 3) != direct.generate(PROMPTS[:1], 8)
    finally:
        direct.close()
    with pytest.raises(MlflowException, match="inputs\\[0\\] is empty") as refused:
        served.predict(["  "])
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
