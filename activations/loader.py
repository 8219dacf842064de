"""Shuffled batches from a memmapped activation cache: streamed by gather threads, from device memory, or out of
core from a shuffle buffer of contiguous blocks.

Two ways to feed a training loop with the exact global shuffle, the same batches either way
(`ActivationLoader.stream`):

- device-resident: when the split fits a memory budget on the device, it is loaded once in its stored dtype and
  each batch is an `index_select` by a device-side permutation, cast on the device: no host work per batch.
- streamed: gather threads fill reused buffers in the stored dtype (pinned on CUDA) from the memmaps; on CUDA a
  dedicated copy stream moves them to the device (an event orders the compute stream after each copy) and the
  cast to the loader's dtype happens there.

When the split is larger than `host_budget` of the available RAM (so random row gathers would each be a disk read),
`stream` reads out of core instead: contiguous blocks of whole sequences, in a seeded random block order, are read
by background threads into a shuffle buffer of `buffer_blocks` blocks (a "window"), and the window's rows are drawn
in a seeded random order; the next window is read while this one is drawn from. The order is a pure function of
(seed, epoch, world_size), so a resumed stream equals an uninterrupted one (`block_batch_positions`).
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from activations.cache import CacheError, open_shards
from activations.prefetch import background, ordered_map

SPLITS = ("train", "eval", "all")
LOAD_CHUNK_BYTES = 64 << 20  # host staging per copy while a split is loaded onto the device
BLOCK_ROWS = 1 << 16  # rows per out-of-core block (rounded down to whole sequences)
BUFFER_BLOCKS = 8  # blocks per shuffle window: each batch is drawn from this many random blocks
READ_THREADS = 4  # parallel block reads: a deeper I/O queue than one sequential reader
BLOCK_TAG = 0x626C6B  # separates the block-order random streams from the exact shuffle's


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
    `stream`; 0 always streams. `gather_threads` threads gather `stream`'s batches. `host_budget` is the
    fraction of available RAM (`free_memory("cpu")`) under which a streamed split is read by exact random
    gathers (its pages stay cached); above it, and never when the split is device-resident, `stream` reads
    out of core in blocks of `block_rows` rows through a shuffle buffer of `buffer_blocks` blocks (0: always).
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
        host_budget: float = 0.5,
        block_rows: int = BLOCK_ROWS,
        buffer_blocks: int = BUFFER_BLOCKS,
        read_threads: int = READ_THREADS,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0.0 <= device_budget <= 1.0:
            raise ValueError(f"device_budget must be a fraction of free memory in [0, 1], got {device_budget}")
        if not 0.0 <= host_budget <= 1.0:
            raise ValueError(f"host_budget must be a fraction of available RAM in [0, 1], got {host_budget}")
        if block_rows <= 0 or buffer_blocks <= 0:
            raise ValueError(f"block_rows and buffer_blocks must be positive, got {block_rows}, {buffer_blocks}")
        self.cache_dir = Path(cache_dir)
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
        self.rows_per_seq = int(self.manifest["rows_per_sequence"])
        n_seqs = int(self.manifest["n_sequences"])
        train, held = split_sequences(n_seqs, eval_fraction)
        # the split's sequence ids, ascending: row ids are computed from them (`rows_at`), never all held
        self.sequences = {"train": train, "eval": held, "all": np.arange(n_seqs)}[split].astype(np.int64)
        self._resident: torch.Tensor | None = None
        self._files = _shard_locations(self._acts)
        self.block_rows = max(1, block_rows // self.rows_per_seq) * self.rows_per_seq
        self.buffer_blocks = buffer_blocks
        self.read_threads = max(1, read_threads)
        self.blocked = self.shuffle and not self.fits_device() and (  # unshuffled: sequential reads already
            host_budget == 0 or self.split_bytes > host_budget * free_memory("cpu"))

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
        return int(self.sequences.size) * self.rows_per_seq

    @functools.cached_property
    def rows(self) -> np.ndarray:
        """The global row id of every position of the split, ascending (built on first use: O(rows) memory)."""
        return self.rows_at(np.arange(self.n_tokens))

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Global row ids of positions in the split (position p: row p % rows_per_seq of the split's sequence
        p // rows_per_seq)."""
        seq, within = np.divmod(positions, self.rows_per_seq)
        return self.sequences[seq] * self.rows_per_seq + within

    def batch_order(self) -> dict:
        """How `stream` orders batches, for a run to record and a resume to restore (`use_batch_order`)."""
        if not self.blocked:
            return {"kind": "exact"}
        return {"kind": "block", "block_rows": self.block_rows, "buffer_blocks": self.buffer_blocks}

    def use_batch_order(self, order: dict) -> None:
        """Order batches as `order` (from `batch_order`) says, whatever the memory budgets would choose."""
        if order.get("kind") not in ("exact", "block"):
            raise ValueError(f"unknown batch order {order!r}: expected kind 'exact' or 'block'")
        self.blocked = order["kind"] == "block"
        if self.blocked:
            self.block_rows, self.buffer_blocks = int(order["block_rows"]), int(order["buffer_blocks"])

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
        order = self.epoch_order(epoch) if self.shuffle else None  # unshuffled: no O(rows) array at all
        for i in range(0, self.n_tokens, self.batch_size):
            positions = order[i : i + self.batch_size] if order is not None else \
                np.arange(i, min(i + self.batch_size, self.n_tokens))
            yield self.rows_at(positions)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Positions in the split of the rows of `epoch`, in batch order (shuffled by (seed, epoch))."""
        if not self.shuffle:
            return np.arange(self.n_tokens)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_tokens)

    def sample(self, n: int) -> np.ndarray:
        """Activations [min(n, n_tokens), d_in] of distinct rows drawn at random by the seed, in cache order:
        drawn without a permutation of the whole split, so the memory is O(n) however large the cache."""
        rng = np.random.default_rng([self.seed, BLOCK_TAG + 1])
        positions = np.arange(self.n_tokens) if n >= self.n_tokens else \
            np.sort(rng.choice(self.n_tokens, size=n, replace=False))  # Floyd's method when n << n_tokens
        return self.gather(self.rows_at(positions))[0]

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
        Out of core (`blocked`), rank r draws its part of every batch from its own contiguous share of each
        block of the window instead (`block_batch_positions`): no rank reads rows another rank uses.
        """
        per_epoch = self.n_tokens // self.batch_size
        if per_epoch == 0:
            raise ValueError(f"the {self.n_tokens} rows of this split do not fill one batch of {self.batch_size}")
        if self.blocked:
            yield from self._block_stream(start_batch, rank, world_size)
            return
        if self._resident is None and self.fits_device():
            self._resident = self.load_split()
        if self._resident is not None:
            yield from self._resident_batches(start_batch, per_epoch, rank, world_size)
            return
        rows = self._stream_rows(start_batch, per_epoch, rank, world_size)
        if self.device.type == "cuda":
            yield from self._cuda_batches(rows, self._gather_into, len)
            return
        yield from ordered_map(self._cpu_batch, rows, threads=self.gather_threads, depth=self.prefetch)

    def _gather_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        self.gather(rows, out=out)

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
            acts, _ = self.gather(self.rows_at(np.arange(lo, min(lo + chunk, self.n_tokens))))  # sequential reads
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

    def _cuda_batches(self, items: Iterator, fill: Callable[[object, np.ndarray], None],
                      size: Callable[[object], int]) -> Iterator[torch.Tensor]:
        """Worker threads `fill` reused pinned buffers with each item's rows (`size` of them); a copy stream moves
        each to the device, cast there.

        A buffer goes back to the pool with the event of its copy, and a gather thread waits for that event
        before refilling it. The pool holds one buffer more than can be in flight, so a gather never waits
        for the consumer.
        """
        in_flight = max(1, self.prefetch) + self.gather_threads  # at most this many in ordered_map
        pool: queue.Queue = queue.Queue()
        for _ in range(in_flight + 1):
            pool.put((torch.empty((self.batch_size, self.d_in), dtype=self.stored_dtype, pin_memory=True), None))

        def fill_buffer(item: object) -> tuple[torch.Tensor, torch.Tensor]:
            buf, copied = pool.get()
            if copied is not None:
                copied.synchronize()
            view = buf[: size(item)]
            fill(item, view.numpy())
            return buf, view

        copy_stream = torch.cuda.Stream(self.device)
        for buf, view in ordered_map(fill_buffer, items, threads=self.gather_threads, depth=self.prefetch):
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

    # --- out of core: blocks through a shuffle buffer -------------------------------------------------------------
    def block_batches_per_epoch(self, world_size: int = 1) -> int:
        """Full batches per epoch out of core: the fewest any rank's share fills (the rest of the epoch is dropped)."""
        sizes = np.diff(block_starts(self.n_tokens, self.block_rows))
        return min(int(rank_share(sizes, r, world_size)[1].sum()) // rank_batch(self.batch_size, r, world_size)
                   for r in range(world_size))

    def block_batch_positions(self, start_batch: int = 0, rank: int = 0, world_size: int = 1
                              ) -> Iterator[np.ndarray]:
        """Positions in the split of this rank's rows of each out-of-core batch from `start_batch` on, endlessly:
        what `stream` yields when `blocked`, computed without reading a row (a pure function of the seed)."""
        for parts in self._block_parts(start_batch, rank, world_size, lambda windows: windows):
            yield np.concatenate([pos[take] for pos, take in parts])

    def _block_stream(self, start_batch: int, rank: int, world_size: int) -> Iterator[torch.Tensor]:
        """Windows are read one ahead by a reader thread (each by `read_threads` block reads); batches are drawn
        from them by the gather threads."""
        def read(windows: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            return ordered_map(lambda w: (self._read_window(w[0]), w[1]), windows, threads=1, depth=1,
                               name="vsae-blocks")

        parts = self._block_parts(start_batch, rank, world_size, read)
        if self.device.type == "cuda":
            yield from self._cuda_batches(parts, fill_parts, lambda p: sum(t.size for _, t in p))
            return
        yield from ordered_map(self._draw_cpu, parts, threads=self.gather_threads, depth=self.prefetch)

    def _draw_cpu(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
        out = np.empty((sum(t.size for _, t in parts), self.d_in), dtype=self._acts[0].dtype)
        fill_parts(parts, out)
        return torch.from_numpy(out).to(self.dtype)

    def _block_parts(self, start_batch: int, rank: int, world_size: int, load: Callable) -> Iterator[list]:
        """Each batch as parts (window payload, indices into it), the payload of a window being `load`ed from
        its positions: the positions themselves, or the rows read from disk."""
        if not 0 <= rank < world_size <= self.batch_size:
            raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size <= batch_size")
        per_epoch = self.block_batches_per_epoch(world_size)
        if per_epoch == 0:
            raise ValueError(f"no rank's share of the {self.n_tokens} rows fills a batch of {self.batch_size}")
        b = rank_batch(self.batch_size, rank, world_size)
        first, skip = divmod(start_batch, per_epoch)
        windows = itertools.chain.from_iterable(
            self._epoch_windows(e, rank, world_size, (skip if e == first else 0) * b,
                                (per_epoch - (skip if e == first else 0)) * b)
            for e in itertools.count(first))
        return draw_batches(load(windows), b)

    def _epoch_windows(self, epoch: int, rank: int, world_size: int, skip: int, take: int
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, draw order) of this rank's windows of `epoch`, rows `skip`..`skip + take` of its draws.

        The blocks are shuffled by (seed, epoch) and dealt out in windows of `buffer_blocks`; rank r owns the r-th
        of `world_size` contiguous slices of each block, and draws its window's rows in the order of a
        permutation seeded by (seed, epoch, window, rank).
        """
        starts = block_starts(self.n_tokens, self.block_rows)
        order = np.random.default_rng([self.seed, epoch, BLOCK_TAG]).permutation(starts.size - 1)
        for w, lo in enumerate(range(0, order.size, self.buffer_blocks)):
            if take <= 0:
                return
            blocks = order[lo : lo + self.buffer_blocks]
            offset, n = rank_share(starts[blocks + 1] - starts[blocks], rank, world_size)
            if skip >= n.sum():
                skip -= int(n.sum())
                continue
            pos = np.concatenate([np.arange(a, a + k) for a, k in zip(starts[blocks] + offset, n, strict=True)])
            draws = np.random.default_rng([self.seed, epoch, BLOCK_TAG, w, rank]).permutation(pos.size)
            draws = draws[skip : skip + take]
            skip, take = 0, take - draws.size
            yield pos, draws

    def _read_window(self, positions: np.ndarray) -> np.ndarray:
        """The activations of `positions` (ascending within each block), read as contiguous runs of rows."""
        out = np.empty((positions.size, self.d_in), dtype=self._acts[0].dtype)
        pieces = contiguous_runs(self.rows_at(positions), self._shard_starts)
        list(ordered_map(lambda p: self._read_piece(*p, out), pieces, threads=self.read_threads, depth=1,
                         name="vsae-read"))
        return out

    def _read_piece(self, shard: int, local: int, n: int, at: int, out: np.ndarray) -> None:
        """Rows local..local+n of `shard` into out[at : at + n], by path: a shard removed or replaced since the
        loader opened the cache is an error naming it (a memmap would go on reading the old file)."""
        path, offset, ident = self._files[shard]
        fix = "restore the cache's files (or harvest it again), then resume the run from its last checkpoint"
        dest = memoryview(out[at : at + n]).cast("B")
        start = offset + local * out.shape[1] * out.itemsize
        try:
            fd, direct = _open_for_blocks(path)
        except OSError as e:
            raise CacheError(f"cache {self.cache_dir}: shard {path.name} cannot be read ({e.strerror}): it was "
                             f"removed while the loader read it; {fix}") from None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != ident:
                raise CacheError(f"cache {self.cache_dir}: shard {path.name} was replaced while the loader read it; "
                                 f"{fix}")
            if not (_read_direct if direct else _read_buffered)(fd, dest, start):
                raise CacheError(f"cache {self.cache_dir}: shard {path.name} was truncated while the loader "
                                 f"read it; {fix}")
        finally:
            os.close(fd)


ALIGN = 4096  # O_DIRECT: file offsets, lengths and buffer addresses are multiples of the logical block size
DIRECT_CHUNK = 8 << 20
_scratch = threading.local()


def _open_for_blocks(path: Path) -> tuple[int, bool]:
    """(fd, whether it bypasses the page cache). Blocks are read once per epoch, so O_DIRECT saves the page cache's
    copy and its reclaim (several times dd's CPU cost per GB otherwise); filesystems without it read buffered."""
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY), False


def _read_buffered(fd: int, dest: memoryview, start: int) -> bool:
    """Fill `dest` from file offset `start`; False if the file ends first."""
    done = 0
    while done < dest.nbytes:
        got = os.preadv(fd, [dest[done:]], start + done)
        if got == 0:
            return False
        done += got
    return True


def _read_direct(fd: int, dest: memoryview, start: int) -> bool:
    """`_read_buffered` through O_DIRECT: aligned chunks into this thread's aligned scratch, copied out."""
    if getattr(_scratch, "buf", None) is None:
        raw = np.empty(DIRECT_CHUNK + 2 * ALIGN, dtype=np.uint8)
        _scratch.buf = raw[(-raw.ctypes.data) % ALIGN :][: DIRECT_CHUNK + ALIGN]
    buf = memoryview(_scratch.buf)
    done = 0
    while done < dest.nbytes:
        lo = (start + done) // ALIGN * ALIGN
        n = min(dest.nbytes - done, DIRECT_CHUNK - (start + done - lo))
        want = -(-(start + done + n - lo) // ALIGN) * ALIGN
        got = 0
        while lo + got < start + done + n:
            k = os.preadv(fd, [buf[got:want]], lo + got)
            if k == 0:
                return False
            got += k
        dest[done : done + n] = buf[start + done - lo : start + done - lo + n]
        done += n
    return True


def block_starts(n_tokens: int, block_rows: int) -> np.ndarray:
    """The first position of each block of a split, then `n_tokens`: blocks of `block_rows` consecutive
    positions (whole sequences when `block_rows` is a multiple of the sequence length), the last one shorter."""
    return np.append(np.arange(0, n_tokens, block_rows), n_tokens)


def rank_share(sizes: np.ndarray, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(offset, length) of `rank`'s contiguous share of blocks of `sizes` rows, each cut into `world_size` parts
    that differ by at most one row."""
    lo, hi = sizes * rank // world_size, sizes * (rank + 1) // world_size
    return lo, hi - lo


def rank_batch(batch_size: int, rank: int, world_size: int) -> int:
    """Rows of a global batch that `rank` draws: as many as rows rank, rank + world_size, ... of it."""
    return len(range(rank, batch_size, world_size))


def draw_batches(windows: Iterable[tuple[object, np.ndarray]], b: int) -> Iterator[list[tuple[object, np.ndarray]]]:
    """Cut the windows' draw orders, concatenated, into batches of `b` rows, each a list of (payload, indices).

    A batch left unfinished at the end of a window carries copies of its rows, not the window: only the windows
    being drawn from stay alive.
    """
    parts: list = []
    have = 0
    for payload, draws in windows:
        i = 0
        while i < draws.size:
            take = draws[i : i + b - have]
            parts.append((payload, take))
            have, i = have + take.size, i + take.size
            if have == b:
                yield parts
                parts, have = [], 0
        if parts:
            carried = np.concatenate([p[t] for p, t in parts])
            parts = [(carried, np.arange(have))]
        del payload


def fill_parts(parts: list[tuple[np.ndarray, np.ndarray]], out: np.ndarray) -> None:
    """out[i] = the i-th row the parts name, in order."""
    at = 0
    for data, take in parts:
        np.take(data, take, axis=0, out=out[at : at + take.size], mode="clip")  # "raise" would buffer the copy
        at += take.size


def contiguous_runs(rows: np.ndarray, shard_starts: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(shard, first local row, n rows, index in `rows`) of each run of consecutive global `rows` in one shard."""
    shard = np.searchsorted(shard_starts, rows, side="right") - 1
    cut = np.flatnonzero((np.diff(rows) != 1) | (np.diff(shard) != 0)) + 1
    firsts = np.concatenate([[0], cut])
    lengths = np.diff(np.append(firsts, rows.size))
    return [(int(shard[i]), int(rows[i] - shard_starts[shard[i]]), int(n), int(i))
            for i, n in zip(firsts, lengths, strict=True) if n]


def _shard_locations(acts: list[np.ndarray]) -> list[tuple[Path, int, tuple[int, int]]]:
    """(path, data offset, (device, inode)) of each shard's activations file, as opened."""
    out = []
    for a in acts:
        st = os.stat(a.filename)
        out.append((Path(a.filename), int(a.offset), (st.st_dev, st.st_ino)))
    return out
