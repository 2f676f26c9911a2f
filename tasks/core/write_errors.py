"""Why a write failed, in one line a user can act on: which folder, and whether it is full or read-only.

A full disk and a read-only mount need different fixes (free space, or make it writable), and the
folder named must be one the user knows and can move: the work folder, the artifact store, the
data folder. The error itself often does not say: `write()` failing with ENOSPC carries no file
name. Then each folder the run writes to is looked at (free space, mount flags) and the one that
shows the failure is named. No MLflow or Prefect here.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

FULL = {errno.ENOSPC, errno.EDQUOT}
TOO_LARGE = {errno.EFBIG}
READ_ONLY = {errno.EROFS}
DENIED = {errno.EACCES, errno.EPERM}
WRITE_ERRNOS = FULL | TOO_LARGE | READ_ONLY | DENIED
# Below this much free space (or with no free inodes) a filesystem counts as the full one: a failed
# write leaves at most a block or two behind.
NEARLY_FULL_BYTES = 1 << 20


@dataclass(frozen=True)
class RunFolder:
    """A folder a command writes to, as a user knows it.

    Attributes:
        label: what it is, e.g. "the work folder".
        path: where it is (it may not exist yet).
        move: how to put it elsewhere, e.g. "point --work-dir elsewhere".
    """

    label: str
    path: Path
    move: str


def run_folders(settings, project: Path, work_dir: Path | None = None) -> list[RunFolder]:
    """The folders `requant run` writes to, most written first (the first one that shows a failure is named).

    Args:
        settings: the loaded Settings (paths already absolute, as load_settings returns them).
        project: the DVC project folder.
        work_dir: the run's work folder; default PROJECT/models/work, as the flow's.
    """
    project = Path(project).resolve()
    folders = [RunFolder("the work folder", Path(work_dir or project / "models" / "work").resolve(),
                         "point --work-dir elsewhere"),
               RunFolder("the source model folder", project / "models" / "source", "run from a project on another disk"),
               RunFolder("the DVC cache", project / ".dvc" / "cache", "move it with `dvc cache dir`")]
    if settings.data is not None:  # a decoder's params have text_data instead: its files are only read
        folders.insert(2, RunFolder("the data folder", Path(settings.data.output_dir), "set data.output_dir elsewhere"))
    location = settings.registry.artifact_location
    if location and (location.startswith("file://") or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", location)):
        folders.append(RunFolder("the artifact store", Path(location.removeprefix("file://")),
                                 "set registry.artifact_location elsewhere"))
    uri = os.environ.get("MLFLOW_TRACKING_URI") or settings.registry.tracking_uri
    if uri.startswith("sqlite:///"):
        folders.append(RunFolder("the MLflow database's folder", Path(uri.removeprefix("sqlite:///")).parent,
                                 "set registry.tracking_uri elsewhere"))
    folders.append(RunFolder("the temporary folder", Path(tempfile.gettempdir()), "set TMPDIR elsewhere"))
    return folders


def describe_write_failure(exc: BaseException, folders: list[RunFolder] | tuple = ()) -> str | None:
    """One line for a write that failed because a folder is full, read-only or not ours; None for anything else.

    Examples:
        "the work folder /x/models/work is full (No space left on device): free space there or point
        --work-dir elsewhere, then run again"
        "the artifact store /x/mlartifacts is read-only (Read-only file system): make it writable or
        set registry.artifact_location elsewhere, then run again"
    """
    if not isinstance(exc, OSError) or exc.errno not in WRITE_ERRNOS:
        return None
    strerror = exc.strerror or os.strerror(exc.errno)
    folder = _folder_of(exc, folders)
    if folder is None and exc.errno in TOO_LARGE:
        # A file-size limit belongs to the process (or the filesystem's largest file), not to a full folder.
        return (f"a file grew past the file-size limit ({strerror}): raise the limit (`ulimit -f`), then run again")
    if folder is None:
        # Nothing points at a folder: list where to look rather than guess.
        where = "; ".join(f"{f.label} {f.path}" for f in folders) or "the folders the run writes to"
        return f"a write failed ({strerror}): {_state(exc.errno)} check {where}, then run again"
    where = f"{folder.label} {folder.path}"
    if exc.errno in FULL:
        return f"{where} is full ({strerror}): free space there or {folder.move}, then run again"
    if exc.errno in TOO_LARGE:
        return (f"{where} refused a file that large ({strerror}: a file-size limit, `ulimit -f`): raise the limit "
                f"or {folder.move}, then run again")
    if exc.errno in READ_ONLY:
        return f"{where} is read-only ({strerror}): make it writable or {folder.move}, then run again"
    return f"{where} is not writable by this user ({strerror}): make it writable or {folder.move}, then run again"


def _state(code: int) -> str:
    """The hint for an unnamed folder: what to look for."""
    if code in FULL:
        return "a disk is full;"
    if code in READ_ONLY:
        return "a folder is on a read-only file system;"
    return "a folder is not writable by this user;"


def _folder_of(exc: OSError, folders) -> RunFolder | None:
    """The folder the failed write went to: from the file name when the error has one, else the
    known folder whose filesystem shows the failure."""
    for name in (exc.filename, exc.filename2):
        if name:
            target = Path(os.fsdecode(name)).absolute()
            owners = [f for f in folders if target == f.path or f.path in target.parents]
            if owners:  # the innermost known folder: the work folder, not the project above it
                return max(owners, key=lambda f: len(f.path.parts))
            return RunFolder("the folder", _existing_folder(target), "choose a folder on another disk")
    return next((f for f in folders if _shows(exc.errno, f.path)), None)


def _existing_folder(path: Path) -> Path:
    """The nearest folder that exists at or above `path` (a file that failed to be written may not exist)."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return path


def _shows(code: int, path: Path) -> bool:
    """Whether the filesystem holding `path` shows failure `code` now: full, read-only, or not writable."""
    folder = _existing_folder(path)
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    if code in FULL:
        return stats.f_bavail * stats.f_frsize < NEARLY_FULL_BYTES or (stats.f_files > 0 and stats.f_favail == 0)
    if code in READ_ONLY:
        return bool(stats.f_flag & os.ST_RDONLY)
    if code in DENIED:
        return not os.access(folder, os.W_OK)
    return False  # a file-size limit is the process's, not a folder's
