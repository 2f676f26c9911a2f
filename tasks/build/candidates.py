"""Build one candidate from its recipe into a content-addressed folder and prove it (or say why not)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tasks.build.reference import Reference
from tasks.config.settings import CandidateSpec
from tasks.core.hashing import sha256_of
from tasks.core.locking import exclusive
from tasks.models.graph import file_size_mb, onnx_session, prove_candidate
from tasks.recipes.base import config_hash, parse_config, recipe_class

log = logging.getLogger("requant")

PROOF_FILE = "proof.json"


@dataclass
class BuiltCandidate:
    """A candidate's ONNX file and the proof that it is what it claims, or why building failed."""

    name: str
    recipe: str
    precision: str
    config: dict
    config_hash: str
    model_path: Path | None = None
    lowered_nodes: int = 0
    size_ratio: float = 0.0
    build_seconds: float = 0.0
    reused: bool = False
    # Which host and process built it: with a Dask runner, a worker, not the flow's process.
    built_by: str = ""
    error: str | None = None
    model_sha256: str = ""
    # The model behind the production alias, fetched from the registry to be measured side by side.
    is_production: bool = False
    # Why a cached build was not reused (it failed verification), for the record.
    rebuilt_because: str | None = None
    started_at_ms: int = 0  # when work on this candidate started (its MLflow run starts then)


def now_ms() -> int:
    """Wall-clock time in ms, as MLflow stamps runs."""
    return int(time.time() * 1000)


def one_line(exc: BaseException) -> str:
    """An exception as one line for a record: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def candidate_folder(work_dir: Path, recipe: str, digest: str) -> Path:
    """Where a candidate with this content address is built (shared by every run and source model)."""
    return Path(work_dir) / "candidates" / f"{recipe}-{digest}"


def build_candidate(spec: CandidateSpec, reference: Reference, source_digest: str, work_dir: Path) -> BuiltCandidate:
    """Run the candidate's recipe into a content-addressed folder, then prove the result.

    A folder that already holds a proven model for the same content address is reused, after a
    check that it is still what was proven (the file's sha256, and a real batch through ONNX
    Runtime): a truncated, swapped or otherwise unsound cached model is rebuilt, never measured.
    Builds of the same address are serialised by a file lock (two runs, or two specs with the same
    config in one batch). Failures are returned, not raised, so one broken recipe does not stop the others.
    """
    cls = recipe_class(spec.recipe)
    config = parse_config(spec.recipe, spec.config, spec.name)
    digest = config_hash(spec.recipe, config, source_digest, reference.inputs.calibration_digest())
    built = BuiltCandidate(spec.name, spec.recipe, cls.precision, config.model_dump(mode="json"), digest,
                           built_by=f"{socket.gethostname()}:{os.getpid()}", started_at_ms=now_ms())
    out_dir = candidate_folder(work_dir, spec.recipe, digest)
    with exclusive(out_dir.parent / ".locks", out_dir.name):
        unsound = _verify_cached(out_dir, reference)
        if unsound is None:
            proof = json.loads((out_dir / PROOF_FILE).read_text())
            built.model_path, built.lowered_nodes, built.size_ratio = out_dir / "model.onnx", proof["lowered_nodes"], proof["size_ratio"]
            built.model_sha256, built.reused = proof["sha256"], True
            return built
        if unsound != "not built yet":
            log.warning("cached candidate %s is unsound (%s); rebuilding it", out_dir.name, unsound)
            built.rebuilt_because = unsound
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            model_path = cls().run(reference.inputs, config, out_dir)
            proof = prove_candidate(model_path, file_size_mb(reference.inputs.fp32_model), reference.proof_feeds,
                                    must_lower_precision=cls.lowers_precision)
        except Exception as exc:  # a recipe may fail in onnxruntime internals; record why and go on
            built.error = one_line(exc)
            return built
        built.build_seconds = time.perf_counter() - start
        built.model_path, built.lowered_nodes, built.size_ratio = model_path, proof.lowered_nodes, proof.size_ratio
        built.model_sha256 = sha256_of(model_path)
        # Written last: its presence means the folder holds a finished, proven candidate.
        (out_dir / PROOF_FILE).write_text(json.dumps({**asdict(proof), "sha256": built.model_sha256,
                                                      "file": model_path.name}))
    return built


def _verify_cached(out_dir: Path, reference: Reference) -> str | None:
    """None when the cached candidate is sound, else why not."""
    proof_path, model_path = out_dir / PROOF_FILE, out_dir / "model.onnx"
    if not proof_path.is_file():
        return "not built yet"
    try:
        proof = json.loads(proof_path.read_text())
        expected = proof["sha256"]
    except (ValueError, KeyError) as exc:
        return f"unreadable proof ({one_line(exc)})"
    if not model_path.is_file():
        return "model.onnx is missing"
    if sha256_of(model_path) != expected:
        return "model.onnx does not match the sha256 recorded when it was proven"
    try:
        logits = onnx_session(model_path, 1).run(["logits"], reference.proof_feeds[0])[0]
    except Exception as exc:  # onnxruntime raises its own exception types
        return f"ONNX Runtime cannot run it ({one_line(exc)})"
    if not np.isfinite(logits).all():
        return "its outputs are not finite"
    return None
