"""Guards for everything vsae reads or writes on a user's behalf: confined paths and one writer at a time.

A name that comes from data (a manifest's shard file, a sweep's or plan's run name, a figure path in eval.json)
is a plain name resolved inside its directory: never `..`, a separator, an absolute path, or a symlink leading
out. A directory vsae writes is held by an advisory `fcntl.flock` on `.NAME.lock` beside it (beside, because
runs and dashboards are replaced whole by rename); a second writer gets a one-line error naming the holder's PID,
and readers take a shared lock so they are refused while a writer replaces what they would read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path


class UnsafePathError(ValueError):
    """A path taken from data or a flag that would reach outside the directory it belongs to."""


class LockedError(RuntimeError):
    """Another vsae process is writing the directory."""


def plain_name(name: object, what: str) -> str:
    """`name` when it is a plain file or directory name; else an UnsafePathError naming `what`."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name or name != name.strip():
        raise UnsafePathError(f"{what} {name!r} is not a plain name (no separators, '..' or absolute paths); "
                              f"fix or regenerate the file that names it")
    return name


def inside(directory: str | Path, relative: object, what: str) -> Path:
    """`directory / relative` for a relative path of plain names that stays inside `directory` once symlinks are
    resolved (a name that does not exist yet is fine); else an UnsafePathError naming `what`."""
    if not isinstance(relative, str) or relative.startswith(("/", "\\")):
        raise UnsafePathError(f"{what} {relative!r} must be a relative path inside {directory}")
    for part in relative.split("/"):
        plain_name(part, what)
    base = Path(directory).resolve()
    path = base / relative
    if not path.resolve().is_relative_to(base):
        raise UnsafePathError(f"{what} {relative!r} leads outside {directory} (through a symlink)")
    return Path(directory) / relative


def lock_path(directory: str | Path) -> Path:
    """The lock file of a directory vsae writes: `.NAME.lock` in its parent.

    Symlinks and `..` are resolved first, so two spellings of one directory share one lock.
    """
    directory = Path(directory).resolve()
    return directory.parent / f".{directory.name}.lock"


def _holders(fd: int) -> str:
    """The PIDs holding a flock on the open file `fd`, from /proc/locks (Linux); else the PID the last writer
    left in the file. /proc/locks names readers too, whose PIDs the file never holds."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == dev and fields[4] not in pids:
                    pids.append(fields[4])
    except OSError:
        pass
    if not pids:
        pids = [os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"]
    return ", ".join(pids)


class DirLock:
    """`with DirLock(directory, "cache"):` holds an exclusive (writer) or shared (reader) lock on the directory.

    The lock is advisory (flock): it keeps vsae processes apart, and dies with the process that held it, so a
    killed run never leaves a stale lock behind.
    """

    def __init__(self, directory: str | Path, what: str, shared: bool = False) -> None:
        self.directory, self.what, self.shared = Path(directory), what, shared
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return lock_path(self.directory)

    def _open(self) -> int | None:
        """The lock file, opened (made when missing); None for a reader that can neither make nor open it."""
        # O_NOFOLLOW: a planted `.NAME.lock` symlink must not make the PID write below truncate another file;
        # O_NONBLOCK: nor may a planted FIFO make the open hang.
        try:
            if not self.shared:  # a reader makes no directories: it reads what exists
                self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePathError(f"lock file {self.path} is a symlink; remove it and rerun") from None
            if not self.shared:
                raise
        try:
            # A reader without write access still locks against a writer that made the file (flock needs no
            # write access).
            return os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePathError(f"lock file {self.path} is a symlink; remove it and rerun") from None
            return None  # no lock file and no right to make one: read unlocked, as before locks existed

    def __enter__(self) -> DirLock:
        for _ in range(5):
            fd = self._lock()
            if fd is None or self._still_named(fd):
                break
            os.close(fd)  # a writer finished and removed the file between our open and lock: lock the new one
        else:
            raise LockedError(f"the {self.what} {self.directory} keeps changing hands; rerun")
        if fd is not None and not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def _lock(self) -> int | None:
        fd = self._open()
        if fd is None:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePathError(f"lock file {self.path} is not a regular file; remove it and rerun")
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _holders(fd)
            os.close(fd)
            raise LockedError(f"the {self.what} {self.directory} is in use by another vsae process (PID {holder}); "
                              f"wait for it to finish or stop it, then rerun") from None
        return fd

    def _still_named(self, fd: int) -> bool:
        """Whether the lock file's path still names the file we locked (a releasing writer removes it)."""
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            if not self.shared and self._still_named(self._fd):
                # A writer leaves no lock file behind: removed while still held, so no one can lock it after
                # (anyone who opened it meanwhile sees it is no longer named and locks a fresh one).
                self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
