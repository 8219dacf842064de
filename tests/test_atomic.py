"""activations.atomic: the one atomic writer (old file kept on failure, no temp left, unique temps, fsync)."""

import os
import threading
from pathlib import Path

import pytest

from activations import atomic
from activations.atomic import temp_path, temp_target, write_atomic, write_bytes_atomic, write_text_atomic


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if temp_target(p) is not None)


def test_writes_replaces_and_makes_parents(tmp_path):
    path = tmp_path / "a" / "b" / "f.txt"
    assert write_text_atomic(path, "one \u00e9") == path
    assert path.read_text(encoding="utf-8") == "one \u00e9"
    write_bytes_atomic(path, b"two")
    assert path.read_bytes() == b"two" and leftovers(path.parent) == []


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.json"
    write_text_atomic(path, "old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("new but cut")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    with pytest.raises(KeyboardInterrupt):  # a kill-like interruption cleans up too
        write_atomic(path, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_new_files_get_the_umask_mode_whatever_the_writer_does(tmp_path):
    path = tmp_path / "w.bin"

    def private_writer(tmp: Path) -> None:  # as safetensors does: 0600
        tmp.write_bytes(b"x")
        os.chmod(tmp, 0o600)

    write_atomic(path, private_writer)
    probe = tmp_path / "probe"
    probe.touch()
    assert path.stat().st_mode == probe.stat().st_mode


def test_temp_names_are_unique_and_recognisable(tmp_path):
    target = tmp_path / "manifest.json"
    names = {temp_path(target) for _ in range(1000)}
    assert len(names) == 1000
    for name in list(names)[:5]:
        assert name.parent == tmp_path and str(os.getpid()) in name.name
        assert temp_target(name) == "manifest.json"
    for foreign in ("manifest.json", "manifest.json.tmp", ".x.tmp", ".a.b.tmp", "notes.txt",
                    ".manifest.json.12ab.x.tmp"):
        assert temp_target(tmp_path / foreign) is None, foreign


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    """Each writer has its own temp: every write lands whole, none fails on another's rename."""
    path = tmp_path / "shared.txt"
    contents = [f"writer {i}\n" * 20_000 for i in range(6)]
    errors = []

    def writer(text: str) -> None:
        try:
            for _ in range(15):
                write_text_atomic(path, text)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_text() in contents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.txt"]


def test_file_and_directory_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", recording_fsync)
    path = tmp_path / "f.txt"
    write_text_atomic(path, "x")
    assert len(synced) == 2
    assert ".tmp" in synced[0] and synced[1] == str(tmp_path)
