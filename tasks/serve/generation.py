"""The served decoder LM: prompts in, greedy continuations out (ONNX decoder with KV cache + tokenizer + card).

`TextGenerator` runs a decoder exported by Optimum with task "text-generation-with-past": the graph
takes `input_ids`, `attention_mask`, `position_ids` and the cache of earlier tokens
(`past_key_values.{i}.key/value`, [batch, kv_heads, past_len, head_dim]) and returns `logits` and the
grown cache (`present.{i}.key/value`). One run over the whole prompt (prefill) gives the first new
token; each later run feeds one token per sequence and the cache (decode).

Prompts of different lengths run as one batch with LEFT padding: pad tokens before the prompt carry
attention mask 0, positions count real tokens only (cumsum(mask) - 1), so every sequence's last
column is its newest token and a decode step appends one column for all. Each sequence stops at its
own EOS or token budget; the batch ends when all have.

Concurrent callers (the threads of `mlflow models serve`, requant's front) are merged by
`AdaptiveBatcher` (batching.py): a batch runs prefill and decode for all its prompts together and
answers each caller its own texts. `generate_timed` reports time to first token and decode speed,
measured around the model runs, for requant's benchmarks.

Like serving.py, this file ships with the logged model (MLflow `code_paths`) and imports nothing of
requant: only numpy, onnxruntime, transformers' tokenizer and batching.py beside it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

try:  # where the model is served: batching.py ships beside this file (MLflow code_paths)
    from batching import AdaptiveBatcher, QueueFull
except ImportError:  # inside the requant project
    from tasks.serve.batching import AdaptiveBatcher, QueueFull

GENERATOR_CARD_FILE = "generator.json"
log = logging.getLogger("requant.generation")
# As in serving.py: set to DEBUG where the model is served to log every batch's size on stderr.
LOG_LEVEL_ENV = "REQUANT_SERVING_LOG_LEVEL"
_ONNX_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}

__all__ = [
    "GENERATOR_CARD_FILE",
    "BadCard",
    "BadRequest",
    "Generation",
    "GenerationLimits",
    "GenerationTiming",
    "GeneratorCard",
    "KVCacheLayout",
    "QueueFull",
    "TextGenerator",
    "check_max_new_tokens",
    "check_prompts",
]


class BadRequest(ValueError):
    """The request is not what the model takes (answered with HTTP 400 and this message)."""


class BadCard(ValueError):
    """The card does not fit the graph or tokenizer beside it: the model cannot be served (raised at load time)."""


@dataclass(frozen=True)
class GenerationLimits:
    """How the served generator batches and what a request may ask (the card's `serving` section)."""

    max_batch_size: int = 8  # prompts generated together at most
    max_batch_tokens: int | None = None  # prompts x (longest prompt + its new tokens) per batch at most; None: no budget
    max_wait_ms: float = 0.0  # how long a batch may wait for company once the worker is free
    max_queue: int = 256  # prompts waiting at most; beyond it requests are shed (HTTP 503)
    max_texts_per_request: int = 16
    max_text_chars: int = 4000
    max_new_tokens_cap: int = 256  # a request's max_new_tokens at most

    @classmethod
    def from_dict(cls, values: dict | None) -> GenerationLimits:
        """Limits from a card's `serving` section; unknown keys are ignored (a newer card, an older server)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})


@dataclass(frozen=True)
class GeneratorCard:
    """What turns a decoder graph and its tokenizer into a text-in, text-out service (written as JSON).

    The card keeps every request inside the model's context: a prompt of at most `max_prompt_tokens`
    plus at most `limits.max_new_tokens_cap` new tokens must fit `context_length` (`check` says so).
    """

    max_new_tokens: int = 64  # new tokens per prompt when the request does not say
    max_prompt_tokens: int = 1024  # a longer prompt is refused (BadRequest), never truncated
    context_length: int = 2048  # the model's positions (config.max_position_embeddings)
    use_chat_template: bool = False  # wrap each text as a user turn with the tokenizer's chat template
    eos_token_id: int | list[int] | None = None  # the ids that end a sequence; None: the tokenizer's eos
    limits: GenerationLimits = field(default_factory=GenerationLimits)

    def check(self) -> GeneratorCard:
        """The card itself, or BadCard naming the inconsistency."""
        cap = self.limits.max_new_tokens_cap
        if not 1 <= self.max_new_tokens <= cap:
            raise BadCard(f"max_new_tokens is {self.max_new_tokens}; it must lie in 1..{cap} (serving.max_new_tokens_cap)")
        if self.max_prompt_tokens < 1 or self.max_prompt_tokens + cap > self.context_length:
            raise BadCard(f"max_prompt_tokens ({self.max_prompt_tokens}) + serving.max_new_tokens_cap ({cap}) "
                          f"exceeds context_length ({self.context_length})")
        return self

    def write(self, path: str | Path) -> Path:
        """The card as one JSON file: the generation defaults at the top, the limits under `serving`."""
        values = asdict(self)
        values["serving"] = values.pop("limits")
        Path(path).write_text(json.dumps(values, indent=2))
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> GeneratorCard:
        """The card in `path` (unknown keys ignored), checked."""
        values = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)} - {"limits"}
        card = cls(**{k: v for k, v in values.items() if k in known},
                   limits=GenerationLimits.from_dict(values.get("serving")))
        return card.check()


@dataclass(frozen=True)
class KVCacheLayout:
    """The decoder graph's cache, read from its inputs: layers, key/value heads, head size, dtype."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: type
    has_position_ids: bool
    has_cache_branch: bool  # older Optimum "merged" decoders take a `use_cache_branch` flag

    @classmethod
    def of_session(cls, session) -> KVCacheLayout:
        """The layout of an Optimum text-generation-with-past graph.

        Raises:
            BadCard: the graph takes no `past_key_values.{i}.key/value` inputs of shape
                [batch, kv_heads, past_len, head_dim] with fixed heads and head size.
        """
        inputs = {i.name: i for i in session.get_inputs()}
        keys = sorted(int(name.split(".")[1]) for name in inputs
                      if name.startswith("past_key_values.") and name.endswith(".key"))
        if not keys or keys != list(range(len(keys))) or "input_ids" not in inputs or "attention_mask" not in inputs:
            raise BadCard("the ONNX graph is not a decoder with KV cache: export it with Optimum, "
                          'task="text-generation-with-past" (inputs input_ids, attention_mask, past_key_values.{i}.key/value)')
        first = inputs["past_key_values.0.key"]
        shape = first.shape
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise BadCard(f"past_key_values.0.key has shape {shape}; expected [batch, kv_heads, past_len, head_dim]")
        if first.type not in _ONNX_FLOATS:
            raise BadCard(f"past_key_values.0.key is a {first.type}; expected a float tensor")
        return cls(num_layers=len(keys), num_kv_heads=shape[1], head_dim=shape[3], dtype=_ONNX_FLOATS[first.type],
                   has_position_ids="position_ids" in inputs, has_cache_branch="use_cache_branch" in inputs)

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """The past of a prefill: every layer's keys and values with past_len 0."""
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), dtype=self.dtype)
        return {f"past_key_values.{i}.{kind}": empty for i in range(self.num_layers) for kind in ("key", "value")}


