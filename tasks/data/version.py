"""Reproduce the DVC data stage and read the version DVC recorded for its outputs.

`dvc.yaml`'s `prepare_data` stage reads the project's `params.yaml` (DVC's default params file).
A run given another params file (`requant run --params other.yaml`) gets a stage of its own that
reads that file: `stages/other/dvc.yaml`, written here, with its own `stages/other/dvc.lock`. So
each params file's data is prepared from its own `data` section and versioned by DVC, and
`dvc repro` (the stages of the top-level dvc.yaml) is unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.core.errors import DataError

STAGE = "prepare_data"
DEFAULT_PARAMS = "params.yaml"
# Stages for params files other than params.yaml: stages/<params file without suffix>/dvc.yaml.
GENERATED_STAGES = "stages"
CALIBRATION_FILE, EVALUATION_FILE = "calibration.csv", "evaluation.csv"


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


def reproduce(project_dir: Path, output_dir: Path, params_path: Path | None = None) -> DataVersion:
    """Run `dvc repro` on the data stage that reads `params_path` (a no-op when nothing changed) and read its lock.

    The project's params.yaml is read by dvc.yaml's `prepare_data`; any other params file gets its
    own stage (see the module docstring). DVC holds one lock per workspace and a second
    `dvc repro` fails on it (dvc#10465), so runs on the same project wait for each other here instead.

    Args:
        project_dir: the DVC project (dvc.yaml and .dvc/).
        output_dir: data.output_dir of the params file (absolute, as load_settings resolves it).
        params_path: the params file the run was given; None means the project's params.yaml.

    Raises:
        DataError: not a DVC project, the params file lies outside it or shares its output folder
            with another stage, or the stage failed (the stage's own one-line error is quoted).
    """
    project_dir = Path(project_dir).resolve()
    if not (project_dir / "dvc.yaml").is_file() or not (project_dir / ".dvc").is_dir():
        raise DataError(
            f"{project_dir} is not a DVC project (needs dvc.yaml and .dvc/): run from the requant project root "
            "or pass --project; a fresh clone needs `dvc init` only if .dvc/ is missing"
        )
    params_path = Path(params_path).resolve() if params_path else project_dir / DEFAULT_PARAMS
    env = dict(os.environ)
    # The stage's `python` must be this interpreter, with requant installed.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    lock_path = project_dir / ".dvc" / "tmp" / "requant-repro.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _check_inputs(params_path)
        created = False
        if params_path == (project_dir / DEFAULT_PARAMS).resolve():
            dvcfile, target = project_dir / "dvc.yaml", STAGE
        else:
            created = not _generated_dvcfile(project_dir, params_path).is_file()
            dvcfile = write_params_stage(project_dir, params_path)
            target = f"{dvcfile.relative_to(project_dir)}:{STAGE}"
        done = subprocess.run([sys.executable, "-m", "dvc", "repro", target], cwd=project_dir, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0 and created:
            # A stage that never produced anything is not kept: the project stays as it was.
            _remove_generated(project_dir, dvcfile)
    if done.returncode != 0:
        raise DataError(f"`dvc repro {target}` failed: {stage_failure(done.stderr, done.stdout)}")
    return read_lock(project_dir, output_dir, dvcfile)


def reproduce_for_params(params_path: Path | str, project_dir: Path | str | None = None) -> DataVersion:
    """The prepared data of `params_path`, resolved as `requant run --params` resolves it.

    The flow and every tool that takes `--params` (benchmarks included) go through here or through
    `reproduce` with the same arguments, so `--params other.yaml` reads `stages/other/`'s data and
    lock, never the root `dvc.lock` of params.yaml.

    Args:
        params_path: the params file given on the command line.
        project_dir: the DVC project; default: the folder of `params_path` (as `requant run`).

    Raises:
        DataError: as `reproduce`.
    """
    from tasks.config.loading import load_settings

    params_path = Path(params_path).resolve()
    project = Path(project_dir).resolve() if project_dir else params_path.parent
    return reproduce(project, load_settings(params_path).data.output_dir, params_path)


def write_params_stage(project_dir: Path, params_path: Path) -> Path:
    """Write (or refresh) the `prepare_data` stage that reads `params_path`; return its dvc.yaml.

    Paths are written out, not templated with `vars:`: a dvc.yaml whose vars file is gone breaks
    every `dvc` command in the repository, and requant rewrites this file on each run anyway.

    Raises:
        DataError: the params file lies outside the project, or its data.output_dir is another stage's.
    """
    from tasks.config.loading import load_settings

    try:
        relative_params = params_path.relative_to(project_dir)
    except ValueError:
        raise DataError(
            f"params file {params_path} lies outside the DVC project {project_dir}: DVC tracks params files "
            "inside the project only; move it there or pass --project"
        ) from None
    data = load_settings(params_path).data
    dvcfile = _generated_dvcfile(project_dir, params_path)
    outs = [data.output_dir / CALIBRATION_FILE, data.output_dir / EVALUATION_FILE]
    _refuse_shared_outputs(project_dir, dvcfile, outs, relative_params)
    main = yaml.safe_load((project_dir / "dvc.yaml").read_text())["stages"][STAGE]
    # The code the stage runs: dvc.yaml's deps that are not templated from params.yaml.
    code = [d for d in main.get("deps", []) if isinstance(d, str) and "${" not in d]

    def rel(path: Path) -> str:
        return os.path.relpath(path, project_dir)

    stage = {
        "wdir": os.path.relpath(project_dir, dvcfile.parent),
        "cmd": f"python -m tasks.data.prepare --params {relative_params}",
        "deps": code + [rel(data.train_csv), rel(data.test_csv)],
        "params": [{str(relative_params): ["data"]}],
        "outs": [rel(path) for path in outs],
    }
    text = (f"# Written by `requant run --params {relative_params}`: the {STAGE} stage of that params file\n"
            f"# (dvc.yaml's reads params.yaml). requant rewrites it on every such run; its lock is dvc.lock here.\n"
            + yaml.safe_dump({"stages": {STAGE: stage}}, sort_keys=False))
    if not dvcfile.is_file() or dvcfile.read_text() != text:
        dvcfile.parent.mkdir(parents=True, exist_ok=True)
        partial = dvcfile.with_name(".dvc.yaml.partial")
        partial.write_text(text)
        partial.replace(dvcfile)  # atomic: a concurrent `dvc` never reads half a file
    return dvcfile


def _generated_dvcfile(project_dir: Path, params_path: Path) -> Path:
    relative = params_path.relative_to(project_dir) if params_path.is_relative_to(project_dir) else Path(params_path.name)
    return project_dir / GENERATED_STAGES / relative.with_suffix("") / "dvc.yaml"


def _remove_generated(project_dir: Path, dvcfile: Path) -> None:
    for path in (dvcfile, dvcfile.with_name("dvc.lock"), dvcfile.with_name(".gitignore")):
        path.unlink(missing_ok=True)
    folder = dvcfile.parent
    while folder != project_dir and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def _refuse_shared_outputs(project_dir: Path, dvcfile: Path, outs: list[Path], relative_params: Path) -> None:
    # Two stages declaring one output make DVC refuse every command in the repository, so the
    # generated stage is never written over another stage's outputs.
    from dvc.repo import Repo

    try:
        with Repo(str(project_dir)) as repo:
            taken = {Path(out.fs_path).resolve(): f"{os.path.relpath(stage.path, project_dir)}:{stage.name}" for stage in repo.index.stages
                     if Path(stage.path).resolve() != dvcfile.resolve() for out in stage.outs}
    except Exception:  # noqa: BLE001 - a broken index is reported by `dvc repro` itself, in one line
        return
    for path in outs:
        owner = taken.get(path.resolve()) or next(
            (name for out, name in taken.items() if out in path.resolve().parents or path.resolve() in out.parents), None)
        if owner:
            raise DataError(
                f"{relative_params}: data.output_dir {os.path.relpath(path.parent, project_dir)} is where DVC stage "
                f"'{owner}' writes: give {relative_params.name} its own data.output_dir (e.g. "
                f"data/prepared-{relative_params.stem}) so each params file's data is versioned apart"
            )


def _check_inputs(params_path: Path) -> None:
    # DVC refuses a missing dependency with a bare OS error before the stage runs; say which key to fix.
    from tasks.config.loading import load_settings
    from tasks.data.prepare import require_file

    data = load_settings(params_path).data
    for path in (data.train_csv, data.test_csv):
        require_file(path)


def stage_failure(stderr: str, stdout: str = "") -> str:
    """The one line that says why `dvc repro` failed.

    In order: the stage's own `error: ...` line (tasks.data.prepare prints one for every input it
    refuses), the last line of a Python traceback the stage died with, DVC's own `ERROR:` line.
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        raised = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b", line)]
        if raised:
            return f"the stage raised {raised[-1]}"
    for line in reversed(lines):
        if line.startswith("ERROR: "):
            return line.removeprefix("ERROR: ")
    tail = [line.strip() for line in stdout.splitlines() if line.strip()]
    return (lines or tail or ["no output"])[-1]


def read_lock(project_dir: Path, output_dir: Path, dvcfile: Path | None = None) -> DataVersion:
    """Read the md5s that a stage's lock records for the prepared calibration and evaluation sets.

    Args:
        project_dir: the DVC project.
        output_dir: where the stage wrote calibration.csv and evaluation.csv.
        dvcfile: the stage's dvc.yaml (default: the project's); its dvc.lock lies beside it.
    """
    dvcfile = Path(dvcfile) if dvcfile else Path(project_dir) / "dvc.yaml"
    definition = yaml.safe_load(dvcfile.read_text())["stages"][STAGE]
    wdir = (dvcfile.parent / definition.get("wdir", ".")).resolve()
    lock = yaml.safe_load((dvcfile.parent / "dvc.lock").read_text())
    outs = {(wdir / o["path"]).resolve(): o["md5"] for o in lock["stages"][STAGE]["outs"]}
    calibration, evaluation = (Path(output_dir).resolve() / name for name in (CALIBRATION_FILE, EVALUATION_FILE))
    missing = [str(p) for p in (calibration, evaluation) if p not in outs]
    if missing:
        raise DataError(f"{dvcfile.parent / 'dvc.lock'} records no output {missing}: data.output_dir in the params file and {dvcfile.name} disagree")
    return DataVersion(calibration, evaluation, outs[calibration], outs[evaluation])
