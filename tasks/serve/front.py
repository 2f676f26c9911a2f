"""requant's serving front: a served model (text classifier or text generator) behind a lean ASGI app, one
process, batching inside.

`mlflow models serve` answers each request in a thread of its own (at most 6 at once on 2 cores:
asyncio's default pool), parses it with MLflow's generic code and, on this project's hosts, tops
out below 100 requests/s even for a model that does nothing. This front speaks the same protocol
(`POST /invocations` with `{"inputs": [...]}`, also `instances`, `dataframe_split` and
`dataframe_records`; `GET /ping`, `/health`, `/version`; and `GET /stats`: batches run so far) for the same served model, but waits on
the batcher's futures in the event loop, so every request in flight can join the next batch.

A text-generation model is served the same way (`GenerationFront`): `{"inputs": ["prompt", ...],
"params": {"max_new_tokens": n, "ignore_eos": false}}` in, `{"predictions": ["generated text", ...]}`
out, and `/stats` also counts the prompts answered and the tokens generated (a load test's tokens
per request).

Answers: 200 `{"predictions": [{"label", "score"}, ...]}`; 400 for bad input (with a message), 413
for a body over `serving.max_body_bytes`, 503 when the queue is full (load is shed, not queued
without bound), 500 when the model fails on a batch (only that batch's callers get it).

Run it: `requant serve-model --version production` (flows/cli.py), or
`python -m tasks.serve.front --model-dir DIR` on a downloaded MLflow model folder, or with
`--onnx --tokenizer --card` on a candidate's files (the flow's served measurement does that).
It imports neither MLflow nor requant's pipeline code, so it starts in about a second.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.core.errors import RequantError
from tasks.serve.generation import BadCard, TextGenerator
from tasks.serve.serving import BadRequest, QueueFull, TextClassifier, check_texts

HOST = "127.0.0.1"
JSON = [(b"content-type", b"application/json")]


@dataclass(frozen=True)
class ServedFiles:
    """The three files a served model is made of: graph, tokenizer and card (a classifier's or a generator's)."""

    onnx_model: Path
    tokenizer: Path
    card: Path
    kind: str = "classifier"  # or "generator": a decoder with its generator card

    def args(self) -> list[str]:
        """As command-line arguments of this module."""
        kind = ["--generator"] if self.kind == "generator" else []
        return ["--onnx", str(self.onnx_model), "--tokenizer", str(self.tokenizer), "--card", str(self.card), *kind]


def files_of_mlflow_model(model_dir: Path) -> ServedFiles:
    """The served files inside a downloaded requant serving model (its MLmodel names the artifacts).

    Raises:
        BadRequest: the folder is not a requant serving model (no MLmodel, or no onnx_model artifact).
    """
    mlmodel = Path(model_dir) / "MLmodel"
    if not mlmodel.is_file():
        raise BadRequest(f"{model_dir} holds no MLmodel file: pass a downloaded MLflow model folder")
    artifacts = (yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {})
                 .get("artifacts") or {})
    try:
        paths = {name: Path(model_dir) / artifacts[name]["path"] for name in ("onnx_model", "tokenizer", "classifier_card")}
    except KeyError as exc:
        raise BadRequest(f"{model_dir} is not a requant serving model: its MLmodel has no artifact {exc}") from None
    return ServedFiles(paths["onnx_model"], paths["tokenizer"], paths["classifier_card"])


def generation_files_of_mlflow_model(model_dir: Path) -> ServedFiles | None:
    """The served files of a downloaded text-generation model (graph, tokenizer, generator card), or
    None when the model is not one (a classifier, say)."""
    mlmodel = Path(model_dir) / "MLmodel"
    if not mlmodel.is_file():
        return None
    artifacts = (yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {})
                 .get("artifacts") or {})
    if "generator_card" not in artifacts:
        return None
    paths = {name: Path(model_dir) / artifacts[name]["path"] for name in ("onnx_model", "tokenizer", "generator_card")}
    return ServedFiles(paths["onnx_model"], paths["tokenizer"], paths["generator_card"], kind="generator")


def served_files_of_mlflow_model(model_dir: Path) -> ServedFiles:
    """The served files of a downloaded requant model, a text generator or a text classifier.

    Raises:
        BadRequest: the folder is neither (see files_of_mlflow_model).
    """
    return generation_files_of_mlflow_model(model_dir) or files_of_mlflow_model(model_dir)


def texts_in(body: object) -> object:
    """The texts of a request body in any of MLflow's JSON input formats (checked later by check_texts).

    Raises:
        BadRequest: the body is not a JSON object with one of the known keys.
    """
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object such as {"inputs": ["text", ...]}')
    if "inputs" in body:
        return body["inputs"]
    if "instances" in body:
        return body["instances"]
    if "dataframe_split" in body:
        rows = (body["dataframe_split"] or {}).get("data") if isinstance(body["dataframe_split"], dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 1 for r in rows):
            raise BadRequest("dataframe_split must hold one column of texts: {\"columns\": [\"text\"], \"data\": [[...]]}")
        return [r[0] for r in rows]
    if "dataframe_records" in body:
        rows = body["dataframe_records"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) and len(r) == 1 for r in rows):
            raise BadRequest('dataframe_records must be a list of one-key objects: [{"text": "..."}, ...]')
        return [next(iter(r.values())) for r in rows]
    raise BadRequest(f"no inputs in the body (keys: {', '.join(sorted(body)) or 'none'}): send "
                     '{"inputs": ["text", ...]}')


class ServingFront:
    """The ASGI app: routes, body limits, JSON, and the classifier's batcher awaited in the event loop."""

    def __init__(self, classifier: TextClassifier, version: str = "requant") -> None:
        self.model, self.version = classifier, version
        self.max_body_bytes = classifier.limits.max_body_bytes

    def submit(self, body: object) -> concurrent.futures.Future:
        """Check a parsed request body and queue its texts; the future gives its predictions (BadRequest, QueueFull)."""
        return self.model.batcher.submit(check_texts(texts_in(body), self.model.limits))

    def predictions(self, answers: list) -> list:
        """The JSON predictions of a batch's answers to one request."""
        return answers

    def stats(self) -> dict:
        """GET /stats: how much merging the load produced so far."""
        stats = self.model.batcher.stats
        return {"batches": stats.batches, "texts": stats.items, "largest_batch": stats.largest,
                "failed_batches": stats.failed_batches, "mean_batch_size": stats.mean_batch_size}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "GET" and path in ("/ping", "/health"):
            await _respond(send, 200, b"\n")
        elif method == "GET" and path == "/stats":  # how much merging the load produced so far
            await _respond(send, 200, json.dumps(self.stats()).encode())
        elif method == "GET" and path == "/version":
            await _respond(send, 200, json.dumps(self.version).encode())
        elif path == "/invocations" and method == "POST":
            status, body = await self._invocations(scope, receive)
            await _respond(send, status, body)
        else:
            await _respond(send, 404, _error("NOT_FOUND", f"no route {method} {path}: POST /invocations"))

    async def _invocations(self, scope, receive) -> tuple[int, bytes]:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return 413, _error("REQUEST_TOO_LARGE", f"the body has {int(declared)} bytes; at most "
                                                    f"{self.max_body_bytes} (serving.max_body_bytes): split the request")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 499, b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return 413, _error("REQUEST_TOO_LARGE", f"the body has more than {self.max_body_bytes} bytes "
                                                        "(serving.max_body_bytes): split the request")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        try:
            future = self.submit(json.loads(b"".join(chunks)))
        except (ValueError, UnicodeDecodeError) as exc:  # BadRequest and json's errors are ValueErrors
            message = str(exc) if isinstance(exc, BadRequest) else f"the body is not valid JSON ({exc})"
            return 400, _error("INVALID_PARAMETER_VALUE", message)
        except QueueFull as exc:
            return 503, _error("TEMPORARILY_UNAVAILABLE", str(exc))
        try:
            answers = await asyncio.wrap_future(future)
        except Exception as exc:  # the model failed on this batch: its callers get the reason
            return 500, _error("INTERNAL_ERROR", f"the model failed on this batch: {type(exc).__name__}: {exc}"[:500])
        return 200, json.dumps({"predictions": self.predictions(answers)}).encode()


