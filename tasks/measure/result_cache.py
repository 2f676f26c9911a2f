"""Reuse of scores: a candidate graph's per-row predictions, content-addressed and kept across runs.

A prediction depends on the graph (its sha256), the tokenized rows and their batches (dynamic INT8
picks its activation scales per batch), the host's CPU (kernels differ by ISA) and the runtime
versions; the key is a hash of exactly those. The same graph reached twice (a grid point and a
search trial, or yesterday's run and today's with the same data) is scored once. What is kept is
the predictions, not the verdict: quality, intervals and screening are recomputed from them under
the current bar. Timing is never kept: prices must come from speeds measured side by side in the
run that uses them.

One file per key under work_dir/results/<key>.json, written atomically (temporary file, then
rename) with a checksum of its content; a file that fails the check is recomputed, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from tasks.measure.scoring import Batches

log = logging.getLogger("requant")

FORMAT = 1


def rows_digest(batches: Batches, wave_batch_ends: list[int] | None) -> str:
    """Digest of the evaluation rows as scored: every batch's row positions and tokenized arrays, and the waves."""
    h = hashlib.sha256()
    h.update(json.dumps(wave_batch_ends or []).encode())
    for idx, feed in batches:
        h.update(np.ascontiguousarray(idx, dtype=np.int64).tobytes())
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            h.update(f"{name}{array.dtype}{array.shape}".encode())
            h.update(array.tobytes())
    return h.hexdigest()


def result_key(model_sha256: str, evaluation_rows: str, host: dict[str, str], runtime: dict[str, str]) -> str:
    """The content address of one candidate's predictions on one set of rows, on this host and runtimes."""
    payload = {"format": FORMAT, "model": model_sha256, "rows": evaluation_rows,
               "host": {k: host.get(k) for k in ("cpu_model", "cpu_flags", "machine")}, "runtime": runtime}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _checksum(waves: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(waves, sort_keys=True).encode()).hexdigest()


class ResultCache:
    """Per-row predictions of candidate graphs, one verified JSON file per key, per screening wave.

    `enabled=False` reads nothing and writes nothing (every score is computed).
    """

    def __init__(self, folder: Path, evaluation_rows: str, host: dict[str, str], runtime: dict[str, str],
                 enabled: bool = True) -> None:
        self.folder = Path(folder)
        self.evaluation_rows, self.host, self.runtime = evaluation_rows, host, runtime
        self.enabled = enabled

    @classmethod
    def for_reference(cls, folder: Path, reference, host: dict[str, str], enabled: bool = True) -> ResultCache:
        """The cache for the selection rows of this run's reference, on this host and runtimes."""
        from tasks.recipes.base import runtime_versions

        return cls(folder, rows_digest(reference.eval_batches, reference.wave_batch_ends), host, runtime_versions(),
                   enabled)

    def key(self, model_sha256: str) -> str:
        """The key of this graph's predictions on these rows, here."""
        return result_key(model_sha256, self.evaluation_rows, self.host, self.runtime)

    def path(self, key: str) -> Path:
        """Where the predictions for `key` live."""
        return self.folder / f"{key}.json"

    def load(self, key: str, wave_sizes: list[int]) -> dict[int, np.ndarray]:
        """The waves already scored for `key` (wave index -> predictions); {} when none or unsound.

        A file whose checksum, key or wave lengths do not match is ignored with a warning (and
        rewritten when the scores are recomputed): a reused score must be exactly what was computed.
        """
        path = self.path(key)
        if not self.enabled or not path.is_file():
            return {}
        try:
            stored = json.loads(path.read_text())
            waves = stored["waves"]
            if stored.get("key") != key or stored.get("checksum") != _checksum(waves):
                raise ValueError("checksum or key mismatch")
            out = {}
            for index, predictions in waves.items():
                i = int(index)
                if not 0 <= i < len(wave_sizes) or len(predictions) != wave_sizes[i]:
                    raise ValueError(f"wave {index} has {len(predictions)} rows")
                out[i] = np.asarray(predictions, dtype=np.int64)
            return out
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("stored scores %s are unsound (%s); scoring again", path.name, exc)
            return {}

    def store(self, key: str, waves: dict[int, np.ndarray], model_sha256: str) -> None:
        """Write the scored waves for `key` atomically (a reader sees the old file or the new, never half)."""
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        plain = {str(i): [int(v) for v in predictions] for i, predictions in sorted(waves.items())}
        body = json.dumps({"key": key, "model_sha256": model_sha256, "waves": plain, "checksum": _checksum(plain)})
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