@dataclass
class GenerationTiming:
    """How long one batch's generation took, measured around the model runs (tokenizing excluded).

    A decode step produces one token for every sequence still generating, so at batch 1
    `decode_tokens_per_s` is one sequence's speed, and at batch n the batch's throughput while each
    sequence sees `mean_decode_step_s` between its tokens.
    """

    batch_size: int
    prompt_tokens: int  # the prefill's padded length (the longest prompt)
    prefill_s: float  # time to first token: the prefill run and the pick of every sequence's first token
    decode_steps_s: list[float] = field(default_factory=list)  # each later step: feeds, run, next tokens
    decode_tokens: int = 0  # tokens the decode steps produced (a finished sequence counts no more)

    @property
    def ttft_s(self) -> float:
        """Time to first token (the prefill)."""
        return self.prefill_s

    @property
    def decode_s(self) -> float:
        """All decode steps together."""
        return float(sum(self.decode_steps_s))

    @property
    def total_s(self) -> float:
        """Prefill and decode."""
        return self.prefill_s + self.decode_s

    @property
    def mean_decode_step_s(self) -> float:
        """Time between two tokens of one sequence (0.0 when no decode step ran)."""
        return self.decode_s / len(self.decode_steps_s) if self.decode_steps_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second over the decode steps, all sequences of the batch together (0.0 without steps)."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Generation:
    """New token ids per prompt (an ending EOS included) and how long the batch took."""

    ids: list[list[int]]
    timing: GenerationTiming


