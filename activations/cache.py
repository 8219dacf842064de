"""The on-disk activation cache: manifest, shards, atomic writes, verification.

A cache is a directory (DESIGN.md, "Activation cache"):
  manifest.json                 settings, shard list with checksums, totals
  acts-00000.npy  [n, d_in]     float16/float32 activations (memmappable)
  tokens-00000.npy  [n, 3]      int32 (token id, sequence, position) per row

A shard is listed in the manifest only after both of its files are written,
fsynced and renamed into place, so a killed harvest never leaves a listed
shard half-written.

Everything read from a manifest is checked before use (`validate_manifest`):
a damaged or crafted manifest is one `CacheError` naming the field, never a
traceback, and its shard file names are the plain names the index gives,
resolved inside the cache. Readers (`open_shards`) hold a shared lock on the
cache while any of its arrays is alive, check each file's size against its
header before mapping it, and verify its sha256 the first time they see it
(activations/checksums.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from activations.atomic import fsync_dir, write_text_atomic
from activations.checksums import sha256_file, stamp_files, verify_files
from activations.guard import DirLock, UnsafePathError, inside, plain_name

FORMAT = "vsae-activation-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKEN_COLUMNS = ("token", "sequence", "position")
REBUILD = "rerun the same `vsae harvest` command to rebuild it"
REMAKE = "rebuild the cache: rerun the `vsae harvest` command that made it with --overwrite"


class CacheError(RuntimeError):
    """A cache directory that cannot be used as asked; the message names the file and the fix."""


def acts_file(index: int) -> str:
    return f"acts-{index:05d}.npy"


def tokens_file(index: int) -> str:
    return f"tokens-{index:05d}.npy"


def write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


_MAX_MANIFEST_BYTES = 1 << 28
_MAX_COUNT = 1 << 48  # rows, sequences, shards: far above any cache, far below int64 overflow
_MAX_WIDTH = 1 << 24
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_manifest(cache_dir: str | Path) -> dict:
    """The validated manifest of the cache `cache_dir` (`validate_manifest`); CacheError when there is none."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{cache_dir}: no {MANIFEST}; not an activation cache (make one with `vsae harvest`)")
    try:
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise CacheError(f"{path}: {path.stat().st_size:,} bytes, too large for a manifest; {REMAKE}")
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise CacheError(f"{path}: unreadable JSON ({e}); {REMAKE}") from None
    except OSError as e:
        raise CacheError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
    validate_manifest(manifest, path)
    return manifest


class _Fields:
    """Typed look-ups into a manifest that fail as one CacheError naming the field, the manifest and the fix."""

    def __init__(self, where: str | Path) -> None:
        self.where = where

    def error(self, field: str, want: str, got: object) -> CacheError:
        text = repr(got)
        text = text if len(text) <= 60 else text[:60] + "..."
        return CacheError(f"{self.where}: {field} must be {want}, got {text}; {REMAKE}")

    def get(self, obj: dict, key: str, field: str, types: type | None = None, want: str = "",
            optional: bool = False) -> object:
        if key not in obj:
            if optional:
                return None
            raise CacheError(f"{self.where}: no {field}; {REMAKE}")
        if types is not None and not isinstance(obj[key], types):
            raise self.error(field, want, obj[key])
        return obj[key]

    def count(self, obj: dict, key: str, field: str, lo: int = 0, hi: int = _MAX_COUNT) -> int:
        value = self.get(obj, key, field)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(field, f"an integer in [{lo}, {hi}]", value)
        return value

    def number(self, obj: dict, key: str, field: str, nullable: bool = False) -> float | None:
        value = self.get(obj, key, field)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise self.error(field, "a finite number >= 0" + (" or null" if nullable else ""), value)
        return value


