"""Exclusive locks between processes on one host: OS file locks, released even if the holder is killed.

A killed holder never leaks its lock (the kernel drops it with the process), unlike a counter of
slots that a crash can leave taken (prefect#17415); and a waiter gives up after a timeout with a
clear error instead of hanging forever.
"""

from __future__ import annotations

import fcntl
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tasks.core.errors import RequantError


class LockTimeout(RequantError):
    """Another process held the lock for longer than we were willing to wait."""


@contextmanager
def exclusive(lock_dir: Path, name: str, timeout_s: float = 3600.0, poll_s: float = 0.5) -> Iterator[None]:
    """Hold the exclusive lock `name` (one file under lock_dir) for the duration of the block.

    Raises:
        LockTimeout: the lock stayed taken for timeout_s.
    """
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"
    deadline = time.monotonic() + timeout_s
    with open(path, "w") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"lock '{name}' ({path}) is held by another run for over {timeout_s:.0f} s: "
                        "wait for it to finish, or raise operations.lock_timeout_minutes"
                    ) from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
