"""Shuffled batches from a memmapped activation cache, with a background prefetch thread."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from activations.cache import open_shards
from activations.prefetch import background

SPLITS = ("train", "eval", "all")


def split_sequences(n_sequences: int, eval_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) sequence ids: a fixed random subset of whole sequences is held out.

    Held out by sequence, not by row, so no eval token shares a context with a
    training token. The split depends only on its arguments, so the trainer and
    the evals agree on it.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = int(round(n_sequences * eval_fraction))
    if eval_fraction > 0 and n_eval == 0 and n_sequences > 1:
        n_eval = 1
    perm = np.random.default_rng(seed).permutation(n_sequences)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


class ActivationLoader:
    """Iterate over a cache's rows in shuffled batches; every row of the split once per epoch.

    Rows are gathered from the memmaps batch by batch (never the whole cache in
    RAM); a background thread prepares the next batches while the caller works.
    Opening checks the cache (`open_shards`: each shard's checksum the first time
    it is read) and holds a shared lock on it until the loader is closed or freed,
    so no harvest rewrites the cache while it is read.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        batch_size: int,
        *,
        split: str = "train",
        eval_fraction: float = 0.05,
        seed: int = 0,
        shuffle: bool = True,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        with_tokens: bool = False,
        prefetch: int = 2,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.manifest, self._acts, self._toks = open_shards(cache_dir)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.device = torch.device(device)
        self.dtype = dtype
        self.with_tokens = with_tokens
        self.prefetch = prefetch
        self.epoch = 0
        self.d_in = int(self.manifest["d_in"])
        self._shard_starts = np.cumsum([0] + [a.shape[0] for a in self._acts])
        rows_per_seq = int(self.manifest["rows_per_sequence"])
        n_seqs = int(self.manifest["n_sequences"])
        train, held = split_sequences(n_seqs, eval_fraction)
        seqs = {"train": train, "eval": held, "all": np.arange(n_seqs)}[split]
        self.rows = (seqs[:, None] * rows_per_seq + np.arange(rows_per_seq)[None, :]).reshape(-1)

    def close(self) -> None:
        """Drop the memmaps, and with the last of them the lock on the cache (freeing the loader does the same)."""
        self._acts, self._toks = [], []

    def __enter__(self) -> ActivationLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_tokens(self) -> int:
        return int(self.rows.size)

    def __len__(self) -> int:
        return -(-self.n_tokens // self.batch_size)

    def batch_rows(self, epoch: int) -> Iterator[np.ndarray]:
        """The global row ids of each batch of `epoch`: a pure function of (seed, epoch)."""
        rows = self.rows
        if self.shuffle:
            rows = rows[np.random.default_rng([self.seed, epoch]).permutation(rows.size)]
        for i in range(0, rows.size, self.batch_size):
            yield rows[i : i + self.batch_size]

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Activations [n, d_in] and token rows [n, 3] of global `rows`, in the order given."""
        acts = np.empty((rows.size, self.d_in), dtype=self._acts[0].dtype)
        toks = np.empty((rows.size, 3), dtype=np.int32)
        shard = np.searchsorted(self._shard_starts, rows, side="right") - 1
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            local = rows[where] - self._shard_starts[s]
            order = np.argsort(local, kind="stable")  # sorted reads are sequential on disk
            acts[where[order]] = self._acts[s][local[order]]
            if self.with_tokens:
                toks[where[order]] = self._toks[s][local[order]]
        return acts, toks

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        pin = self.device.type == "cuda"
        for x, toks in background(self._host_batches(epoch, pin), depth=self.prefetch):
            x = x.to(self.device, non_blocking=pin)
            yield (x, toks) if self.with_tokens else x

    def stream(self, start_batch: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
        """Endless full batches across epochs, from global batch number `start_batch` on.

        For training: batch i is the same whatever the start, so a resumed run sees
        the batches an uninterrupted one would (skipped batches are never read). The
        last partial batch of each epoch is dropped. With `world_size` > 1, rank r
        gets rows r, r + world_size, ... of every global batch.
        """
        per_epoch = self.n_tokens // self.batch_size
        if per_epoch == 0:
            raise ValueError(f"the {self.n_tokens} rows of this split do not fill one batch of {self.batch_size}")
        pin = self.device.type == "cuda"

        def host() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            epoch, skip = divmod(start_batch, per_epoch)
            while True:
                for i, rows in enumerate(self.batch_rows(epoch)):
                    if i >= per_epoch:
                        break
                    if i >= skip:
                        yield self._host_batch(rows[rank::world_size], pin)
                epoch, skip = epoch + 1, 0

        for x, _ in background(host(), depth=self.prefetch):
            yield x.to(self.device, non_blocking=pin)

    def _host_batches(self, epoch: int, pin: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for rows in self.batch_rows(epoch):
            yield self._host_batch(rows, pin)

    def _host_batch(self, rows: np.ndarray, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations in the loader's dtype, pinned when bound for CUDA; token rows) of `rows`."""
        acts, toks = self.gather(rows)
        x = torch.from_numpy(acts).to(self.dtype)
        return (x.pin_memory() if pin else x), torch.from_numpy(toks)
