import os
import subprocess
import sys

import pytest

from activations.guard import DirLock, LockedError, UnsafePathError, inside, lock_path, plain_name


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "/etc", "a\\b", " x", "x\0", None, 5])
def test_plain_name_refuses_anything_but_a_name(name):
    with pytest.raises(UnsafePathError, match="shard file"):
        plain_name(name, "shard file")


def test_inside_keeps_paths_in_their_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "outside.txt").write_text("x")
    assert inside(tmp_path / "d", "a/b.npy", "f") == tmp_path / "d" / "a" / "b.npy"
    for bad in ("../outside.txt", "/etc/passwd", "a/../../outside.txt"):
        with pytest.raises(UnsafePathError):
            inside(tmp_path / "d", bad, "f")
    (tmp_path / "d" / "link").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(UnsafePathError, match="symlink"):
        inside(tmp_path / "d", "link", "f")


def test_second_writer_is_refused_with_the_holders_pid(tmp_path):
    with DirLock(tmp_path / "c", "cache"):
        with pytest.raises(LockedError, match=f"cache .*c is in use by another vsae process \\(PID {os.getpid()}\\)"):
            DirLock(tmp_path / "c", "cache").__enter__()
    with DirLock(tmp_path / "c", "cache"):  # released on exit
        pass


def test_readers_share_and_exclude_a_writer(tmp_path):
    with DirLock(tmp_path / "c", "cache", shared=True), DirLock(tmp_path / "c", "cache", shared=True):
        with pytest.raises(LockedError, match=str(os.getpid())):
            DirLock(tmp_path / "c", "cache").__enter__()
    with DirLock(tmp_path / "c", "cache"):
        with pytest.raises(LockedError):
            DirLock(tmp_path / "c", "cache", shared=True).__enter__()


def test_holder_in_another_process_is_named(tmp_path):
    code = ("import sys, time; from activations.guard import DirLock\n"
            f"with DirLock({str(tmp_path / 'c')!r}, 'cache'):\n"
            "    print('held', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"PID {proc.pid}\\)"):
            DirLock(tmp_path / "c", "cache").__enter__()
    finally:
        proc.kill()
        proc.wait()
    with DirLock(tmp_path / "c", "cache"):  # a killed holder leaves no stale lock
        pass


def test_spellings_of_one_directory_share_one_lock(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "c")
    assert lock_path(tmp_path / "alias") == lock_path(tmp_path / "x" / ".." / "c") == tmp_path / ".c.lock"
    with DirLock(tmp_path / "c", "cache"):
        with pytest.raises(LockedError):
            DirLock(tmp_path / "alias", "cache").__enter__()


def test_planted_lock_files_are_neither_followed_nor_waited_on(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".c.lock").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symlink"):
        DirLock(tmp_path / "c", "cache").__enter__()
    with pytest.raises(UnsafePathError, match="symlink"):
        DirLock(tmp_path / "c", "cache", shared=True).__enter__()
    assert victim.read_text() == "precious"
    os.mkfifo(tmp_path / ".d.lock")
    for shared in (False, True):
        with pytest.raises(UnsafePathError, match="not a regular file"):
            DirLock(tmp_path / "d", "cache", shared=shared).__enter__()


def test_reader_makes_nothing_and_reads_without_write_access(tmp_path, monkeypatch):
    DirLock(tmp_path / "missing" / "c", "cache", shared=True).__enter__().__exit__()
    assert not (tmp_path / "missing").exists()  # a reader creates no directories
    lock_path(tmp_path / "c").touch()  # a lock file a killed writer left (a clean writer removes its own)
    real_open = os.open

    def read_only(path, flags, *args):  # a read-only directory, whoever runs the test
        if flags & (os.O_CREAT | os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with DirLock(tmp_path / "c", "cache", shared=True) as lock:  # the existing lock file, opened read-only
        assert lock._fd is not None
        monkeypatch.setattr(os, "open", real_open)
        with pytest.raises(LockedError):  # and it does lock out a writer
            DirLock(tmp_path / "c", "cache").__enter__()
        monkeypatch.setattr(os, "open", read_only)
    with DirLock(tmp_path / "other", "cache", shared=True) as lock:  # no lock file, no right to make one
        assert lock._fd is None
    with pytest.raises(PermissionError):  # a writer without write access is an error, not unlocked
        DirLock(tmp_path / "c", "cache").__enter__()


def test_a_writer_leaves_no_lock_file_and_a_reader_relocks_a_replaced_one(tmp_path):
    target = tmp_path / "run"
    with DirLock(target, "run"):
        assert lock_path(target).is_file()
    assert not lock_path(target).exists()
    reader = DirLock(target, "run", shared=True)
    with reader:
        first = os.fstat(reader._fd).st_ino
        lock_path(target).unlink()  # as a releasing writer does, between a reader's open and its lock
        lock_path(target).touch()
        assert not reader._still_named(reader._fd)
    with reader:
        assert os.fstat(reader._fd).st_ino != first and reader._still_named(reader._fd)
