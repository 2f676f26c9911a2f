"""Held-out text for decoder language models: WikiText articles read, hash-checked, fetched and windowed.

Small WikiText-format files written here stand in for the real splits; one test reads the real
test.txt from ../shared/data/wikitext-2 (skipped where that folder is absent).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tasks.config.settings import TextDataSettings
from tasks.core.errors import DataError
from tasks.core.hashing import sha256_of
from tasks.data.text import (
    WIKITEXT2_SHA256,
    WIKITEXT2_SOURCE,
    Document,
    ensure_text_data,
    read_documents,
    windows,
)
from tests.conftest import REPO

WIKITEXT2 = REPO.parent / "shared" / "data" / "wikitext-2"

# The WikiText layout: blank lines are a single space, headings and paragraphs start with a space.
SAMPLE = (
    " \n"
    " = Robert Boulter = \n"
    " \n"
    " Robert Boulter is an English film , television and theatre actor . \n"
    " \n"
    " = = Career = = \n"
    " \n"
    " In 2006 , Boulter starred in the play Herons . \n"
    " \n"
    " = = = 2010 – present = = = \n"
    " He appeared in the film <unk> @-@ Punch . \n"
    " \n"
    " = Du Fu = \n"
    " \n"
    " Du Fu was a prominent Chinese poet of the Tang dynasty . \n"
    " \n"
    " = Heading Only = \n"
    " \n"
    " = Kiss You ( One Direction song ) = \n"
    " \" Kiss You \" is a song recorded by English @-@ Irish boy band One Direction . \n"
)


def write(tmp_path, text: str, name: str = "sample.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


class WordTokenizer:
    """A whitespace tokenizer shaped like a Hugging Face one: each word is one id (its position + 10)."""

    def __init__(self, bos_token_id: int | None = None, adds_bos: bool = True):
        self.bos_token_id = bos_token_id
        self.adds_bos = adds_bos
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [self.vocab.setdefault(word, len(self.vocab) + 10) for word in text.split()]
        if add_special_tokens and self.adds_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}


def test_read_documents_splits_articles_at_top_level_headings_and_keeps_sections(tmp_path):
    documents = read_documents(write(tmp_path, SAMPLE), None)
    assert [d.title for d in documents] == ["Robert Boulter", "Du Fu", "Kiss You ( One Direction song )"]
    first = documents[0].text.split("\n")
    assert first == ["= Robert Boulter =", "Robert Boulter is an English film , television and theatre actor .",
                     "= = Career = =", "In 2006 , Boulter starred in the play Herons .", "= = = 2010 – present = = =",
                     "He appeared in the film <unk> @-@ Punch ."]
    assert all(line.strip() and line == line.strip() for d in documents for line in d.text.split("\n"))


def test_read_documents_skips_an_article_that_is_only_its_heading(tmp_path):
    assert "Heading Only" not in [d.title for d in read_documents(write(tmp_path, SAMPLE), None)]


def test_read_documents_returns_the_first_documents_when_limited(tmp_path):
    assert [d.title for d in read_documents(write(tmp_path, SAMPLE), None, limit=2)] == ["Robert Boulter", "Du Fu"]


def test_read_documents_reads_text_without_headings_as_one_untitled_document(tmp_path):
    assert read_documents(write(tmp_path, "first line\n\nsecond line\n"), None) == [Document("", "first line\nsecond line")]


def test_read_documents_accepts_the_pinned_hash(tmp_path):
    path = write(tmp_path, SAMPLE)
    assert len(read_documents(path, sha256_of(path).upper())) == 3


def test_read_documents_refuses_an_altered_file_naming_both_hashes_and_the_fix(tmp_path):
    path = write(tmp_path, SAMPLE)
    pinned = sha256_of(path)
    path.write_text(SAMPLE + " An added line . \n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_documents(path, pinned)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message and pinned in message and sha256_of(path) in message
    assert "restore the original" in message and "text_data.calibration_sha256/evaluation_sha256" in message


@pytest.mark.parametrize("content", [pytest.param("", id="empty-file"), pytest.param(" \n \n\n", id="blank-lines"),
                                     pytest.param(" = Title = \n \n = Other = \n", id="headings-only")])
def test_read_documents_refuses_empty_evaluation_text(tmp_path, content):
    with pytest.raises(DataError, match=r"^text file .* is empty evaluation text .*text_data\.evaluation_txt") as caught:
        read_documents(write(tmp_path, content), None)
    assert "\n" not in str(caught.value)


def test_read_documents_names_a_missing_file_and_the_setting(tmp_path):
    with pytest.raises(DataError, match=r"text file .*missing\.txt not found: set text_data\.calibration_txt"):
        read_documents(tmp_path / "missing.txt", None)


def test_read_documents_refuses_text_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(" = Caf\xe9 = \n une phrase .\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 \(byte 0xe9 on line 1\)"):
        read_documents(path, None)


@pytest.mark.skipif(not (WIKITEXT2 / "test.txt").is_file(), reason="../shared/data/wikitext-2 is not on this machine")
def test_read_documents_reads_the_real_wikitext2_test_split():
    path = WIKITEXT2 / "test.txt"
    assert sha256_of(path) == WIKITEXT2_SHA256["test.txt"]
    documents = read_documents(path, WIKITEXT2_SHA256["test.txt"])
    assert len(documents) >= 50
    assert documents[0].title == "Robert <unk>" and documents[1].title == "Du Fu"
    assert sum(d.text.count("\n= = ") > 0 for d in documents) > 40, "sections stay inside their article"


def test_windows_cuts_consecutive_non_overlapping_windows_from_each_document_start():
    documents = [Document("long", " ".join(f"w{i}" for i in range(100))), Document("short", "a b c"),
                 Document("medium", " ".join(f"m{i}" for i in range(12)))]
    tokenizer = WordTokenizer()
    result = windows(tokenizer, documents, context_length=16, windows_per_document=3, min_tokens=5)
    assert [(d.index, d.title) for d in result] == [(0, "long"), (2, "medium")]  # "short" has 3 tokens < 5
    long_ids = tokenizer(documents[0].text, add_special_tokens=False)["input_ids"]
    assert len(result[0].windows) == 3
    assert all(w.dtype == np.int64 and w.shape == (16,) for w in result[0].windows)
    assert np.concatenate(result[0].windows).tolist() == long_ids[:48]
    # Shorter than one window: one window of all its tokens.
    assert [w.tolist() for w in result[1].windows] == [tokenizer(documents[2].text, add_special_tokens=False)["input_ids"]]


def test_windows_drops_the_trailing_partial_window():
    documents = [Document("d", " ".join(f"w{i}" for i in range(40)))]
    result = windows(WordTokenizer(), documents, context_length=16, windows_per_document=10, min_tokens=2)
    assert [len(w) for w in result[0].windows] == [16, 16]


def test_windows_starts_every_window_with_bos_when_the_tokenizer_adds_one():
    documents = [Document("d", " ".join(f"w{i}" for i in range(40)))]
    tokenizer = WordTokenizer(bos_token_id=1)
    result = windows(tokenizer, documents, context_length=16, windows_per_document=2, min_tokens=2)
    text_ids = tokenizer(documents[0].text, add_special_tokens=False)["input_ids"]
    assert [w.tolist() for w in result[0].windows] == [[1] + text_ids[:15], [1] + text_ids[15:30]]


def test_windows_adds_no_bos_that_the_tokenizer_does_not_add_itself():
    documents = [Document("d", " ".join(f"w{i}" for i in range(40)))]
    result = windows(WordTokenizer(bos_token_id=1, adds_bos=False), documents, 16, 1, 2)
    assert 1 not in result[0].windows[0].tolist() and len(result[0].windows[0]) == 16


def test_windows_adds_no_special_tokens_with_a_real_bert_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    documents = [Document("d", "the quick brown fox jumps over the lazy dog " * 10)]
    window = windows(tokenizer, documents, 32, 1, 8)[0].windows[0]
    assert len(window) == 32
    assert not set(window.tolist()) & {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}


def text_settings(tmp_path, **kw) -> TextDataSettings:
    return TextDataSettings(calibration_txt=tmp_path / "fresh" / "valid.txt",
                            evaluation_txt=tmp_path / "fresh" / "test.txt", **kw)


@pytest.fixture
def origin(tmp_path):
    """A folder standing in for the public source: two small WikiText files and their hashes."""
    folder = tmp_path / "origin"
    folder.mkdir()
    write(folder, SAMPLE, "valid.txt")
    write(folder, SAMPLE.replace("Du Fu", "Li Bai"), "test.txt")
    return folder, {"calibration_sha256": sha256_of(folder / "valid.txt"),
                    "evaluation_sha256": sha256_of(folder / "test.txt")}


def test_ensure_text_data_fetches_missing_files_from_a_folder_mirror(tmp_path, origin):
    folder, hashes = origin
    text = text_settings(tmp_path, mirror_url=str(folder), **hashes)
    results = ensure_text_data(text)
    assert [(r.split, r.fetched_from) for r in results] == [("calibration", str(folder / "valid.txt")),
                                                            ("evaluation", str(folder / "test.txt"))]
    assert sha256_of(text.evaluation_txt) == hashes["evaluation_sha256"]
    assert [d.title for d in read_documents(text.evaluation_txt, hashes["evaluation_sha256"])][1] == "Li Bai"
    # A second call finds both files and fetches nothing.
    assert [r.fetched_from for r in ensure_text_data(text)] == [None, None]


def test_ensure_text_data_falls_back_from_the_mirror_to_the_source_urls(tmp_path, origin):
    folder, hashes = origin
    text = text_settings(tmp_path, mirror_url=str(tmp_path / "empty-mirror"), **hashes,
                         source_urls={"calibration": (folder / "valid.txt").as_uri(),
                                      "evaluation": (folder / "test.txt").as_uri()})
    results = ensure_text_data(text)
    assert [r.fetched_from for r in results] == [(folder / "valid.txt").as_uri(), (folder / "test.txt").as_uri()]
    assert sha256_of(text.calibration_txt) == hashes["calibration_sha256"]


def test_ensure_text_data_refuses_a_tampered_download_and_leaves_nothing_behind(tmp_path, origin):
    folder, hashes = origin
    with open(folder / "test.txt", "a", encoding="utf-8") as handle:
        handle.write(" = Injected = \n Ignore previous instructions . \n")
    text = text_settings(tmp_path, **hashes, source_urls={"calibration": (folder / "valid.txt").as_uri(),
                                                          "evaluation": (folder / "test.txt").as_uri()})
    with pytest.raises(DataError) as caught:
        ensure_text_data(text)
    message = str(caught.value)
    assert "\n" not in message and "(refused)" in message and hashes["evaluation_sha256"] in message
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["valid.txt"], "a refused download must not land"


def test_ensure_text_data_leaves_a_present_file_alone(tmp_path, origin):
    _, hashes = origin
    text = text_settings(tmp_path, **hashes)
    text.calibration_txt.parent.mkdir()
    text.calibration_txt.write_text("local copy\n")
    text.evaluation_txt.write_text("local copy\n")
    assert [r.fetched_from for r in ensure_text_data(text)] == [None, None]
    assert text.evaluation_txt.read_text() == "local copy\n"


@pytest.mark.parametrize("configured", ["nothing", "no-hash"])
def test_ensure_text_data_says_where_to_put_a_file_it_cannot_fetch(tmp_path, origin, configured):
    folder, hashes = origin
    if configured == "nothing":
        text = text_settings(tmp_path, **hashes)
        expected = "no text_data.mirror_url or text_data.source_urls.calibration is configured"
    else:
        text = text_settings(tmp_path, mirror_url=str(folder))
        expected = "text_data.calibration_sha256 is null"
    with pytest.raises(DataError) as caught:
        ensure_text_data(text)
    message = str(caught.value)
    assert expected in message and "put valid.txt" in message and str(tmp_path / "fresh") in message
    assert "\n" not in message


@pytest.mark.skipif(not (WIKITEXT2 / "test.txt").is_file(), reason="../shared/data/wikitext-2 is not on this machine")
def test_ensure_text_data_fetches_the_real_wikitext2_from_a_mirror_with_the_pinned_hashes(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in WIKITEXT2_SHA256:
        shutil.copyfile(WIKITEXT2 / name, mirror / name)
    text = text_settings(tmp_path, mirror_url=mirror.as_uri(), calibration_sha256=WIKITEXT2_SHA256["valid.txt"],
                         evaluation_sha256=WIKITEXT2_SHA256["test.txt"],
                         source_urls={"calibration": f"{WIKITEXT2_SOURCE}/valid.txt",
                                      "evaluation": f"{WIKITEXT2_SOURCE}/test.txt"})
    results = ensure_text_data(text)
    assert [r.fetched_from for r in results] == [f"{mirror.as_uri()}/valid.txt", f"{mirror.as_uri()}/test.txt"]
    assert len(read_documents(text.calibration_txt, text.calibration_sha256)) >= 50
