"""Get the labelled CSVs onto a fresh machine: from a local mirror, else the dataset's public source.

`requant fetch-data` (and so `make run`) calls `ensure_data` before anything reads the data. A file
that is already where params.yaml says is left alone (its hash is checked later, by data_prep). A
missing one is downloaded next to where it belongs, checked against the pinned sha256, and only
then moved into place: a tampered or truncated download never lands. Offline, or with nothing
configured, the error says where to put the files by hand.

No Prefect or MLflow here: this runs before either is needed.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tasks.config.settings import DataSettings
from tasks.core.errors import DataError
from tasks.core.hashing import sha256_of

DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DataFile:
    """One split: where it belongs, the hash it must have, and where it can be fetched from."""

    split: str  # "train" or "test"
    path: Path
    sha256: str | None
    urls: list[str]


@dataclass(frozen=True)
class FetchResult:
    """What `ensure_data` did for one split."""

    split: str
    path: Path
    fetched_from: str | None  # None: the file was already there


def data_files(data: DataSettings) -> list[DataFile]:
    """The train and test files with the URLs to try for each, the mirror first.

    The mirror holds the files under their configured names (`<mirror_url>/train.csv`); it may be
    an http(s) or file URL, or a local folder.
    """
    files = []
    for split, path, sha256 in (("train", data.train_csv, data.train_sha256), ("test", data.test_csv, data.test_sha256)):
        urls = []
        if data.mirror_url:
            urls.append(_join(data.mirror_url, Path(path).name))
        if split in data.source_urls:
            urls.append(data.source_urls[split])
        files.append(DataFile(split, Path(path), sha256, urls))
    return files


def ensure_data(data: DataSettings, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> list[FetchResult]:
    """Make sure both CSVs exist where params.yaml says, downloading a missing one.

    Sources are tried in order (mirror, then the public source); the first whose bytes have the
    pinned sha256 wins. A source that answers with other bytes is refused and the next is tried.

    Raises:
        DataError: one line, when a missing file cannot be fetched (no source configured, every
            source unreachable or serving bytes with another hash, or no pinned hash to check against);
            it names the file, its expected hash and the folder to put it in.
    """
    results = []
    for item in data_files(data):
        if item.path.is_file():
            results.append(FetchResult(item.split, item.path, None))
            continue
        results.append(FetchResult(item.split, item.path, fetch_file(item, timeout_s)))
    return results


def fetch_file(item: DataFile, timeout_s: float, section: str = "data", what: str = "data file") -> str:
    """Download a missing file from its mirror or sources, keep it only with its pinned sha256; return the URL.

    Args:
        section: the params.yaml section the file is configured in (`data`, `text_data`), named in errors.
        what: what the file is, for errors ("data file", "text file").

    Raises:
        DataError: no source or no pinned hash configured, or no source served the file with its hash.
    """
    by_hand = (f"put {item.path.name}" + (f" (sha256 {item.sha256})" if item.sha256 else "") +
               f" in {item.path.parent}, or set {section}.mirror_url in params.yaml to a folder or URL that holds it")
    if not item.urls:
        raise DataError(f"{what} {item.path} not found and no {section}.mirror_url or {section}.source_urls.{item.split} "
                        f"is configured: {by_hand}")
    if not item.sha256:
        raise DataError(f"{what} {item.path} not found, and {section}.{item.split}_sha256 is null, so a download "
                        f"could not be checked: pin the hash in params.yaml, or {by_hand}")
    item.path.parent.mkdir(parents=True, exist_ok=True)
    partial = item.path.with_name(f".{item.path.name}.partial")
    problems = []
    for url in item.urls:
        try:
            _download(url, partial, timeout_s)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            problems.append(f"{url}: {_reason(exc)}")
            continue
        actual = sha256_of(partial)
        if actual == item.sha256.lower():
            os.replace(partial, item.path)  # atomic: the file appears whole or not at all
            return url
        problems.append(f"{url}: sha256 {actual[:12]}..., expected {item.sha256[:12]}... (refused)")
    partial.unlink(missing_ok=True)
    raise DataError(f"{what} {item.path} not found and could not be fetched ({'; '.join(problems)}): {by_hand}")


def _download(url: str, dst: Path, timeout_s: float) -> None:
    if "://" not in url:  # a local folder mirror
        shutil.copyfile(url, dst)
        return
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https", "file"):
        raise ValueError(f"unsupported URL scheme '{scheme}'")
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(dst, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def _join(base: str, name: str) -> str:
    if "://" not in base:
        return str(Path(base).expanduser() / name)
    return base.rstrip("/") + "/" + urllib.parse.quote(name)


def _reason(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    return str(exc) or type(exc).__name__
