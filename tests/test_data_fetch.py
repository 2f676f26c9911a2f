"""`requant fetch-data` on a fresh machine: the CSVs come from a mirror or the public source, checked.

A loopback HTTP server (python's http.server on 127.0.0.1, a free port) stands in for the public
source and serves the real Banking77 files, or a tampered copy that must be refused. "Offline" is a
closed port.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tasks.core.hashing import sha256_of
from tests.conftest import BANKING77, REPO
from tests.servers import HOST, free_port

PINNED = yaml.safe_load((REPO / "params.yaml").read_text())["data"]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def file_server(folder: Path) -> Iterator[str]:
    """Serve `folder` over HTTP on 127.0.0.1 (a thread of this process); yield its base URL."""
    server = ThreadingHTTPServer((HOST, 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def fetch_project(tmp_path: Path, **data) -> Path:
    """A params.yaml (the repo's, pinned hashes kept) whose CSVs live in a folder that does not exist yet."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update({"train_csv": "fresh/banking77/train.csv", "test_csv": "fresh/banking77/test.csv",
                           "mirror_url": None, **data})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def fetch_data(params: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "fetch-data", "--params", str(params)],
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=False)


def test_fetch_data_downloads_missing_csvs_from_the_public_source_and_checks_them(tmp_path):
    with file_server(BANKING77) as source:
        params = fetch_project(tmp_path, source_urls={"train": f"{source}/train.csv", "test": f"{source}/test.csv"})
        done = fetch_data(params)
    assert done.returncode == 0, done.stderr
    fresh = tmp_path / "fresh" / "banking77"
    assert sha256_of(fresh / "train.csv") == PINNED["train_sha256"]
    assert sha256_of(fresh / "test.csv") == PINNED["test_sha256"]
    assert f"fetched from {source}/train.csv (sha256 checked)" in done.stdout
    # A second run finds the files and fetches nothing (the server is gone by now).
    again = fetch_data(params)
    assert again.returncode == 0 and again.stdout.count(": present") == 2, again.stdout + again.stderr


def test_fetch_data_prefers_the_local_mirror(tmp_path):
    with file_server(BANKING77) as source:
        params = fetch_project(tmp_path, mirror_url=str(BANKING77),
                               source_urls={"train": f"{source}/nothing-here.csv", "test": f"{source}/nothing-here.csv"})
        done = fetch_data(params)
    assert done.returncode == 0, done.stderr
    assert f"fetched from {BANKING77 / 'train.csv'}" in done.stdout
    assert sha256_of(tmp_path / "fresh" / "banking77" / "test.csv") == PINNED["test_sha256"]


def test_fetch_data_refuses_a_tampered_download_and_leaves_nothing_behind(tmp_path):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in ("train.csv", "test.csv"):
        shutil.copyfile(BANKING77 / name, tampered / name)
    with open(tampered / "train.csv", "a") as handle:
        handle.write("transfer all my money to account 1234,top_up_by_card_charge\n")
    with file_server(tampered) as source:
        params = fetch_project(tmp_path, source_urls={"train": f"{source}/train.csv", "test": f"{source}/test.csv"})
        done = fetch_data(params)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert "refused" in done.stderr and PINNED["train_sha256"] in done.stderr
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "fresh" / "banking77").iterdir()), "a refused download must not land"


@pytest.mark.parametrize("source_urls", [
    pytest.param("closed-port", id="offline"),
    pytest.param({}, id="no-source-configured"),
])
def test_fetch_data_offline_says_where_to_put_the_files(tmp_path, source_urls):
    if source_urls == "closed-port":
        port = free_port()  # nothing listens there: connection refused, as offline
        source_urls = {"train": f"http://{HOST}:{port}/train.csv", "test": f"http://{HOST}:{port}/test.csv"}
    done = fetch_data(fetch_project(tmp_path, source_urls=source_urls))
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert f"put train.csv (sha256 {PINNED['train_sha256']}) in {tmp_path / 'fresh' / 'banking77'}" in lines[0]


def test_repo_params_pin_the_public_banking77_source():
    urls = PINNED["source_urls"]
    for split in ("train", "test"):
        assert urls[split].endswith(f"PolyAI-LDN/task-specific-datasets/master/banking_data/{split}.csv"), urls
    assert sha256_of(BANKING77 / "train.csv") == PINNED["train_sha256"]
