"""A full disk and a read-only folder are told apart, and the folder is named (tasks/core/write_errors.py).

The failures are real: a 1 MiB tmpfs that fills up, a read-only bind mount, a file-size limit.
Mounting needs root (CAP_SYS_ADMIN); elsewhere those tests skip and say why.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from tasks.config.loading import load_settings
from tasks.core.write_errors import describe_write_failure, run_folders
from tests.cli_helpers import requant
from tests.conftest import tiny_project


@contextmanager
def mounted(folder: Path, *commands: list[str]):
    """Run mount `commands` on `folder` (made first); unmount on the way out; skip where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            _unmount(folder)
            pytest.skip(f"cannot mount on {folder} here (needs root): {done.stderr.strip()}")
    try:
        yield folder
    finally:
        _unmount(folder)


def _unmount(folder: Path) -> None:
    while subprocess.run(["mountpoint", "-q", str(folder)]).returncode == 0:
        subprocess.run(["umount", str(folder)], check=True)


def full_tmpfs(folder: Path):
    """A 1 MiB tmpfs on `folder`: the first write of a real model fills it."""
    return mounted(folder, ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)])


def read_only(folder: Path):
    """`folder` bind-mounted read-only over itself (root ignores file modes, a mount it cannot)."""
    return mounted(folder, ["mount", "--bind", str(folder), str(folder)],
                   ["mount", "-o", "remount,bind,ro", str(folder)])


def failed_write(path: Path, size: int = 4 << 20) -> OSError:
    """Write `size` bytes to `path` in one `write()` (no file name on the error, as onnx.save's); return the error."""
    with pytest.raises(OSError) as raised:
        with open(path, "wb") as handle:
            handle.write(os.urandom(size))
    return raised.value


@pytest.fixture
def project(tmp_path, tiny_model_folder) -> Path:
    return tiny_project(tmp_path, tiny_model_folder)


def test_a_full_work_folder_is_named_and_called_full(project):
    settings = load_settings(project / "params.yaml")
    work = project / "models" / "work"
    with full_tmpfs(work):
        error = failed_write(work / "model.onnx")
        line = describe_write_failure(error, run_folders(settings, project))
    assert error.filename is None  # the folder comes from the filesystems, not from the error
    assert line == (f"the work folder {work} is full (No space left on device): free space there or point "
                    "--work-dir elsewhere, then run again")


def test_a_read_only_artifact_store_is_named_and_called_read_only(project):
    settings = load_settings(project / "params.yaml")
    store = Path(settings.registry.artifact_location)
    with read_only(store):
        with pytest.raises(OSError) as raised:
            (store / "0" / "meta.yaml").parent.mkdir(parents=True)
        line = describe_write_failure(raised.value, run_folders(settings, project))
    assert line.startswith(f"the artifact store {store} is read-only (Read-only file system): make it writable")
    assert "full" not in line


def test_a_file_size_limit_is_not_called_a_full_disk(project, tmp_path):
    # RLIMIT_FSIZE, in a child: the write fails with EFBIG (SIGXFSZ ignored, or it would kill the child).
    script = ("import os, resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n"
              "from tasks.config.loading import load_settings\n"
              "from tasks.core.write_errors import describe_write_failure, run_folders\n"
              "project = sys.argv[1]\n"
              "try:\n"
              "    with open(os.path.join(project, 'models', 'work', 'big.bin'), 'wb') as f:\n"
              "        f.write(b'x' * (1 << 20))\n"
              "except OSError as exc:\n"
              "    print(describe_write_failure(exc, run_folders(load_settings(project + '/params.yaml'), project)))\n")
    (project / "models" / "work").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-c", script, str(project)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # write() names no file, and no folder is full: the limit is the process's, and the line says so.
    assert done.stdout.strip() == ("a file grew past the file-size limit (File too large): raise the limit "
                                   "(`ulimit -f`), then run again")


def test_requant_run_with_a_full_work_folder_fails_in_one_line_naming_it(project, tmp_path, tiny_model_folder):
    work = tmp_path / "small-disk"
    with full_tmpfs(work):
        done, errors = requant("run", "--params", str(project / "params.yaml"), "--model", str(tiny_model_folder),
                               "--work-dir", str(work), timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert errors == [f"error: the work folder {work} is full (No space left on device): free space there or point "
                      "--work-dir elsewhere, then run again"], done.stderr[-3000:]


def test_a_decoders_run_folders_have_no_data_folder(project):
    # A decoder's params carry text_data, not data: the folders are still listed, so a write failure is named.
    settings = load_settings(project / "params.yaml").model_copy(update={"data": None})
    names = [folder.label for folder in run_folders(settings, project)]
    assert names[:3] == ["the work folder", "the source model folder", "the DVC cache"]
    assert "the data folder" not in names
    with_data = [folder.label for folder in run_folders(load_settings(project / "params.yaml"), project)]
    assert with_data[:4] == ["the work folder", "the source model folder", "the data folder", "the DVC cache"]
