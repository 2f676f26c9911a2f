"""Child process for `tasks.measure.timing.peak_memory_mb`: load a model, run one batch, print its memory.

Usage: python -m tasks.measure.memory MODEL.onnx FEED.npz THREADS

Prints {"model_peak_mb": ..., "process_peak_mb": ..., "baseline_mb": ...}. The figures come from
/proc/self/status (VmHWM, VmRSS): `ru_maxrss` would carry the parent's high-water mark across
fork/exec, so every candidate would read the same.
"""

import json
import sys
from pathlib import Path

import numpy as np


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(model_path: str, feed_path: str, threads: str) -> None:
    """Measure one load-and-serve of the model, net of the interpreter and onnxruntime themselves."""
    import onnxruntime  # noqa: F401  (imported before the baseline: its own memory is not the model's)

    from tasks.models.graph import onnx_session

    feed = dict(np.load(feed_path))
    baseline = _status_mb("VmRSS")
    session = onnx_session(model_path, int(threads))
    session.run(["logits"], feed)
    peak = _status_mb("VmHWM")
    print(json.dumps({"model_peak_mb": round(peak - baseline, 2), "process_peak_mb": round(peak, 2),
                      "baseline_mb": round(baseline, 2)}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
