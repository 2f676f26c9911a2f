"""Held-out text for a decoder language model: WikiText-2 articles, fetched, hash-checked and cut into windows.

A candidate is judged per document (one Wikipedia article), on exactly the same tokens as FP32, so
the paired intervals of the decision are over articles. WikiText-2 (Merity et al. 2016, CC BY-SA 3.0)
is word-tokenized text in which every article opens with a top-level heading line ` = Title = `
(one `=` on each side); ` = = Section = = ` lines are sections and stay in their article.
valid.txt is for calibration and screening, test.txt for the decision; requant trains on neither.

No Prefect, MLflow or tokenizer library here: `windows` takes any Hugging Face-like tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.config.settings import TextDataSettings
from tasks.core.errors import DataError
from tasks.core.hashing import sha256_of
from tasks.data.fetch import (
    DOWNLOAD_TIMEOUT_S,
    DataFile,
    FetchResult,
    _join,
    fetch_file,
)

# The public source of the two files (unchanged there since 2017) and their pinned hashes.
WIKITEXT2_SOURCE = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2"
WIKITEXT2_SHA256 = {
    "valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}


@dataclass(frozen=True)
class Document:
    """One article: its title (heading markers removed) and its text.

    The text is the article as it stands in the file, its own heading and section headings included
    (as language-model evaluations on WikiText score it), one stripped line per paragraph, blank lines dropped.
    """

    title: str
    text: str


@dataclass(frozen=True)
class DocumentWindows:
    """The token windows scored for one document.

    `index` is the document's position in the list given to `windows`; each window is a 1-D int64
    array, the windows of a document consecutive and non-overlapping.
    """

    index: int
    title: str
    windows: list[np.ndarray] = field(default_factory=list)


def read_documents(path: Path, expected_sha256: str | None, limit: int | None = None) -> list[Document]:
    """Read a WikiText-format file into its articles, after checking its hash.

    Args:
        path: a WikiText-2 split (valid.txt or test.txt) or a file in the same format; a file without
            any top-level heading is one untitled document.
        expected_sha256: the pinned sha256 of the file; None skips the check.
        limit: return at most this many documents (the first ones); None returns all.

    Raises:
        DataError: one line: the file is missing or unreadable, its sha256 is not the pinned one, it
            is not UTF-8, or it holds no document (empty text).
    """
    path = Path(path)
    _require_text_file(path)
    if expected_sha256:
        actual = sha256_of(path)
        if actual != expected_sha256.lower():
            raise DataError(
                f"text file {path} has sha256 {actual}, expected {expected_sha256.lower()}: the file is altered or a "
                "different version; restore the original (WikiText-2 from pytorch/examples, see README, 'Data') "
                "or update the hash in params.yaml (text_data.calibration_sha256/evaluation_sha256)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = path.read_bytes().count(b"\n", 0, exc.start) + 1
        raise DataError(f"text file {path} is not UTF-8 (byte {exc.object[exc.start]:#04x} on line {line}): "
                        "re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from exc
    except OSError as exc:
        raise DataError(f"text file {path} cannot be read ({exc.strerror or exc}): check its permissions") from exc
    documents = _split_articles(lines)
    if not documents:
        raise DataError(f"text file {path} is empty evaluation text (no article in it): point "
                        "text_data.evaluation_txt/calibration_txt in params.yaml at WikiText-2's test.txt/valid.txt "
                        "or a file in its format (articles opened by ` = Title = ` lines)")
    return documents if limit is None else documents[:limit]


def _require_text_file(path: Path) -> None:
    # Not prepare.require_file: its hint names the CSV keys of `data`, and this file is set in `text_data`.
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise DataError(f"text file {path} {what}: set text_data.calibration_txt/evaluation_txt in params.yaml "
                        "to your copy, or run `requant fetch-data` (see README, 'Data')")


def _heading_title(line: str) -> str | None:
    """The title of a top-level heading line (` = Title = `), else None (sections are ` = = Title = = `)."""
    stripped = line.strip()
    if len(stripped) < 5 or not (stripped.startswith("= ") and stripped.endswith(" =")):
        return None
    title = stripped[2:-2].strip()
    if not title or title.startswith("=") or title.endswith("="):
        return None
    return title


def _split_articles(lines: list[str]) -> list[Document]:
    documents: list[Document] = []
    title, body = "", []

    def close() -> None:
        # An article is kept when it has a line besides its own heading.
        if any(_heading_title(line) is None for line in body):
            documents.append(Document(title, "\n".join(body)))

    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        heading = _heading_title(line)
        if heading is not None:
            close()
            title, body = heading, []
        body.append(line)
    close()
    return documents


def text_data_files(text: TextDataSettings) -> list[DataFile]:
    """The calibration and evaluation files with the URLs to try for each, the mirror first.

    The mirror holds the files under their configured names (`<mirror_url>/test.txt`); it may be an
    http(s) or file URL, or a local folder.
    """
    files = []
    for split, path, sha256 in (("calibration", text.calibration_txt, text.calibration_sha256),
                                ("evaluation", text.evaluation_txt, text.evaluation_sha256)):
        urls = []
        if text.mirror_url:
            urls.append(_join(text.mirror_url, Path(path).name))
        if split in text.source_urls:
            urls.append(text.source_urls[split])
        files.append(DataFile(split, Path(path), sha256, urls))
    return files


def ensure_text_data(text: TextDataSettings, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> list[FetchResult]:
    """Make sure both text files exist where params.yaml says, downloading a missing one.

    Sources are tried in order (mirror, then the public source); the first whose bytes have the
    pinned sha256 wins and is moved into place whole. A file already present is left alone (its hash
    is checked when it is read).

    Raises:
        DataError: one line, when a missing file cannot be fetched (no source configured, every source
            unreachable or serving bytes with another hash, or no pinned hash to check against); it
            names the file, its expected hash and the folder to put it in.
    """
    results = []
    for item in text_data_files(text):
        if item.path.is_file():
            results.append(FetchResult(item.split, item.path, None))
            continue
        results.append(FetchResult(item.split, item.path, fetch_file(item, timeout_s, section="text_data", what="text file")))
    return results


def windows(tokenizer, documents: list[Document], context_length: int, windows_per_document: int,
            min_tokens: int) -> list[DocumentWindows]:
    """Tokenize each document and cut it into the windows that are scored.

    The choice, so that FP32 and every candidate see the same tokens and every window is scored
    from the same starting state:

    - Each document is tokenized alone, without special tokens; when the tokenizer itself adds a
      BOS token (as Llama 2's does, not SmolLM2's), every window starts with that BOS, followed by
      `context_length - 1` text tokens; otherwise a window is `context_length` text tokens.
    - A document gives its first `windows_per_document` full windows, consecutive and
      non-overlapping, from its start; the tokens after them (a trailing partial window included)
      are not scored, so windows are of equal length and batch without padding.
    - A document with fewer text tokens than one window gives one shorter window of all its tokens;
      one with fewer than `min_tokens` text tokens is skipped.

    Args:
        tokenizer: a Hugging Face tokenizer (callable on a string, with `bos_token_id`).
        documents: the documents, in order; results keep their positions as `index`.
        context_length: tokens per window, BOS included.
        windows_per_document: windows per document at most.
        min_tokens: the fewest text tokens a document must have to be scored.

    Returns:
        One entry per document kept, in document order.
    """
    if context_length < 2 or windows_per_document < 1:
        raise ValueError(f"context_length must be >= 2 and windows_per_document >= 1 "
                         f"(got {context_length} and {windows_per_document})")
    bos = _added_bos(tokenizer)
    per_window = context_length - (bos is not None)
    result = []
    for index, document in enumerate(documents):
        ids = list(tokenizer(document.text, add_special_tokens=False)["input_ids"])
        if len(ids) < max(min_tokens, 1):
            continue
        count = min(windows_per_document, len(ids) // per_window) or 1
        prefix = [] if bos is None else [bos]
        cut = [np.asarray(prefix + ids[i * per_window:(i + 1) * per_window], dtype=np.int64) for i in range(count)]
        result.append(DocumentWindows(index, document.title, cut))
    return result


def _added_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer adds one by itself, else None (SEP/CLS/EOS are never added)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    return int(bos) if ids and ids[0] == bos else None