def validate_manifest(manifest: object, where: str | Path) -> None:
    """Check the fields every reader uses: types, ranges, shard file names, and that totals and shards agree.

    `where` names the manifest in the CacheError.
    """
    if not isinstance(manifest, dict):
        raise CacheError(f"{where}: a JSON {type(manifest).__name__}, not a manifest object; {REMAKE}")
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{where}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{where}: cache format version {manifest.get('format_version')!r:.30}, this vsae reads "
                         f"version {FORMAT_VERSION}; re-harvest it")
    f = _Fields(where)
    rows = _check_settings(f, manifest)
    f.count(manifest, "d_in", "d_in", 1, _MAX_WIDTH)
    f.get(manifest, "tokenizer", "tokenizer", str, "a string", optional=True)
    for key in ("bos_token_id", "stop_at_layer"):
        if manifest.get(key) is not None:
            f.count(manifest, key, key, 0, 1 << 31)
    specials = f.get(manifest, "special_token_ids", "special_token_ids", list, "a list of token ids", optional=True)
    for i, token in enumerate(specials or []):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < 1 << 31:
            raise f.error(f"special_token_ids[{i}]", "a token id", token)
    _check_shards(f, manifest, rows)


def _check_settings(f: _Fields, manifest: dict) -> int:
    """Check `settings`; returns the rows per sequence they imply (after checking the manifest agrees)."""
    settings = f.get(manifest, "settings", "settings", dict, "an object")
    model = f.get(settings, "model", "settings.model", dict, "an object")
    if model.get("kind") == "local":
        f.get(model, "path", "settings.model.path", str, "a path")
    for key in ("kind", "name"):
        f.get(model, key, f"settings.model.{key}", str, "a string", optional=True)
    if not f.get(settings, "hook_name", "settings.hook_name", str, "a hook name"):
        raise f.error("settings.hook_name", "a hook name", "")
    f.get(settings, "corpus", "settings.corpus", dict, "an object")
    f.count(settings, "tokens", "settings.tokens", 1)
    f.count(settings, "shard_sequences", "settings.shard_sequences", 1)
    context = f.count(settings, "context", "settings.context", 2, 1 << 31)
    dtype = f.get(settings, "dtype", "settings.dtype", str, "a float dtype name")
    try:
        if np.dtype(dtype).kind != "f":
            raise TypeError(dtype)
    except TypeError:
        raise f.error("settings.dtype", "a float dtype name (float16, float32)", dtype) from None
    bos_dropped = f.get(settings, "bos_dropped", "settings.bos_dropped", bool, "true or false")
    rows = f.count(manifest, "rows_per_sequence", "rows_per_sequence", 1, 1 << 31)
    if rows != context - bos_dropped:
        raise f.error("rows_per_sequence", f"settings.context - settings.bos_dropped = {context - bos_dropped}", rows)
    return rows


def _check_shards(f: _Fields, manifest: dict, rows: int) -> None:
    """Check the shard list (increasing indices, the file names the index gives) and the totals."""
    n_shards = f.count(manifest, "n_shards", "n_shards")
    shards = f.get(manifest, "shards", "shards", list, "a list")
    if len(shards) > n_shards:
        raise f.error("shards", f"a list of at most n_shards = {n_shards} entries", f"{len(shards)} entries")
    lo = 0
    for i, entry in enumerate(shards):
        field = f"shards[{i}]"
        if not isinstance(entry, dict):
            raise f.error(field, "an object", entry)
        index = f.count(entry, "index", f"{field}.index", lo, n_shards - 1)
        lo = index + 1
        n = f.count(entry, "n_tokens", f"{field}.n_tokens", rows)
        if n % rows:
            raise f.error(f"{field}.n_tokens", f"a multiple of rows_per_sequence = {rows}", n)
        f.number(entry, "sum_sq_norm", f"{field}.sum_sq_norm")
        for key, name in (("file", acts_file(index)), ("tokens_file", tokens_file(index))):
            try:
                plain_name(f.get(entry, key, f"{field}.{key}"), f"{field}.{key}")
            except UnsafePathError:
                raise f.error(f"{field}.{key}", "a plain file name inside the cache", entry[key]) from None
            if entry[key] != name:
                raise f.error(f"{field}.{key}", f"{name!r}, the name its index gives", entry[key])
        for key in ("sha256", "tokens_sha256"):
            sha = f.get(entry, key, f"{field}.{key}")
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                raise f.error(f"{field}.{key}", "64 lowercase hex digits", sha)
    complete = f.get(manifest, "complete", "complete", bool, "true or false")
    if complete and (len(shards) != n_shards or n_shards == 0):
        raise f.error("shards", f"n_shards = {n_shards} entries (at least one) in a complete cache",
                      f"{len(shards)} entries")
    total = f.count(manifest, "total_tokens", "total_tokens")
    listed = sum(e["n_tokens"] for e in shards)
    if total != listed:
        raise f.error("total_tokens", f"the sum of the shards' n_tokens = {listed}", total)
    n_seqs = f.count(manifest, "n_sequences", "n_sequences")
    msn = f.number(manifest, "mean_squared_norm", "mean_squared_norm", nullable=True)
    if complete:
        if n_seqs * rows != total:
            raise f.error("n_sequences", f"total_tokens / rows_per_sequence = {total / rows:g}", n_seqs)
        if msn is None:  # zero is allowed: all-zero activations are a cache, if not one to train on
            raise f.error("mean_squared_norm", "a number in a complete cache", msn)


