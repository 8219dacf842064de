"""The one atomic file writer of the project: readers see the old file or the new one, never half of one.

A file is written under a temp name unique to the writer (pid + random), fsynced, renamed over its target and
the directory fsynced, so a kill or power loss at any moment leaves the previous version, and two writers of the
same file never write into each other's temp. It lives in the bottom layer because every layer writes files.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A fresh temp name beside `path`: hidden, and unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def temp_target(path: Path) -> str | None:
    """The target file name a temp of `temp_path` stands for, or None when `path` is not such a temp.

    For directory scans that must tell a killed writer's leftover from a foreign file.
    """
    name = path.name
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    parts = name[1 : -len(TEMP_SUFFIX)].rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[0]:
        return None
    return parts[0]


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write `path` by calling `write(temp)`, then fsync and rename the temp over `path`; returns `path`.

    Parent directories are made as needed. On any failure (an exception from `write` included) the temp is
    removed and `path` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        # Created here (exclusively) so its mode is the umask's: some writers (safetensors) make files 0600.
        tmp.touch(exist_ok=False)
        mode = tmp.stat().st_mode
        write(tmp)
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_atomic` of UTF-8 text."""
    return write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """`write_atomic` of raw bytes."""
    return write_atomic(path, lambda p: p.write_bytes(data))


def copy_atomic(src: str | Path, path: str | Path) -> Path:
    """`write_atomic` of a copy of the file `src`."""
    return write_atomic(path, lambda p: shutil.copyfile(src, p))
