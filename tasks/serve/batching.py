"""Adaptive batching: merge concurrent requests into one model call, split the answers back per request.

A served model answers one text per request most of the time. Run one by one, each text pays the
whole per-call cost (one tokenizer call, one ONNX Runtime run, thread hand-offs), which on a small
encoder is larger than the matrix work itself. `AdaptiveBatcher` keeps a queue and one worker
thread per model: callers put their texts on the queue and wait; the worker takes everything that
is waiting (up to `max_batch_size` texts or `max_batch_tokens` estimated padded tokens), runs it as
one batch, and hands each caller exactly its own answers, in order.

Adaptive means it never waits on purpose when idle: a request that finds the worker free runs at
once (waiting at most `max_wait_ms` for company, 0 by default). Under load, requests that arrive
while a batch runs form the next batch, so the batch size follows the load.

It is plain Python (threads, no event loop), so it works under any server that calls `predict`
from several threads (`mlflow models serve` does), and an asyncio front can wait on the returned
`concurrent.futures.Future` without a thread per request. This file is shipped with the served
model (MLflow `code_paths`): it imports nothing from requant.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class QueueFull(RuntimeError):
    """The batcher's queue holds `max_queue` items already: shed this request (HTTP 503), do not queue it."""


@dataclass
class _Request(Generic[Item]):
    items: list
    future: Future
    tokens: int


@dataclass
class BatchStats:
    """What the worker did: batches run, items in them, and the largest batch (for logs and tests)."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    failed_batches: int = 0

    @property
    def mean_batch_size(self) -> float:
        """Items per batch on average (1.0: no merging happened)."""
        return self.items / self.batches if self.batches else 0.0


class AdaptiveBatcher(Generic[Item, Answer]):
    """One worker thread that runs queued requests' items as merged batches through `run_batch`.

    Args:
        run_batch: items in, one answer per item out (same order). It runs on the worker thread only.
        max_batch_size: items per batch at most (a single larger request still runs, alone).
        max_batch_tokens: estimated padded tokens per batch at most (batch size x longest item);
            None = no token budget.
        max_wait_ms: how long the worker may wait for more requests once it holds one (0: never).
        max_queue: items waiting at most; `submit` raises QueueFull beyond it.
        tokens_of: the estimated token count of one item (for the token budget).
        on_batch: called with each batch's size after it ran (logging, tests).
    """

    def __init__(self, run_batch: Callable[[list[Item]], Sequence[Answer]], max_batch_size: int = 32,
                 max_batch_tokens: int | None = None, max_wait_ms: float = 0.0, max_queue: int = 1024,
                 tokens_of: Callable[[Item], int] = lambda item: 1,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        self._run_batch, self._tokens_of, self._on_batch = run_batch, tokens_of, on_batch
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_wait_s, self.max_queue = max_wait_ms / 1000.0, max_queue
        self.stats = BatchStats()
        self._queue: deque[_Request] = deque()
        self._queued_items = 0
        self._lock = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="requant-batcher", daemon=True)
        self._worker.start()

    def submit(self, items: Sequence[Item]) -> Future:
        """Queue one request's items; the future resolves to their answers (a list, same order).

        Raises:
            QueueFull: the queue already holds max_queue items (the caller should shed the request).
            RuntimeError: the batcher was closed.
        """
        items = list(items)
        future: Future = Future()
        if not items:
            future.set_result([])
            return future
        tokens = max(self._tokens_of(item) for item in items)
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._queued_items + len(items) > self.max_queue and self._queued_items > 0:
                raise QueueFull(f"{self._queued_items} texts are already waiting (serving.max_queue is "
                                f"{self.max_queue}): retry later")
            self._queue.append(_Request(items, future, tokens))
            self._queued_items += len(items)
            self._lock.notify()
        return future

    def __call__(self, items: Sequence[Item], timeout: float | None = None) -> list[Answer]:
        """Submit and wait: the answers for `items`, in order (raises what the batch raised)."""
        return self.submit(items).result(timeout)

    def close(self) -> None:
        """Stop the worker once the queue is drained (waiting callers still get their answers)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._worker.join(timeout=10)

    # ------------------------------------------------------------------ worker
    def _fits(self, batch: list[_Request], request: _Request) -> bool:
        size = sum(len(r.items) for r in batch) + len(request.items)
        if size > self.max_batch_size:
            return False
        if self.max_batch_tokens is None:
            return True
        longest = max([r.tokens for r in batch] + [request.tokens])
        return size * longest <= self.max_batch_tokens

    def _take_batch(self) -> list[_Request] | None:
        """Block for the first request, then take what fits of what is waiting (waiting up to max_wait for more)."""
        with self._lock:
            while not self._queue:
                if self._closed:
                    return None
                self._lock.wait()
            batch = [self._queue.popleft()]  # the first request always runs, even if alone it is over budget
            deadline = time.monotonic() + self.max_wait_s
            while True:
                while self._queue and self._fits(batch, self._queue[0]):
                    batch.append(self._queue.popleft())
                full = bool(self._queue) or sum(len(r.items) for r in batch) >= self.max_batch_size
                left = deadline - time.monotonic()
                if full or left <= 0 or self._closed:
                    break
                self._lock.wait(left)
            self._queued_items -= sum(len(r.items) for r in batch)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            items = [item for request in batch for item in request.items]
            try:
                answers = list(self._run_batch(items))
                if len(answers) != len(items):
                    raise RuntimeError(f"the model gave {len(answers)} answers for {len(items)} inputs")
            except BaseException as exc:  # noqa: BLE001 - a failing batch fails only its own callers
                self.stats.failed_batches += 1
                for request in batch:
                    request.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.items += len(items)
            self.stats.largest = max(self.stats.largest, len(items))
            start = 0
            for request in batch:
                request.future.set_result(answers[start:start + len(request.items)])
                start += len(request.items)
            if self._on_batch is not None:
                self._on_batch(len(items))
