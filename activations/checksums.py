"""Checksums on read: every shard file is hashed the first time a reader uses it, and only then.

A verification is recorded per file, keyed by what a change to the file changes: size, mtime, ctime and inode
along with the sha256 the manifest expects. A rewritten, truncated, restored or copied file (a copy has a new
inode and ctime, which no tool can set back) no longer matches its record and is hashed again; an untouched one
is not, so a week-long harvest's cache is read in full once, not at every `train`.

The record is `.verified.json` in the cache directory when that is writable, else a file under vsae's cache dir
named after the cache's absolute path. Both are written atomically; losing one only costs a re-hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from activations.atomic import write_text_atomic
from activations.paths import cache_dir as vsae_cache_dir

RECORD = ".verified.json"
RECORD_FORMAT = "vsae-verified"
CHUNK = 1 << 22
PROGRESS_BYTES = 1 << 30  # hashing less than this is quick: no progress bar
_MAX_RECORD_BYTES = 1 << 24


def sha256_file(path: str | Path, chunk: int = CHUNK, bar: tqdm | None = None) -> str:
    """The sha256 of a file, read in chunks (never whole in memory); `bar` is advanced by the bytes read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if bar is not None:
                bar.update(len(block))
    return h.hexdigest()


def _stamp(st: os.stat_result, sha256: str) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "sha256": sha256}


def record_paths(cache: Path) -> tuple[Path, Path]:
    """(the record inside the cache, the fallback record under vsae's cache dir) of the cache directory `cache`."""
    where = str(cache.resolve())
    key = hashlib.sha256(where.encode()).hexdigest()[:24]
    return cache / RECORD, vsae_cache_dir() / "verified" / f"{key}.json"


def _load(path: Path, cache: Path) -> dict[str, dict]:
    """The file stamps a record holds; {} for a missing, foreign or damaged one (it only costs a re-hash)."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_RECORD_BYTES:
            return {}
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT or not isinstance(doc.get("files"), dict):
        return {}
    if "cache" in doc and doc["cache"] != str(cache.resolve()):
        return {}
    return {name: v for name, v in doc["files"].items() if isinstance(v, dict)}


def load_records(cache: Path) -> dict[str, dict]:
    """The verified file stamps of `cache`, from both record locations."""
    local, fallback = record_paths(cache)
    return {**_load(fallback, cache), **_load(local, cache)}


def save_records(cache: Path, stamps: dict[str, dict], keep: Iterable[str]) -> None:
    """Add `stamps` to the record of `cache`, keeping old stamps only for the file names in `keep`."""
    if not stamps:
        return
    keep = set(keep)
    local, fallback = record_paths(cache)
    for path, extra in ((local, {}), (fallback, {"cache": str(cache.resolve())})):
        old = {k: v for k, v in _load(path, cache).items() if k in keep}
        doc = {"format": RECORD_FORMAT, **extra, "files": {**old, **stamps}}
        try:
            write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
            return
        except OSError:
            continue  # a read-only cache: try the fallback; nowhere writable: hash again next time


def stamp_files(cache: Path, expected: dict[str, str]) -> None:
    """Record files as verified without hashing them: for a writer that has just hashed what it wrote."""
    stamps = {name: _stamp(os.stat(cache / name), sha) for name, sha in expected.items()}
    save_records(cache, stamps, expected)


def verify_files(cache: Path, expected: dict[str, str]) -> list[str]:
    """The names in `expected` ({file name: sha256}) whose content does not match; the matching ones are
    recorded. Files already recorded as verified, and unchanged since, are not read again."""
    records = load_records(cache)
    todo = {}
    for name, sha in expected.items():
        st = os.stat(cache / name)
        if records.get(name) != _stamp(st, sha):
            todo[name] = (sha, st.st_size)
    if not todo:
        return []
    bad, stamps = [], {}
    total = sum(size for _, size in todo.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {cache.name}", disable=total < PROGRESS_BYTES,
              leave=False) as bar:
        for name, (sha, _) in todo.items():
            path = cache / name
            before = os.stat(path)
            got = sha256_file(path, bar=bar)
            after = os.stat(path)
            if got != sha:
                bad.append(name)
            elif stat.S_ISREG(after.st_mode) and _stamp(before, sha) == _stamp(after, sha):
                stamps[name] = _stamp(after, sha)  # unchanged while it was read: the hash is the file's
    save_records(cache, stamps, expected)
    return bad