def manifest_hash(manifest: dict) -> str:
    """A short hash identifying a cache's content (settings + shard checksums)."""
    keyed = {"settings": manifest["settings"], "shards": [s["sha256"] for s in manifest["shards"]]}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ShardWriter:
    """Fills one shard's two memmapped `.tmp` files, then finalises them atomically."""

    directory: Path
    index: int
    n_rows: int
    d_in: int
    dtype: str

    def __post_init__(self) -> None:
        self._acts_tmp = self.directory / (acts_file(self.index) + ".tmp")
        self._tok_tmp = self.directory / (tokens_file(self.index) + ".tmp")
        self.acts = np.lib.format.open_memmap(
            self._acts_tmp, mode="w+", dtype=np.dtype(self.dtype), shape=(self.n_rows, self.d_in)
        )
        self.tokens = np.lib.format.open_memmap(
            self._tok_tmp, mode="w+", dtype=np.int32, shape=(self.n_rows, len(TOKEN_COLUMNS))
        )
        self.sum_sq_norm = 0.0

    def finalize(self) -> dict:
        """Flush, fsync and rename both files into place; return the shard's manifest entry."""
        self.sum_sq_norm = float(
            np.square(self.acts, dtype=np.float64).sum() if self.n_rows else 0.0
        )
        entry = {"index": self.index, "n_tokens": self.n_rows, "sum_sq_norm": self.sum_sq_norm}
        for arr, tmp, name, key in (
            (self.acts, self._acts_tmp, acts_file(self.index), "sha256"),
            (self.tokens, self._tok_tmp, tokens_file(self.index), "tokens_sha256"),
        ):
            arr.flush()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            entry[key] = sha256_file(tmp)
            os.replace(tmp, self.directory / name)
            entry["file" if key == "sha256" else "tokens_file"] = name
        del self.acts, self.tokens  # close the memmaps
        fsync_dir(self.directory)
        return entry


def shard_path(cache_dir: Path, entry: dict, key: str) -> Path:
    """The path of a shard's file (`key` "file" or "tokens_file"), confined to the cache: its name is a plain
    name and no symlink leads out."""
    try:
        return inside(cache_dir, entry[key], "shard file")
    except UnsafePathError as e:
        raise CacheError(f"cache {cache_dir}: {e}") from None


def _shard_files(cache_dir: Path, manifest: dict) -> list[tuple[Path, tuple[int, int], np.dtype, str]]:
    """(path, shape, dtype, sha256) of every file of every listed shard, activations before token rows."""
    d_in, dtype = manifest["d_in"], np.dtype(manifest["settings"]["dtype"])
    files = []
    for key, cols, dt, sha in (("file", d_in, dtype, "sha256"),
                               ("tokens_file", len(TOKEN_COLUMNS), np.dtype(np.int32), "tokens_sha256")):
        files += [(shard_path(cache_dir, e, key), (e["n_tokens"], cols), dt, e[sha]) for e in manifest["shards"]]
    return files