class GenerationFront(ServingFront):
    """The same app for a text generator: prompts and `params` in, generated texts out."""

    def __init__(self, generator: TextGenerator, version: str = "requant") -> None:
        self.model, self.version = generator, version
        limits = generator.limits
        # Room for the largest request the limits allow, with JSON escapes (at most 6 bytes a character).
        self.max_body_bytes = limits.max_texts_per_request * limits.max_text_chars * 6 + 4096

    def submit(self, body: object) -> concurrent.futures.Future:
        params = body.get("params") if isinstance(body, dict) else None
        if params is not None and not isinstance(params, dict):
            raise BadRequest('params must be a JSON object such as {"max_new_tokens": 32}')
        params = params or {}
        return self.model.submit(texts_in(body), params.get("max_new_tokens"), params.get("ignore_eos", False))

    def predictions(self, answers: list) -> list:
        return self.model.decode(answers)

    def stats(self) -> dict:
        return {**super().stats(), "prompts": self.model.prompts_answered,
                "generated_tokens": self.model.generated_tokens}


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error_code": code, "message": message}).encode()


async def _respond(send, status: int, body: bytes) -> None:
    headers = JSON + [(b"retry-after", b"1")] if status == 503 else JSON
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(files: ServedFiles, host: str, port: int, threads: int = 0) -> None:
    """Load the model and serve it until the process is stopped (uvloop and httptools when installed)."""
    import uvicorn

    if files.kind == "generator":
        app = GenerationFront(TextGenerator(files.onnx_model, files.tokenizer, files.card, threads))
    else:
        app = ServingFront(TextClassifier(files.onnx_model, files.tokenizer, files.card, threads))
    options = {}
    try:
        import uvloop  # noqa: F401 - a faster event loop; optional

        options["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401 - a faster HTTP parser; optional

        options["http"] = "httptools"
    except ImportError:
        pass
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, backlog=4096, **options)


