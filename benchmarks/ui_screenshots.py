"""Screenshots of the MLflow UI after a run, as a reviewer sees it (headless Chromium).

Run on purpose (not a test; needs Debian's `chromium`: `apt-get install -y chromium`):

    .venv/bin/python benchmarks/ui_screenshots.py [--params params.yaml] [--out screenshots]

It starts `mlflow ui` on 127.0.0.1 (a free port) over the tracking store in params.yaml (or
MLFLOW_TRACKING_URI), and saves PNGs of: the experiment's runs table, the newest requantize parent
run (its description: decision, cost, candidates), the compare view of its candidate runs, the view
its `requant.candidates_view` tag links to (candidates with verdict, cost and accuracy columns), and
the serving registered model. The server is stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def screenshot(chromium: str, url: str, path: Path, size: str = "1600,1000") -> None:
    """One headless Chromium screenshot of url, after the page's scripts had time to render."""
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", "--hide-scrollbars", f"--window-size={size}", "--virtual-time-budget=15000",
                    f"--screenshot={path}", url], check=True, capture_output=True, timeout=120)


def main() -> int:
    """Start mlflow ui, take the screenshots, stop it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="screenshots")
    args = parser.parse_args()

    from flows import runtime

    runtime.configure()
    from mlflow import MlflowClient

    from tasks.config.loading import load_settings
    from tasks.track import tracking_uri

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("error: chromium is not installed: apt-get install -y chromium", file=sys.stderr)
        return 2
    settings = load_settings(args.params)
    uri = tracking_uri(settings.registry)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(settings.registry.experiment)
    if experiment is None:
        print(f"error: no experiment '{settings.registry.experiment}' at {uri}: run `requant run` first", file=sys.stderr)
        return 2
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`requant.decision_key` != ''",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", uri]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("error: mlflow ui did not answer in 120 s") from None
                time.sleep(1)
        pages = {"runs-table": f"{base}/#/experiments/{experiment.experiment_id}/runs",
                 "serving-model": f"{base}/#/models/{settings.registry.serving_model_name}"}
        if parents:
            parent = parents[0].info.run_id
            pages["decision-run"] = f"{base}/#/experiments/{experiment.experiment_id}/runs/{parent}"
            children = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
            ids = ",".join(f'"{r.info.run_id}"' for r in children)
            pages["compare-candidates"] = (f"{base}/#/compare-runs?runs=[{ids}]"
                                           f"&experiments=[\"{experiment.experiment_id}\"]")
            view = parents[0].data.tags.get("requant.candidates_view")  # flows/record.py share_candidates_view
            if view:
                # The link is relative (#/...) for a local store, absolute for a server: open it on this UI.
                pages["candidates-view"] = f"{base}/#{view.split('#', 1)[1]}"
        for name, url in pages.items():
            screenshot(chromium, url, out / f"{name}.png")
            print(f"{name}: {out / (name + '.png')}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
