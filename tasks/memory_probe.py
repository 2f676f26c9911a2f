"""Child process for `tasks.benchmark.peak_memory_mb`: load a model, run one batch, print peak RSS.

Usage: python -m tasks.memory_probe MODEL.onnx FEED.npz THREADS
"""

import json
import resource
import sys

import numpy as np

from tasks.evaluation import onnx_session


def main(model_path: str, feed_path: str, threads: str) -> None:
    """Print {"peak_rss_mb": ...} for one load-and-serve of the model."""
    session = onnx_session(model_path, int(threads))
    feed = dict(np.load(feed_path))
    session.run(["logits"], feed)
    # ru_maxrss is in KiB on Linux.
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
