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
    """The lock file of a directory vsae writes: `.NAME.lock` in its parent."""
    directory = Path(directory).absolute()
    return directory.parent / f".{directory.name}.lock"


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

    def __enter__(self) -> DirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if self.shared and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return self  # a reader of a read-only directory: nobody can be writing it through vsae here
            raise
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise LockedError(f"the {self.what} {self.directory} is in use by another vsae process (PID {holder}); "
                              f"wait for it to finish or stop it, then rerun") from None
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
