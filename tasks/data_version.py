"""Reproduce the DVC data stage and read the version DVC recorded for its outputs."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.errors import DataError

STAGE = "prepare_data"


@dataclass(frozen=True)
class DataVersion:
    """The prepared sets and the DVC hashes that identify them."""

    calibration_path: Path
    evaluation_path: Path
    calibration_md5: str
    evaluation_md5: str

    @property
    def version(self) -> str:
        """One id for the pair, recorded with every MLflow run."""
        return hashlib.sha256(f"{self.calibration_md5}:{self.evaluation_md5}".encode()).hexdigest()[:16]


def reproduce(project_dir: Path, output_dir: Path) -> DataVersion:
    """Run `dvc repro prepare_data` (a no-op when nothing changed) and read dvc.lock.

    DVC holds one lock per workspace and a second `dvc repro` fails on it (dvc#10465), so runs on
    the same project wait for each other here instead.

    Raises:
        DataError: not a DVC project, or the stage failed (its last error line is quoted).
    """
    project_dir = Path(project_dir).resolve()
    if not (project_dir / "dvc.yaml").is_file() or not (project_dir / ".dvc").is_dir():
        raise DataError(
            f"{project_dir} is not a DVC project (needs dvc.yaml and .dvc/): run from the requant project root "
            "or pass --project; a fresh clone needs `dvc init` only if .dvc/ is missing"
        )
    env = dict(os.environ)
    # The stage's `python` must be this interpreter, with requant installed.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    lock_path = project_dir / ".dvc" / "tmp" / "requant-repro.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run([sys.executable, "-m", "dvc", "repro", STAGE], cwd=project_dir, env=env,
                              capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "unknown")
        raise DataError(f"`dvc repro {STAGE}` failed: {reason.removeprefix('error: ').strip()}")
    return read_lock(project_dir, output_dir)


def read_lock(project_dir: Path, output_dir: Path) -> DataVersion:
    """Read the md5s that dvc.lock records for the prepared calibration and evaluation sets."""
    lock = yaml.safe_load((Path(project_dir) / "dvc.lock").read_text())
    outs = {Path(project_dir, o["path"]).resolve(): o["md5"] for o in lock["stages"][STAGE]["outs"]}
    calibration, evaluation = (Path(output_dir).resolve() / name for name in ("calibration.csv", "evaluation.csv"))
    missing = [str(p) for p in (calibration, evaluation) if p not in outs]
    if missing:
        raise DataError(f"dvc.lock records no output {missing}: data.output_dir in params.yaml and dvc.yaml disagree")
    return DataVersion(calibration, evaluation, outs[calibration], outs[evaluation])