@contextmanager
def served_front(files: ServedFiles, start_timeout_s: float = 120.0, threads: int = 0) -> Iterator[tuple[str, int]]:
    """Serve `files` with this front in a process of its own on 127.0.0.1 and a free port; yield (url, pid).

    The process is stopped on the way out by its PID (SIGTERM to its group, SIGKILL after 10 s).

    Raises:
        RequantError: it exited or did not answer /ping within `start_timeout_s` (its log's tail in the message).
    """
    with served_fronts([files], start_timeout_s, threads) as (front,):
        if isinstance(front, Exception):
            raise front
        yield front


@contextmanager
def served_fronts(models: list[ServedFiles], start_timeout_s: float = 120.0,
                  threads: int = 0) -> Iterator[list[tuple[str, int] | Exception]]:
    """Serve several models at once, one front process each, started together (their start-up overlaps);
    yield, per model, (url, pid) or the RequantError that says why it did not start. All are stopped
    by their PIDs on the way out."""
    from tasks.serve.processes import free_port, stop_group, wait_for_ping

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    started = []
    try:
        for files in models:
            port = free_port()
            command = [sys.executable, "-m", "tasks.serve.front", *files.args(), "--host", HOST, "--port", str(port),
                       "--threads", str(threads)]
            with tempfile.NamedTemporaryFile(prefix="requant-front-", suffix=".log", delete=False) as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=env, cwd=Path(__file__).resolve().parents[1], start_new_session=True)
            started.append((f"http://{HOST}:{port}", process, Path(log.name)))
        fronts: list[tuple[str, int] | Exception] = []
        for url, process, log_path in started:
            try:
                wait_for_ping(url, process, log_path, start_timeout_s, what="the serving front", poll_s=0.2)
                fronts.append((url, process.pid))
            except RequantError as exc:
                fronts.append(exc)
        yield fronts
    finally:
        for _, process, log_path in started:
            stop_group(process)
            log_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.serve.front", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="A downloaded requant serving model (MLflow model folder).")
    parser.add_argument("--onnx", help="The ONNX graph (with --tokenizer and --card instead of --model-dir).")
    parser.add_argument("--tokenizer")
    parser.add_argument("--card")
    parser.add_argument("--generator", action="store_true", help="The card is a generator card: serve a text generator.")
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core).")
    args = parser.parse_args(argv)
    try:
        if args.model_dir:
            files = served_files_of_mlflow_model(Path(args.model_dir))
        elif args.onnx and args.tokenizer and args.card:
            files = ServedFiles(Path(args.onnx), Path(args.tokenizer), Path(args.card),
                                "generator" if args.generator else "classifier")
        else:
            parser.error("pass --model-dir DIR, or --onnx, --tokenizer and --card")
        serve(files, args.host, args.port, args.threads)
    except (BadRequest, BadCard) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
