"""The adaptive batcher: merged runs, each caller exactly its own answers, shedding, failure isolation."""

from __future__ import annotations

import random
import threading
import time

import pytest

from tasks.serve.batching import AdaptiveBatcher, QueueFull


def test_concurrent_callers_each_get_exactly_their_own_answers_in_order_and_requests_are_merged():
    sizes = []

    def run_batch(items):
        sizes.append(len(items))
        time.sleep(0.002)  # the model's work: requests arriving meanwhile form the next batch
        return [f"{item}!" for item in items]

    batcher = AdaptiveBatcher(run_batch, max_batch_size=16, max_batch_tokens=16 * 40, tokens_of=len)
    rng = random.Random(0)
    requests = [[f"c{c}-t{t}-" + "x" * rng.randint(1, 40) for t in range(rng.choice([1, 1, 1, 2, 3, 5]))]
                for c in range(200)]
    answers: dict[int, list[str]] = {}

    def call(i: int) -> None:
        time.sleep(rng.random() * 0.05)
        answers[i] = batcher(requests[i], timeout=30)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    for i, texts in enumerate(requests):
        assert answers[i] == [f"{text}!" for text in texts]
    assert sum(sizes) == sum(len(r) for r in requests) == batcher.stats.items
    # Merged: fewer model runs than requests, some with several requests in them, none over the limits.
    assert batcher.stats.batches < len(requests) and max(sizes) > 5
    assert max(sizes) <= 16


def test_token_budget_splits_long_texts_into_smaller_batches():
    sizes = []
    release = threading.Event()

    def run_batch(items):
        sizes.append(len(items))
        release.wait(5)
        return items

    batcher = AdaptiveBatcher(run_batch, max_batch_size=32, max_batch_tokens=100, tokens_of=len)
    first = batcher.submit(["a"])  # holds the worker while the rest queue up
    time.sleep(0.05)
    waiting = [batcher.submit(["y" * 50]) for _ in range(6)]
    release.set()
    assert first.result(5) == ["a"] and all(f.result(5) == ["y" * 50] for f in waiting)
    batcher.close()
    # 50-token texts under a 100-token budget: two per batch (2 x 50), never 6 in one run.
    assert sizes[1:] == [2, 2, 2]


def test_a_full_queue_sheds_new_requests_and_still_answers_the_queued_ones():
    release = threading.Event()
    batcher = AdaptiveBatcher(lambda items: (release.wait(5), items)[1], max_batch_size=4, max_queue=10)
    running = batcher.submit(["first"])
    time.sleep(0.05)  # the worker holds "first"; the queue is empty again
    queued = [batcher.submit([f"t{i}", f"u{i}"]) for i in range(5)]  # 10 texts waiting: the queue is full
    with pytest.raises(QueueFull, match="already waiting"):
        batcher.submit(["one more"])
    release.set()
    assert running.result(5) == ["first"]
    assert [f.result(5) for f in queued] == [[f"t{i}", f"u{i}"] for i in range(5)]
    assert batcher.submit(["after"]).result(5) == ["after"]  # room again once drained
    batcher.close()


def test_a_failing_batch_fails_only_its_own_callers_and_the_worker_goes_on():
    release = threading.Event()

    def run_batch(items):
        release.wait(5)
        if "poison" in items:
            raise ValueError("cannot tokenize poison")
        return [item.upper() for item in items]

    batcher = AdaptiveBatcher(run_batch, max_batch_size=2)
    first = batcher.submit(["ok"])
    time.sleep(0.05)
    poisoned = [batcher.submit(["poison"]), batcher.submit(["beside poison"])]  # one batch of 2
    later = batcher.submit(["fine"])  # the next batch
    release.set()
    assert first.result(5) == ["OK"]
    for future in poisoned:
        with pytest.raises(ValueError, match="cannot tokenize poison"):
            future.result(5)
    assert later.result(5) == ["FINE"]
    assert batcher.stats.failed_batches == 1
    batcher.close()


def test_a_model_that_answers_the_wrong_number_of_items_fails_the_batch_instead_of_misrouting_answers():
    batcher = AdaptiveBatcher(lambda items: items[:-1])
    with pytest.raises(RuntimeError, match="2 inputs"):
        batcher(["a", "b"], timeout=5)
    batcher.close()