def _npy_problem(path: Path, shape: tuple[int, int], dtype: np.dtype) -> str | None:
    """What is wrong with a `.npy` file's header or size, found without mapping it; None when it fits.

    Mapping a truncated file fails deep in numpy ("mmap length is greater than file size"); here it is named.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return f"{path.name} is not a regular file"
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                return f"{path.name} is a .npy file of version {version}, not one vsae writes"
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            got_shape, fortran, got_dtype = read(f)
            offset = f.tell()
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as e:
        return f"{path.name} is unreadable ({e.strerror or e})"
    except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, TokenError... on garbage
        return f"{path.name} is not a valid .npy file ({type(e).__name__})"
    if got_shape != shape or got_dtype != dtype or fortran:
        return f"{path.name} has shape {got_shape} {got_dtype}, expected {shape} {dtype}"
    want = offset + math.prod(shape) * dtype.itemsize
    if st.st_size < want:
        return f"{path.name} is truncated ({st.st_size:,} of {want:,} bytes)"
    if st.st_size > want:
        return f"{path.name} has {st.st_size:,} bytes, more than the {want:,} its header gives"
    return None


def verify_shard(cache_dir: Path, entry: dict, d_in: int, dtype: str, checksum: bool = True) -> str | None:
    """None when the shard's files are complete and match the manifest, else what is wrong (always hashed: for
    `cache-info` and a resumed harvest, which must not trust a record)."""
    for key, cols, dt, sha in (("file", d_in, np.dtype(dtype), "sha256"),
                               ("tokens_file", len(TOKEN_COLUMNS), np.dtype(np.int32), "tokens_sha256")):
        try:
            path = shard_path(cache_dir, entry, key)
        except CacheError:
            return f"{entry[key]} leads outside the cache (a symlink)"
        problem = _npy_problem(path, (entry["n_tokens"], cols), dt)
        if problem:
            return problem
        if checksum and sha256_file(path) != entry[sha]:
            return f"{path.name} fails its sha256 check (corrupt)"
    return None


def open_shards(cache_dir: str | Path) -> tuple[dict, list[np.ndarray], list[np.ndarray]]:
    """The manifest and read-only memmaps of every shard's activations and token rows.

    Every file is checked (header, size, and its sha256 the first time it is read: `checksums.verify_files`)
    before it is mapped, and a shared lock on the cache is held until the last of the arrays returned, and of
    their views, is freed: a harvest cannot rewrite the cache under a reader, nor a reader open one being written.
    """
    cache_dir = Path(cache_dir)
    if not (cache_dir / MANIFEST).is_file():
        read_manifest(cache_dir)  # the error that names what is missing; no lock file beside a non-cache
    lock = DirLock(cache_dir, "cache", shared=True).__enter__()
    try:
        manifest = read_manifest(cache_dir)
        if not manifest["complete"]:
            raise CacheError(
                f"{cache_dir}: the harvest is incomplete ({manifest['total_tokens']} of "
                f"{manifest['settings']['tokens']} tokens); rerun the same `vsae harvest` command to finish it"
            )
        files = _shard_files(cache_dir, manifest)
        for path, shape, dtype, _ in files:
            if problem := _npy_problem(path, shape, dtype):
                raise CacheError(f"cache {cache_dir}: shard {problem}; {REBUILD}")
        try:
            bad = verify_files(cache_dir, {path.name: sha for path, _, _, sha in files})
            if bad:
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise CacheError(f"cache {cache_dir}: shard {bad[0]} fails its sha256 check (corrupt){more}; {REBUILD}")
            arrays = [np.load(path, mmap_mode="r") for path, _, _, _ in files]
        except OSError as e:
            raise CacheError(f"cache {cache_dir}: cannot read it ({e}); check its files' permissions") from None
    except BaseException:
        lock.__exit__()
        raise
    _unlock_when_freed(lock, arrays)
    n = len(manifest["shards"])
    return manifest, arrays[:n], arrays[n:]


def _unlock_when_freed(lock: DirLock, arrays: list[np.ndarray]) -> None:
    """Release a reader's lock once the last of `arrays` is garbage (a view keeps its array alive)."""
    alive, guard = [len(arrays)], threading.Lock()

    def freed() -> None:
        with guard:
            alive[0] -= 1
            last = alive[0] == 0
        if last:
            lock.__exit__()

    for a in arrays:
        weakref.finalize(a, freed)


