"""The on-disk activation cache: manifest, shards, atomic writes, verification.

A cache is a directory (DESIGN.md, "Activation cache"):
  manifest.json                 settings, shard list with checksums, totals
  acts-00000.npy  [n, d_in]     float16/float32 activations (memmappable)
  tokens-00000.npy  [n, 3]      int32 (token id, sequence, position) per row

A shard is listed in the manifest only after both of its files are written,
fsynced and renamed into place, so a killed harvest never leaves a listed
shard half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from activations.atomic import fsync_dir, write_text_atomic

FORMAT = "vsae-activation-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKEN_COLUMNS = ("token", "sequence", "position")


class CacheError(RuntimeError):
    """A cache directory that cannot be used as asked; the message names the file and the fix."""


def acts_file(index: int) -> str:
    return f"acts-{index:05d}.npy"


def tokens_file(index: int) -> str:
    return f"tokens-{index:05d}.npy"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{cache_dir}: no {MANIFEST}; not an activation cache (make one with `vsae harvest`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: unreadable JSON ({e}); rerun the harvest with --overwrite") from e
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format version {manifest.get('format_version')}, this vsae reads "
            f"version {FORMAT_VERSION}; re-harvest it"
        )
    return manifest


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


def verify_shard(cache_dir: Path, entry: dict, d_in: int, dtype: str, checksum: bool = True) -> str | None:
    """None when the shard's files are complete and match the manifest, else what is wrong."""
    for key, cols, dt in (
        ("file", d_in, dtype),
        ("tokens_file", len(TOKEN_COLUMNS), "int32"),
    ):
        path = cache_dir / entry[key]
        if not path.is_file():
            return f"{path.name} is missing"
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            return f"{path.name} is unreadable ({e})"
        if arr.shape != (entry["n_tokens"], cols) or arr.dtype != np.dtype(dt):
            return f"{path.name} has shape {arr.shape} {arr.dtype}, expected ({entry['n_tokens']}, {cols}) {dt}"
        del arr
        want = entry["sha256" if key == "file" else "tokens_sha256"]
        if checksum and sha256_file(path) != want:
            return f"{path.name} fails its sha256 check (corrupt)"
    return None


def open_shards(cache_dir: str | Path) -> tuple[dict, list[np.ndarray], list[np.ndarray]]:
    """The manifest and read-only memmaps of every shard's activations and token rows."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if not manifest.get("complete"):
        raise CacheError(
            f"{cache_dir}: the harvest is incomplete ({manifest['total_tokens']} of "
            f"{manifest['settings']['tokens']} tokens); rerun the same `vsae harvest` command to finish it"
        )
    acts, toks = [], []
    for entry in manifest["shards"]:
        for key in ("file", "tokens_file"):
            if not (cache_dir / entry[key]).is_file():
                raise CacheError(f"{cache_dir / entry[key]} is missing; rerun the harvest to rebuild it")
        acts.append(np.load(cache_dir / entry["file"], mmap_mode="r"))
        toks.append(np.load(cache_dir / entry["tokens_file"], mmap_mode="r"))
    return manifest, acts, toks


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
    for index, first in enumerate(range(0, n_seqs, shard_seqs)):
        n = min(shard_seqs, n_seqs - first)
        shard = ShardWriter(out, index, n * rows_per_seq, d_in, dtype)
        shard.acts[:] = acts[first * rows_per_seq : (first + n) * rows_per_seq]
        seq = np.repeat(np.arange(first, first + n, dtype=np.int32), rows_per_seq)
        shard.tokens[:] = np.stack([np.zeros_like(seq), seq, np.tile(np.arange(1, context, dtype=np.int32), n)], 1)
        manifest["shards"].append(shard.finalize())
    update_totals(manifest)
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


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
