"""The served model as a user calls it: requant's front and `mlflow models serve`, on 127.0.0.1.

A tiny constant-label graph with the real MiniLM tokenizer is served; requests go over HTTP from
threads, so the batcher sees real concurrent callers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks.config.settings import RegistrySettings
from tasks.serve.front import ServedFiles, files_of_mlflow_model, served_front
from tasks.serve.processes import free_port, stop_group
from tasks.serve.serving import LOG_LEVEL_ENV, ServingAssets, ServingLimits
from tasks.track import Tracker
from tests.registry_helpers import (
    LABELS,
    constant_label_graph,
    register_serving_version,
)


def post(url: str, body: bytes | dict, timeout: float = 30) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of POST /invocations."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read()), dict(answer.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


def concurrently(calls: list) -> list:
    """Run the calls in threads started together; their results in order."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i):
        start.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def served_files(tmp_path: Path, tokenizer_dir: Path, limits: ServingLimits) -> ServedFiles:
    graph = constant_label_graph(tmp_path / "model.onnx", LABELS.index("refund"))
    card = ServingAssets(tokenizer_dir, LABELS, 32, limits).write_card(tmp_path / "classifier.json")
    return ServedFiles(graph, tokenizer_dir, card)


def test_front_merges_concurrent_requests_and_answers_each_its_own_texts(tmp_path, minilm_dir):
    # A batch waits up to 300 ms for company, so requests sent together are merged deterministically.
    files = served_files(tmp_path, minilm_dir, ServingLimits(max_batch_size=64, max_wait_ms=300))
    with served_front(files) as (url, pid):
        bodies = [{"inputs": [f"where is my refund {i}-{j}" for j in range(1 + i % 3)]} for i in range(12)]
        answers = concurrently([lambda b=b: post(url, b) for b in bodies])
        with urllib.request.urlopen(f"{url}/stats", timeout=10) as answer:
            stats = json.loads(answer.read())
    for body, (status, answer, _) in zip(bodies, answers):
        assert status == 200
        assert [p["label"] for p in answer["predictions"]] == ["refund"] * len(body["inputs"])
        assert all(0 < p["score"] <= 1 for p in answer["predictions"])
    assert stats["texts"] == sum(len(b["inputs"]) for b in bodies)
    assert stats["largest_batch"] > 3 and stats["batches"] < len(bodies)


def test_front_refuses_bad_bodies_with_4xx_and_a_message_and_sheds_load_with_503(tmp_path, minilm_dir):
    limits = ServingLimits(max_batch_size=8, max_wait_ms=1000, max_queue=2, max_text_chars=50,
                           max_texts_per_request=3, max_body_bytes=2048)
    with served_front(served_files(tmp_path, minilm_dir, limits)) as (url, pid):
        cases = {
            "not a list": ({"inputs": "I lost my card"}, 400, "list of strings"),
            "empty text": ({"inputs": ["fine", "  "]}, 400, "inputs[1] is empty"),
            "text too long": ({"inputs": ["x" * 51]}, 400, "at most 50"),
            "too many texts": ({"inputs": ["a", "b", "c", "d"]}, 400, "at most 3"),
            "not a string": ({"inputs": ["a", 7]}, 400, "inputs[1] is a int"),
            "no inputs key": ({"texts": ["a"]}, 400, "no inputs"),
            "not JSON": (b"{inputs: nope", 400, "not valid JSON"),
            "body too large": ({"inputs": ["a" * 3000]}, 413, "at most 2048"),
        }
        for name, (body, status, words) in cases.items():
            got, answer, _ = post(url, body)
            assert got == status and words in answer["message"], (name, got, answer)
        # The worker waits 1 s for company while 2 texts are queued: the 3rd and later are shed.
        answers = concurrently([lambda: post(url, {"inputs": ["top up failed"]}) for _ in range(5)])
        assert sorted(status for status, _, _ in answers) == [200, 200, 503, 503, 503]
        shed = next((answer, headers) for status, answer, headers in answers if status == 503)
        assert "already waiting" in shed[0]["message"] and shed[1].get("retry-after") == "1"
        assert post(url, {"dataframe_split": {"columns": ["text"], "data": [["I lost my card"]]}})[0] == 200


def test_mlflow_models_serve_batches_concurrent_requests_and_answers_bad_input_with_400(tmp_path, minilm_dir,
                                                                                       monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(RegistrySettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                       artifact_location=str(tmp_path / "art"), serving_model_name="served"))
    version = register_serving_version(tracker, tmp_path / "w", minilm_dir, LABELS.index("top_up"), "k1",
                                       limits=ServingLimits(max_wait_ms=300))
    port, log_path = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracker.settings.tracking_uri, "HF_HUB_OFFLINE": "1",
           LOG_LEVEL_ENV: "DEBUG", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
                                   f"models:/served/{version}", "--env-manager", "local", "-h", "127.0.0.1",
                                   "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, log_path.read_text()[-2000:]
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        answers = concurrently([lambda i=i: post(url, {"inputs": [f"top up {i}"]}) for i in range(6)])
        assert all(status == 200 and answer["predictions"][0]["label"] == "top_up" for status, answer, _ in answers)
        assert post(url, {"inputs": ["  "]})[0] == 400
        status, answer, _ = post(url, {"inputs": ["x" * 2001]})
        assert status == 400 and "at most 2000" in answer["message"]
    finally:
        stop_group(server)
    sizes = [int(line.split("batch of ")[1].split()[0]) for line in log_path.read_text().splitlines()
             if "batch of " in line]
    assert sum(sizes) >= 6 and max(sizes) > 1, sizes  # MLflow's threads' requests were merged
    assert "Add type hints" not in log_path.read_text()


def test_a_downloaded_serving_version_names_its_files_and_a_folder_without_mlmodel_is_refused(tmp_path, minilm_dir):
    tracker = Tracker(RegistrySettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                       artifact_location=str(tmp_path / "art"), serving_model_name="served"))
    version = register_serving_version(tracker, tmp_path / "w", minilm_dir, 0, "k1")
    folder = Path(tracker._mlflow.artifacts.download_artifacts(artifact_uri=f"models:/served/{version}",
                                                                dst_path=str(tmp_path / "down")))
    files = files_of_mlflow_model(folder)
    assert files.onnx_model.is_file() and files.card.is_file() and (files.tokenizer / "tokenizer.json").is_file()
    result = subprocess.run([sys.executable, "-m", "tasks.serve.front", "--model-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "holds no MLmodel" in result.stderr