def check_prompts(texts: Any, limits: GenerationLimits) -> list[str]:
    """The request's texts, or a BadRequest that says what is wrong with them.

    Raises:
        BadRequest: not a list of strings, an empty or blank text, a text over max_text_chars, or
            more texts than max_texts_per_request.
    """
    if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
        raise BadRequest(f"inputs must be a list of strings, got {type(texts).__name__}: send "
                         '{"inputs": ["prompt", ...]}')
    if not texts:
        raise BadRequest("inputs is empty: send at least one prompt")
    if len(texts) > limits.max_texts_per_request:
        raise BadRequest(f"{len(texts)} prompts in one request; at most {limits.max_texts_per_request} "
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


def check_max_new_tokens(value: Any, card: GeneratorCard) -> int:
    """A request's max_new_tokens (the card's default when None), or BadRequest.

    Raises:
        BadRequest: not a whole number, below 1, or over the card's serving.max_new_tokens_cap.
    """
    if value is None:
        return card.max_new_tokens
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BadRequest(f"max_new_tokens must be a whole number, got {value!r}")
    cap = card.limits.max_new_tokens_cap
    if not 1 <= value <= cap:
        raise BadRequest(f"max_new_tokens is {value}; it must lie in 1..{cap} (serving.max_new_tokens_cap)")
    return int(value)


class TextGenerator:
    """Greedy generation with the KV cache over an Optimum-exported decoder, batching concurrent callers.

    Args:
        model_path: the ONNX decoder (task "text-generation-with-past").
        tokenizer_dir: the tokenizer's folder (with its chat template when the card uses one).
        card_path: the generator card (JSON, `GeneratorCard.write`).
        threads: ONNX Runtime intra-op threads (0: its default).
        card: the card itself, instead of reading card_path (tests, benchmarks).

    Raises:
        BadCard: the card is inconsistent, asks for a chat template the tokenizer lacks, or the graph
            is not a decoder with KV cache.
    """

    def __init__(self, model_path: str | Path, tokenizer_dir: str | Path, card_path: str | Path | None = None,
                 threads: int = 0, card: GeneratorCard | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import onnxruntime as ort
        from transformers import AutoTokenizer

        _configure_logging()
        if card is None and card_path is None:
            raise BadCard("no generator card: pass card_path or card")
        self.card = card.check() if card is not None else GeneratorCard.read(card_path)
        self.limits = self.card.limits
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        if self.card.use_chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise BadCard(f"the card sets use_chat_template: true but the tokenizer in {tokenizer_dir} has no "
                          "chat_template: save the tokenizer with its chat template, or set use_chat_template: false")
        self.eos_token_ids = _ids_of(self.card.eos_token_id if self.card.eos_token_id is not None
                                     else self.tokenizer.eos_token_id)
        # Pad ids sit under attention mask 0: any id works, the tokenizer's own keeps logs readable.
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids or [0])[0])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # As in serving.py: no spinning threads between runs, they would burn the cores the server needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.layout = KVCacheLayout.of_session(self.session)
        self.output_names = ["logits"] + [f"present.{i}.{kind}" for i in range(self.layout.num_layers)
                                          for kind in ("key", "value")]
        # What the batcher has produced so far (the front's /stats: a load test's tokens per request).
        self.prompts_answered = self.generated_tokens = 0
        self.batcher: AdaptiveBatcher[tuple[list[int], int, bool], list[int]] = AdaptiveBatcher(
            self._generate_batch, max_batch_size=self.limits.max_batch_size,
            max_batch_tokens=self.limits.max_batch_tokens, max_wait_ms=self.limits.max_wait_ms,
            max_queue=self.limits.max_queue, tokens_of=lambda item: len(item[0]) + item[1],
            on_batch=lambda size: log.debug("batch of %d prompts", size))

    # ------------------------------------------------------------------ token ids
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                     eos_token_id: int | Sequence[int] | None = None) -> list[list[int]]:
        """Greedy new token ids for each prompt, generated as one batch (see `generate_timed`)."""
        return self.generate_timed(prompt_ids, max_new_tokens, eos_token_id).ids

    def generate_timed(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                       eos_token_id: int | Sequence[int] | None = None,
                       stop_early: Sequence[bool] | None = None) -> Generation:
        """Greedy decoding with the KV cache for all prompts as one left-padded batch, timed.

        Runs on the caller's thread, past the batcher and the request checks (benchmarks call it
        directly; ONNX Runtime sessions take concurrent runs).

        Args:
            prompt_ids: token ids per prompt (special tokens included), not empty.
            max_new_tokens: new tokens at most, for all prompts or one per prompt.
            eos_token_id: the id(s) that end a sequence; None: the generator's (card, else tokenizer);
                [] never stops early (exactly max_new_tokens per prompt, for speed measurements).
            stop_early: per prompt, whether its EOS ends it (False: exactly its max_new_tokens, a
                request's `ignore_eos`); None: every prompt stops at EOS.

        Returns:
            Per prompt its new ids (the EOS that ended it included), and the batch's timing.
        """
        prompts = [list(map(int, p)) for p in prompt_ids]
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        budgets = ([int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, (int, np.integer))
                   else [int(n) for n in max_new_tokens])
        if len(budgets) != len(prompts) or min(budgets) < 0:
            raise ValueError("max_new_tokens: one count >= 0 for all prompts or one per prompt")
        eos = set(self.eos_token_ids if eos_token_id is None else _ids_of(eos_token_id))
        stops = [eos if stop_early is None or stop_early[row] else set() for row in range(len(prompts))]
        batch, longest = len(prompts), max(len(p) for p in prompts)
        input_ids = np.full((batch, longest), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, longest), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt):] = prompt
            mask[row, longest - len(prompt):] = 1
        new: list[list[int]] = [[] for _ in prompts]
        done = np.array([n == 0 for n in budgets])
        timing = GenerationTiming(batch_size=batch, prompt_tokens=longest, prefill_s=0.0)
        if done.all():
            return Generation(new, timing)

        start = time.perf_counter()
        positions = np.clip(mask.cumsum(axis=1) - 1, 0, None)
        cache = self.layout.empty_cache(batch)
        tokens = self._step(input_ids, mask, positions, cache)
        timing.prefill_s = time.perf_counter() - start
        self._take(tokens, new, done, budgets, stops)
        while not done.all():
            start = time.perf_counter()
            active = int((~done).sum())
            # A finished sequence still rides along (the batch keeps its shape); its tokens are dropped.
            tokens = np.where(done, self.pad_token_id, tokens)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            positions = mask.sum(axis=1, keepdims=True) - 1
            tokens = self._step(tokens[:, None], mask, positions, cache)
            timing.decode_steps_s.append(time.perf_counter() - start)
            timing.decode_tokens += active
            self._take(tokens, new, done, budgets, stops)
        return Generation(new, timing)

    def _step(self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
              cache: dict[str, np.ndarray]) -> np.ndarray:
        """One run of the graph: the greedy next token per sequence; `cache` becomes the grown cache."""
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": mask, **cache}
        if self.layout.has_position_ids:
            feeds["position_ids"] = positions.astype(np.int64)
        if self.layout.has_cache_branch:
            feeds["use_cache_branch"] = np.array([input_ids.shape[1] < mask.shape[1]])
        logits, *presents = self.session.run(self.output_names, feeds)
        for name, present in zip(self.output_names[1:], presents):
            cache[name.replace("present.", "past_key_values.", 1)] = present
        return logits[:, -1, :].argmax(axis=-1).astype(np.int64)

    @staticmethod
    def _take(tokens: np.ndarray, new: list[list[int]], done: np.ndarray, budgets: list[int],
              stops: list[set[int]]) -> None:
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            new[row].append(token)
            done[row] = token in stops[row] or len(new[row]) >= budgets[row]

    def _generate_batch(self, items: list[tuple[list[int], int, bool]]) -> list[list[int]]:
        """The batcher's run: the merged callers' prompts as one batch, each with its own budget and EOS rule."""
        answers = self.generate_timed([ids for ids, _, _ in items], [n for _, n, _ in items],
                                      stop_early=[not ignore for _, _, ignore in items]).ids
        # One worker thread runs every batch, so these counts need no lock.
        self.prompts_answered += len(answers)
        self.generated_tokens += sum(len(ids) for ids in answers)
        return answers

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        """A prompt's token ids: a user turn of the chat template when the card says so, else plain encoding."""
        if self.card.use_chat_template:
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                           add_generation_prompt=True, tokenize=True, return_dict=False))
        return list(self.tokenizer(text)["input_ids"])

    def generate(self, texts: Any, max_new_tokens: Any = None, ignore_eos: Any = False) -> list[str]:
        """Check the request, then generate each text's continuation through the batcher.

        Args:
            texts: the prompts, a list of non-blank strings.
            max_new_tokens: new tokens at most per prompt; None: the card's max_new_tokens.
            ignore_eos: generate exactly max_new_tokens, past any EOS (as vLLM's parameter of the same
                name: load tests use it so every request costs the tokens the traffic says).

        Returns:
            Per text the generated text (special tokens skipped), the prompt not included.

        Raises:
            BadRequest: the texts, max_new_tokens or ignore_eos are not acceptable, or a prompt has
                more than max_prompt_tokens tokens.
            QueueFull: too many prompts are waiting already (shed the request).
        """
        return self.decode(self.submit(texts, max_new_tokens, ignore_eos).result())

    def submit(self, texts: Any, max_new_tokens: Any = None, ignore_eos: Any = False) -> Future:
        """Check the request and queue its prompts; the future gives each prompt's new token ids
        (`decode` makes them texts). An asyncio front awaits it with `asyncio.wrap_future`.

        Raises:
            BadRequest, QueueFull: as `generate`.
        """
        texts = check_prompts(texts, self.limits)
        budget = check_max_new_tokens(max_new_tokens, self.card)
        if not isinstance(ignore_eos, bool):
            raise BadRequest(f"ignore_eos must be true or false, got {ignore_eos!r}")
        prompts = []
        for i, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > self.card.max_prompt_tokens:
                raise BadRequest(f"inputs[{i}] has {len(ids)} tokens; at most {self.card.max_prompt_tokens} "
                                 "(max_prompt_tokens): shorten it")
            prompts.append((ids, budget, ignore_eos))
        return self.batcher.submit(prompts)

    def decode(self, answers: list[list[int]]) -> list[str]:
        """Generated token ids as texts (special tokens skipped)."""
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]

    def close(self) -> None:
        """Stop the batcher's worker once its queue is drained."""
        self.batcher.close()


def _ids_of(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (int, np.integer)):
        return [int(value)]
    return [int(v) for v in value]


def _configure_logging() -> None:
    level = os.environ.get(LOG_LEVEL_ENV)
    if level and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(level.upper())
        log.propagate = False
