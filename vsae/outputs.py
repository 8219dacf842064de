"""What vsae writes for a user: it replaces only its own outputs, whole, and one writer at a time.

Every output vsae owns carries a marker: a run its `cfg.json` + `train.json`, a dashboard its `dashboard.json`, a
compare page its `<meta name="generator">`, a study its `study.json` (a cache its manifest, in `activations/`).
`--out` naming something else that exists (a folder of documents, a cache, a SAELens checkpoint) is refused with a
one-line error before any work starts; nothing of the user's is ever renamed, overwritten or deleted.

A directory output is built complete in a temp directory beside it and swapped in (old renamed aside, new renamed
in, old removed), so a kill at any moment leaves the old complete output or the new one. The names vsae uses
beside a target, and the only names it ever cleans up:

    .NAME.tmp-XXXXXXXX    a directory being built (tempfile.mkdtemp's suffix)
    .NAME.old             the previous version, during the swap
    .NAME.PID.HEX.tmp     a file being written (activations.atomic)
    .NAME.lock            the writer's lock (activations.guard.DirLock); kept, it holds no data

`hold` takes the lock, then finishes what a killed writer left (`recover`): a swap it interrupted, its temps.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from activations.atomic import fsync_dir, temp_target
from activations.guard import DirLock

TEMP_DIR_INFIX = ".tmp-"
OLD_SUFFIX = ".old"
# tempfile.mkdtemp appends 8 characters of this alphabet to the prefix.
_MKDTEMP_TAIL = r"[a-z0-9_]{8}"

ErrorType = type[Exception]


def old_path(path: Path) -> Path:
    """Where the previous version of `path` waits during a swap."""
    return path.with_name(f".{path.name}{OLD_SUFFIX}")


def is_temp_of(entry: Path, path: Path) -> bool:
    """Whether `entry` (beside `path`) is a temp vsae made while writing `path`: a temp directory of
    `replace_dir` or a temp file of `activations.atomic`."""
    if re.fullmatch(rf"\.{re.escape(path.name)}{re.escape(TEMP_DIR_INFIX)}{_MKDTEMP_TAIL}", entry.name):
        return True
    return temp_target(entry) == path.name


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def recover(path: Path) -> None:
    """Finish what a killed writer of `path` left: put back the old version when the new one never arrived (or drop
    it when it did), and remove the writer's temps. Only under the writer's lock (`hold`): the temps of a live
    writer look the same."""
    path = Path(os.path.abspath(path))  # "." and "x/.." have no name of their own
    old = old_path(path)
    if old.exists() or old.is_symlink():
        if path.exists() or path.is_symlink():
            _remove(old)
        else:
            os.replace(old, path)
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            if is_temp_of(entry, path):
                _remove(entry)


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_out(path: Path, is_ours: Callable[[Path], bool], what: str, marker: str, error: ErrorType,
              flag: str = "--out") -> None:
    """Refuse `path` as an output unless it is absent, an empty directory, or a vsae `what` (`is_ours`).

    `marker` names what `is_ours` looks for, so the message says why the path is not taken.
    """
    path = Path(path)
    if path.is_symlink():
        raise error(f"{flag} {path} is a symbolic link; give the path it points to ({path.resolve()}) or another "
                    f"{flag}")
    if not path.exists() or is_empty_dir(path) or is_ours(path):
        return
    kind = "directory" if path.is_dir() else "file"
    raise error(f"{flag} {path} is an existing {kind} that is not a vsae {what} (no {marker}); vsae replaces only "
                f"what it wrote: choose another {flag}, or move that {kind} away")


@contextmanager
def hold(path: Path, what: str, error: ErrorType, flag: str = "--out") -> Iterator[None]:
    """Be the one writer of `path` (a `LockedError` names the other one) and finish what a killed writer left.

    The lock file is made beside `path`, so an output that cannot be written (a parent that is a file, a read-only
    folder) is a one-line `error` here, before any work.
    """
    path = Path(path)
    lock = DirLock(path, what)
    try:
        lock.__enter__()
    except OSError as e:
        raise error(f"cannot write the {what} {flag} {path}: {e.strerror or e}; choose a writable {flag}") from e
    try:
        recover(path)
        yield
    finally:
        lock.__exit__(None, None, None)


@contextmanager
def claim(path: Path, is_ours: Callable[[Path], bool], what: str, marker: str, error: ErrorType,
          flag: str = "--out") -> Iterator[None]:
    """`check_out` and `hold`: be the one writer of `path`, refusing it unless absent, empty or a vsae `what`."""
    check_out(path, is_ours, what, marker, error, flag)  # before the lock file is left beside a path not ours
    with hold(path, what, error, flag):
        check_out(path, is_ours, what, marker, error, flag)  # again, now that a killed writer's swap is finished
        yield


def _sync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def replace_dir(path: Path, build: Callable[[Path], None], is_ours: Callable[[Path], bool], what: str,
                error: ErrorType) -> None:
    """Make `path` anew: `build(temp)` fills a temp directory beside it, which then replaces `path` whole.

    `path` is replaced only when it is (still, at swap time) a vsae `what` or an empty directory. On any failure,
    an interruption included, the temp is removed and `path` keeps its old content; an OSError becomes a one-line
    `error`.
    """
    path = Path(os.path.abspath(path))  # "." and "x/.." have no name of their own
    old = old_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TEMP_DIR_INFIX}", dir=path.parent))
    except OSError as e:
        raise error(f"cannot write the {what} {path}: {e}") from e
    aside = False
    try:
        build(tmp)
        _sync_tree(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if path.exists() or path.is_symlink():
            if path.is_symlink() or not (is_empty_dir(path) or (path.is_dir() and is_ours(path))):
                raise error(f"{path} is no longer a vsae {what}; it was left as it is and nothing was written")
            if old.exists() or old.is_symlink():
                _remove(old)  # a stale one: `path` is the current version
            os.replace(path, old)
            aside = True
        os.replace(tmp, path)
        aside = False
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside:
            os.replace(old, path)
        if isinstance(e, OSError):
            raise error(f"cannot write the {what} {path}: {e}; the previous {what} is kept") from e
        raise
    fsync_dir(path.parent)
    _remove(old)
