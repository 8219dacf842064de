"""Shuffled batches from a memmapped activation cache: streamed by gather threads, or from device memory.

Two ways to feed a training loop, the same batches either way (`ActivationLoader.stream`):

- device-resident: when the split fits a memory budget on the device, it is loaded once in its stored dtype and
  each batch is an `index_select` by a device-side permutation, cast on the device: no host work per batch.
- streamed: gather threads fill reused buffers in the stored dtype (pinned on CUDA) from the memmaps; on CUDA a
  dedicated copy stream moves them to the device (an event orders the compute stream after each copy) and the
  cast to the loader's dtype happens there.
"""

from __future__ import annotations

import itertools
import os
import queue
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from activations.cache import open_shards
from activations.prefetch import background, ordered_map

SPLITS = ("train", "eval", "all")
LOAD_CHUNK_BYTES = 64 << 20  # host staging per copy while a split is loaded onto the device


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


def free_memory(device: str | torch.device) -> int:
    """Bytes that can still be allocated on `device`: free GPU memory on CUDA, available RAM on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:  # MemAvailable: what can be taken without swapping
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ActivationLoader:
    """Iterate over a cache's rows in shuffled batches; every row of the split once per epoch.

    Rows are gathered from the memmaps batch by batch (never the whole cache in
    RAM, unless `stream` finds the split fits `device_budget`); background threads
    prepare the next batches while the caller works. Opening checks the cache
    (`open_shards`: each shard's checksum the first time it is read) and holds a
    shared lock on it until the loader is closed or freed, so no harvest rewrites
    the cache while it is read.

    `dtype` is the dtype of the batches yielded (None: the cache's own, so the
    caller casts where it computes). `device_budget` is the fraction of the
    device's free memory (`free_memory`) the split may take to be held there by
    `stream`; 0 always streams. `gather_threads` threads gather `stream`'s batches.
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
        dtype: torch.dtype | None = torch.float32,
        with_tokens: bool = False,
        prefetch: int = 2,
        device_budget: float = 0.0,
        gather_threads: int = 2,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0.0 <= device_budget <= 1.0:
            raise ValueError(f"device_budget must be a fraction of free memory in [0, 1], got {device_budget}")
        self.manifest, self._acts, self._toks = open_shards(cache_dir)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.device = torch.device(device)
        self.stored_dtype = torch.from_numpy(np.empty(0, dtype=self._acts[0].dtype)).dtype
        self.dtype = dtype if dtype is not None else self.stored_dtype
        self.with_tokens = with_tokens
        self.prefetch = prefetch
        self.device_budget = device_budget
        self.gather_threads = max(1, gather_threads)
        self.epoch = 0
        self.d_in = int(self.manifest["d_in"])
        self._shard_starts = np.cumsum([0] + [a.shape[0] for a in self._acts])
        rows_per_seq = int(self.manifest["rows_per_sequence"])
        n_seqs = int(self.manifest["n_sequences"])
        train, held = split_sequences(n_seqs, eval_fraction)
        seqs = {"train": train, "eval": held, "all": np.arange(n_seqs)}[split]
        self.rows = (seqs[:, None] * rows_per_seq + np.arange(rows_per_seq)[None, :]).reshape(-1)
        self._resident: torch.Tensor | None = None

    def close(self) -> None:
        """Drop the memmaps, and with the last of them the lock on the cache (freeing the loader does the same)."""
        self._acts, self._toks = [], []
        self._resident = None

    def __enter__(self) -> ActivationLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_tokens(self) -> int:
        return int(self.rows.size)

    def __len__(self) -> int:
        return -(-self.n_tokens // self.batch_size)

    @property
    def split_bytes(self) -> int:
        """Bytes of the split's activations in the stored dtype."""
        return self.n_tokens * self.d_in * self.stored_dtype.itemsize

    @property
    def resident(self) -> bool:
        """Whether `stream` serves batches from the split held in device memory (decided at its first call)."""
        return self._resident is not None

    def fits_device(self) -> bool:
        """Whether the split fits `device_budget` of the device's free memory."""
        return self.device_budget > 0 and self.split_bytes <= self.device_budget * free_memory(self.device)

    def batch_rows(self, epoch: int) -> Iterator[np.ndarray]:
        """The global row ids of each batch of `epoch`: a pure function of (seed, epoch)."""
        rows = self.rows[self.epoch_order(epoch)] if self.shuffle else self.rows
        for i in range(0, rows.size, self.batch_size):
            yield rows[i : i + self.batch_size]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Positions in the split of the rows of `epoch`, in batch order (shuffled by (seed, epoch))."""
        if not self.shuffle:
            return np.arange(self.rows.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.rows.size)

    def gather(self, rows: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Activations [n, d_in] (into `out` when given) and token rows [n, 3] of global `rows`, in order."""
        acts = np.empty((rows.size, self.d_in), dtype=self._acts[0].dtype) if out is None else out
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
        gets rows r, r + world_size, ... of every global batch. Served from device
        memory when the split fits the budget (loaded at the first call, kept for
        the next), else gathered from the memmaps: the same rows either way.
        """
        per_epoch = self.n_tokens // self.batch_size
        if per_epoch == 0:
            raise ValueError(f"the {self.n_tokens} rows of this split do not fill one batch of {self.batch_size}")
        if self._resident is None and self.fits_device():
            self._resident = self.load_split()
        if self._resident is not None:
            yield from self._resident_batches(start_batch, per_epoch, rank, world_size)
            return
        rows = self._stream_rows(start_batch, per_epoch, rank, world_size)
        if self.device.type == "cuda":
            yield from self._cuda_batches(rows)
            return
        yield from ordered_map(self._cpu_batch, rows, threads=self.gather_threads, depth=self.prefetch)

    def _stream_rows(self, start_batch: int, per_epoch: int, rank: int, world_size: int) -> Iterator[np.ndarray]:
        """This rank's global row ids of each batch from `start_batch` on, endlessly."""
        epoch, skip = divmod(start_batch, per_epoch)
        while True:
            for i, rows in enumerate(self.batch_rows(epoch)):
                if i >= per_epoch:
                    break
                if i >= skip:
                    yield rows[rank::world_size]
            epoch, skip = epoch + 1, 0

    def load_split(self) -> torch.Tensor:
        """The split's activations on the device in their stored dtype: row j is global row `self.rows[j]`."""
        out = torch.empty((self.n_tokens, self.d_in), dtype=self.stored_dtype, device=self.device)
        chunk = max(1, LOAD_CHUNK_BYTES // (self.d_in * self.stored_dtype.itemsize))
        for lo in range(0, self.n_tokens, chunk):
            acts, _ = self.gather(self.rows[lo : lo + chunk])  # rows ascend: sequential reads
            out[lo : lo + len(acts)].copy_(torch.from_numpy(acts))
        return out

    def _resident_batches(self, start_batch: int, per_epoch: int, rank: int, world_size: int
                          ) -> Iterator[torch.Tensor]:
        """Batches drawn on the device: the epoch's permutation (the streamed one) is uploaded once per epoch,
        the next one computed by a thread meanwhile."""
        first, skip = divmod(start_batch, per_epoch)
        B = self.batch_size
        pin = self.device.type == "cuda"
        orders = (torch.from_numpy(self.epoch_order(e)) for e in itertools.count(first))
        for order in background((o.pin_memory() if pin else o for o in orders), depth=1, name="vsae-order"):
            positions = order.to(self.device, non_blocking=True)
            for i in range(skip, per_epoch):
                take = positions[i * B : (i + 1) * B][rank::world_size]
                yield self._resident.index_select(0, take).to(self.dtype)
            skip = 0

    def _cpu_batch(self, rows: np.ndarray) -> torch.Tensor:
        acts, _ = self.gather(rows)
        return torch.from_numpy(acts).to(self.dtype)  # a no-op for dtype=None: no float32 copy on the host

    def _cuda_batches(self, rows: Iterator[np.ndarray]) -> Iterator[torch.Tensor]:
        """Gather threads fill reused pinned buffers; a copy stream moves each to the device, cast there.

        A buffer goes back to the pool with the event of its copy, and a gather thread waits for that event
        before refilling it. The pool holds one buffer more than can be in flight, so a gather never waits
        for the consumer.
        """
        in_flight = max(1, self.prefetch) + self.gather_threads  # at most this many in ordered_map
        pool: queue.Queue = queue.Queue()
        for _ in range(in_flight + 1):
            pool.put((torch.empty((self.batch_size, self.d_in), dtype=self.stored_dtype, pin_memory=True), None))

        def fill(batch_rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            buf, copied = pool.get()
            if copied is not None:
                copied.synchronize()
            view = buf[: batch_rows.size]
            self.gather(batch_rows, out=view.numpy())
            return buf, view

        copy_stream = torch.cuda.Stream(self.device)
        for buf, view in ordered_map(fill, rows, threads=self.gather_threads, depth=self.prefetch):
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(copy_stream):
                x = view.to(self.device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(copy_stream)
            pool.put((buf, copied))
            compute.wait_event(copied)
            x.record_stream(compute)  # allocated on the copy stream, used on the compute stream
            yield x.to(self.dtype)

    def _host_batches(self, epoch: int, pin: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for rows in self.batch_rows(epoch):
            yield self._host_batch(rows, pin)

    def _host_batch(self, rows: np.ndarray, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations in the loader's dtype, pinned when bound for CUDA; token rows) of `rows`."""
        acts, toks = self.gather(rows)
        x = torch.from_numpy(acts).to(self.dtype)
        return (x.pin_memory() if pin else x), torch.from_numpy(toks)