def write_array_cache(out: str | Path, acts: np.ndarray, context: int, description: dict,
                      shard_tokens: int = 1 << 17) -> dict:
    """Write in-memory activations `[n_sequences * (context - 1), d_in]` as a cache (tests, synthetic data).

    Rows are grouped into sequences of `context - 1` (BOS dropped), token ids are 0.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows_per_seq = context - 1
    if acts.ndim != 2 or acts.shape[0] % rows_per_seq:
        raise ValueError(f"acts must be [n * {rows_per_seq}, d_in], got {acts.shape}")
    n_seqs, d_in = acts.shape[0] // rows_per_seq, acts.shape[1]
    shard_seqs = max(1, shard_tokens // rows_per_seq)
    dtype = str(acts.dtype)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": True, "shards": [],
                "settings": {"model": description, "hook_name": description.get("hook_name", "synthetic"),
                             "corpus": {"kind": "synthetic"}, "tokens": int(acts.shape[0]), "context": context,
                             "dtype": dtype, "bos_dropped": True, "shard_sequences": shard_seqs},
                "d_in": d_in, "n_sequences": n_seqs, "rows_per_sequence": rows_per_seq,
                "n_shards": -(-n_seqs // shard_seqs), "tokenizer": "none", "bos_token_id": 0,
                "special_token_ids": []}  # token ids here are placeholders, not text
    with DirLock(out, "cache"):
        for index, first in enumerate(range(0, n_seqs, shard_seqs)):
            n = min(shard_seqs, n_seqs - first)
            shard = ShardWriter(out, index, n * rows_per_seq, d_in, dtype)
            shard.acts[:] = acts[first * rows_per_seq : (first + n) * rows_per_seq]
            seq = np.repeat(np.arange(first, first + n, dtype=np.int32), rows_per_seq)
            shard.tokens[:] = np.stack([np.zeros_like(seq), seq, np.tile(np.arange(1, context, dtype=np.int32), n)],
                                       1)
            manifest["shards"].append(shard.finalize())
        update_totals(manifest)
        write_json_atomic(out / MANIFEST, manifest)
        stamp_shards(out, manifest)
    return manifest


def stamp_shards(cache_dir: Path, manifest: dict) -> None:
    """Record the listed shards as verified: for a writer that hashed them as it wrote them, so the first reader
    does not hash them again."""
    stamp_files(cache_dir, {e[key]: e[sha] for e in manifest["shards"]
                            for key, sha in (("file", "sha256"), ("tokens_file", "tokens_sha256"))})


def update_totals(manifest: dict) -> None:
    """Recompute total tokens and the mean squared norm from the listed shards."""
    total = sum(e["n_tokens"] for e in manifest["shards"])
    manifest["total_tokens"] = total
    sq = sum(e["sum_sq_norm"] for e in manifest["shards"])
    manifest["mean_squared_norm"] = sq / total if total else None


def sequence_tokens(cache_dir: str | Path, sequences: np.ndarray) -> np.ndarray:
    """Token contexts `[len(sequences), context]` of the given sequence ids, BOS restored at position 0.

    Rows of one sequence are stored contiguously (positions 1..context-1 when BOS
    was dropped), so each context is one slice of one shard.
    """
    manifest, _, toks = open_shards(cache_dir)
    ctx, rows = manifest["settings"]["context"], manifest["rows_per_sequence"]
    first_pos = ctx - rows
    starts = np.cumsum([0] + [t.shape[0] for t in toks])
    out = np.full((len(sequences), ctx), manifest.get("bos_token_id") or 0, dtype=np.int64)
    for i, seq in enumerate(np.asarray(sequences)):
        row = int(seq) * rows
        shard = int(np.searchsorted(starts, row, side="right") - 1)
        local = row - starts[shard]
        out[i, first_pos:] = toks[shard][local : local + rows, 0]
    return out
