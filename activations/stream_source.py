"""Training batches straight from a model's forward passes, through a seeded shuffle buffer.

The stream is the harvest's (activations/harvest.py): the same contexts, the same forward batches (within shards,
`forward_batch` contexts each), the same storage dtype, so `--cache-out` writes the very cache `vsae harvest` would.
The training split is the loader's: the sequences `split_sequences(n_sequences, eval_fraction)` does not hold out,
in sequence order. Held-out sequences are forwarded (and written with `--cache-out`) but never enter the buffer.

The buffer holds `shuffle_buffer` rows; it starts as the first rows of the training stream, which are also the
sample the normalisation scale is estimated from. Draw j takes `batch_size` distinct slots chosen by
rng([seed, j]); the next draw first refills those slots with the stream's next rows. Until then the buffer is
still the state before draw j, so a checkpoint taken between a draw and its optimiser step is exact. The state
after j draws is (buffer rows, stream position, j); `StreamBatches.checkpoint` gives it as tensors, and a source
`restore`d from them continues exactly. At the stream's end drawn slots are dropped and the buffer drains.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from activations.cache import (
    MANIFEST,
    CacheError,
    ShardWriter,
    manifest_hash,
    read_manifest,
    update_totals,
    write_json_atomic,
)
from activations.corpus import CorpusStats, corpus_documents
from activations.distributed import Ranks
from activations.guard import DirLock
from activations.harvest import (
    HarvestConfig,
    HostCopies,
    _begin_manifest,
    _check_config,
    _commit_shard,
    _finish,
    _Grab,
    _hook_width,
    _layout,
    _model_fields,
    _prepare_out_dir,
    _settings,
    _shard_contexts,
    _verified_shards,
    put_rows,
)
from activations.loader import split_sequences
from activations.models import ModelSource, check_hook, default_hook, load_model, stop_layer
from activations.prefetch import background
from activations.tokens import pack_contexts

STATE_PREFIX = "stream."  # keys of the source's tensors in the trainer state
_HARVEST_FIELDS = {f.name: f for f in fields(HarvestConfig)}


def _as_harvest(name: str):
    """A field with the default and help of HarvestConfig's `name`: the stream's flags mean what harvest's do."""
    f = _HARVEST_FIELDS[name]
    if f.default_factory is not MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    return field(default=f.default, metadata=f.metadata)


@dataclass
class StreamConfig:
    """Where streaming training's activations come from (`vsae train --model ...`): harvest's source settings."""

    model: str = _as_harvest("model")
    model_path: str | None = _as_harvest("model_path")
    hook: str | None = _as_harvest("hook")
    corpus: list[str] = _as_harvest("corpus")
    context: int = _as_harvest("context")
    dtype: str = field(default=_HARVEST_FIELDS["dtype"].default, metadata={
        "help": "dtype the activations are kept in (shuffle buffer, --cache-out), as harvest's --dtype"})
    model_dtype: str = _as_harvest("model_dtype")
    keep_bos: bool = _as_harvest("keep_bos")
    forward_batch: int = field(default=_HARVEST_FIELDS["batch_size"].default, metadata={
        "help": "streaming: contexts per forward pass (harvest's --batch-size)"})
    shard_tokens: int = _as_harvest("shard_tokens")
    stream_tokens: int | None = field(default=None, metadata={
        "help": "streaming: activation rows the model produces, held-out sequences included (harvest's --tokens: "
                "what --cache-out holds); unset: just enough for --steps / --tokens, else harvest's default"})
    shuffle_buffer: int = field(default=1 << 16, metadata={
        "help": "streaming: rows in the shuffle buffer that mixes contexts (its first fill also estimates the "
                "normalisation scale); at least the batch size"})
    cache_out: str | None = field(default=None, metadata={
        "help": "streaming: also write the activations as a cache here (what vsae harvest with the same "
                "settings writes), so one pass both trains and keeps the data"})

    def harvest_config(self, device: str, tokens: int) -> HarvestConfig:
        """The harvest these settings stand for (its `out` is --cache-out, or unused)."""
        return HarvestConfig(out=self.cache_out or "", model=self.model, model_path=self.model_path, hook=self.hook,
                             corpus=list(self.corpus), tokens=tokens, context=self.context, dtype=self.dtype,
                             model_dtype=self.model_dtype, batch_size=self.forward_batch, device=device,
                             shard_tokens=self.shard_tokens, keep_bos=self.keep_bos, progress=False)


def stream_tokens_for(rows_needed: int, rows_per_seq: int, eval_fraction: float) -> int:
    """The fewest stream rows (whole sequences) whose training split holds `rows_needed` rows."""
    n = max(1, math.ceil(rows_needed / rows_per_seq / max(1e-9, 1 - eval_fraction)))
    while len(split_sequences(n, eval_fraction)[0]) * rows_per_seq < rows_needed:
        n += 1
    return n * rows_per_seq


def draw_slots(seed: int, step: int, n_valid: int, batch_size: int) -> np.ndarray:
    """The buffer slots of draw `step`: `batch_size` distinct ones, a pure function of (seed, step)."""
    return np.random.default_rng([seed, step, 0x57EA]).choice(n_valid, batch_size, replace=False)


def fill_slots(buffer: torch.Tensor, n_valid: int, holes: np.ndarray, new: torch.Tensor) -> int:
    """Put `new` rows into the first len(new) `holes` of buffer[:n_valid]; holes left over (the stream ended) are
    dropped by moving the later rows down. Returns the new count of valid rows."""
    m = new.shape[0]
    if m:
        buffer[torch.from_numpy(holes[:m]).to(buffer.device)] = new
    if m == len(holes):
        return n_valid
    keep = torch.ones(n_valid, dtype=torch.bool)
    keep[torch.from_numpy(holes[m:])] = False
    kept = buffer[:n_valid][keep.to(buffer.device)]
    buffer[: kept.shape[0]] = kept
    return kept.shape[0]


class StreamSource:
    """A model, a corpus and a hook as a source of shuffled training batches, in place of `ActivationLoader`.

    Like the loader it has `manifest` (the cache these settings would make, its mean squared norm estimated from
    the first buffer fill), `n_tokens` (rows of the training split) and `stream(start_batch)`; `restore` gives it
    the state a checkpoint saved at `start_batch`. `info` is what train.json records of the stream.
    """

    def __init__(self, cfg: StreamConfig, batch_size: int, *, seed: int, eval_fraction: float, device,
                 rows_needed: int | None = None, world_size: int = 1) -> None:
        _check_stream(cfg, batch_size, world_size)
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.device = torch.device(device)
        self.source = ModelSource(cfg.model, cfg.model_path)
        self.model = load_model(self.source, device=str(self.device), dtype=cfg.model_dtype)
        self.hook = cfg.hook or default_hook(self.model)
        check_hook(self.model, self.hook)
        self.layer = stop_layer(self.model, self.hook)
        self.d_in = _hook_width(self.model, self.hook, self.layer, str(self.device))
        rows_per_seq = cfg.context - (0 if cfg.keep_bos else 1)
        tokens = cfg.stream_tokens or (stream_tokens_for(rows_needed, rows_per_seq, eval_fraction) if rows_needed
                                       else _HARVEST_FIELDS["tokens"].default)
        self.harvest = cfg.harvest_config(str(self.device), tokens)
        _check_config(self.harvest)
        self.layout = _layout(self.harvest)
        train, _ = split_sequences(self.layout.n_seqs, eval_fraction)
        self.train_rank = np.full(self.layout.n_seqs, -1, dtype=np.int64)
        self.train_rank[train] = np.arange(len(train))
        self.n_tokens = len(train) * rows_per_seq
        if rows_needed and rows_needed > self.n_tokens:
            raise ValueError(f"the run needs {rows_needed:,} training rows but --stream-tokens {tokens:,} gives "
                             f"{self.n_tokens:,} (held-out sequences excluded); raise --stream-tokens or lower "
                             f"--steps / --tokens")
        self.sample = self._first_rows(min(cfg.shuffle_buffer, self.n_tokens))
        mean_sq = float(self.sample.double().pow(2).sum(1).mean())
        settings = _settings(self.harvest, self.source, self.hook, self.layout)
        self.manifest = {"d_in": self.d_in, "settings": settings, "shards": [], "mean_squared_norm": mean_sq,
                         "n_sequences": self.layout.n_seqs, "rows_per_sequence": rows_per_seq}
        self.info = {"cache": cfg.cache_out or "", "cache_hash": manifest_hash(self.manifest),
                     "stream": {**asdict(cfg), "stream_tokens": tokens, "norm_sample_tokens": len(self.sample)}}
        self._restored: dict[str, torch.Tensor] | None = None

    def batch_order(self) -> dict:
        """How batches are drawn, for train.json (the loader's counterpart names its shuffle)."""
        return {"kind": "stream_buffer", "rows": len(self.sample)}

    def use_batch_order(self, saved: dict) -> None:
        """A resumed run's saved order: the buffer's is fixed by the stream settings, which resuming compares."""

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from the state a checkpoint saved (its `stream.*` tensors)."""
        missing = [k for k in ("buffer", "position", "step") if STATE_PREFIX + k not in state]
        if missing:
            raise ValueError(f"the saved trainer state has no stream state ({', '.join(missing)}): it was not saved "
                             f"by a streaming run; resume it with --cache, or train into a new --out")
        self._restored = {k.removeprefix(STATE_PREFIX): v for k, v in state.items() if k.startswith(STATE_PREFIX)}

    def stream(self, start_batch: int = 0, rank: int = 0, world_size: int = 1) -> StreamBatches:
        """Batches from draw `start_batch` on (from a `restore`d state unless it is 0)."""
        if start_batch == 0:
            return StreamBatches(self, self.sample.clone(), len(self.sample), 0)
        saved = self._restored
        if saved is None or int(saved["step"]) != start_batch:
            have = None if saved is None else int(saved["step"])
            raise ValueError(f"no stream state saved at step {start_batch} (have: {have}); the run's checkpoint "
                             f"does not match its trainer state: train into a new --out")
        return StreamBatches(self, saved["buffer"].to(self.device), int(saved["position"]), start_batch)

    def _first_rows(self, n: int) -> torch.Tensor:
        rows, have = [], 0
        producer = self.rows_from(0, write=False)
        try:
            for part in producer:
                rows.append(part[: n - have])
                have += rows[-1].shape[0]
                if have >= n:
                    break
        finally:
            producer.close()
        return torch.cat(rows)

    def rows_from(self, start_row: int, write: bool) -> Iterator[torch.Tensor]:
        """The training rows from row `start_row` of the training stream on, in order, in forward-batch pieces;
        with `write`, --cache-out's missing shards are written on the way (forwarding earlier contexts for them)."""
        out = _CacheOut(self) if write and self.cfg.cache_out else None
        layout, rows = self.layout, self.layout.rows_per_seq
        train_seqs = np.flatnonzero(self.train_rank >= 0)
        first_seq = train_seqs[start_row // rows] if start_row < self.n_tokens else layout.n_seqs
        first_shard = min(first_seq // layout.shard_seqs, out.first_todo if out else layout.n_shards)
        stats = CorpusStats()
        contexts = background(pack_contexts(corpus_documents(self.harvest.corpus, stats), self.model.tokenizer,
                                            self.harvest.context), depth=4 * layout.shard_seqs, name="vsae-tokenize")
        grab = _Grab()  # each producer its own: the hook keeps the latest activation there
        try:
            with torch.no_grad(), self.model.hooks(fwd_hooks=[(self.hook, grab)]):
                for index, first, seqs in _shard_contexts(contexts, self.harvest, layout,
                                                          range(first_shard, layout.n_shards)):
                    shard = out.open(index, len(seqs)) if out else None
                    yield from self._shard_rows(grab, first, seqs, start_row, shard, out)
                    if shard is not None:
                        out.commit(shard)
            if out:
                out.finish(stats)
        finally:
            contexts.close()
            if out:
                out.close()

    def _shard_rows(self, grab: _Grab, first: int, seqs: list[np.ndarray], start_row: int, shard,
                    out: _CacheOut | None) -> Iterator[torch.Tensor]:
        """One shard's training rows from `start_row` on, forward batch by forward batch."""
        rows, fb = self.layout.rows_per_seq, self.harvest.batch_size
        tokens = torch.from_numpy(np.stack(seqs))
        for b in range(0, len(seqs), fb):
            batch = tokens[b : b + fb]
            ranks = self.train_rank[first + b : first + b + len(batch)]
            needed = ranks.max() >= 0 and (ranks.max() + 1) * rows > start_row
            if shard is None and not needed:
                continue  # nothing to train on or to write: no forward
            acts = self._forward(grab, batch)  # [n, rows, d_in] in the storage dtype
            if shard is not None:
                out.put(shard, b * rows, acts, batch, first + b)
            if needed:
                train_rows = acts[torch.from_numpy(ranks >= 0).to(acts.device)].reshape(-1, self.d_in)
                skip = max(0, start_row - int(ranks[ranks >= 0][0]) * rows)
                yield train_rows[skip:]

    def _forward(self, grab: _Grab, batch: torch.Tensor) -> torch.Tensor:
        pin = self.device.type == "cuda"  # as the harvest: a pageable copy would wait for the GPU to drain
        self.model((batch.pin_memory() if pin else batch).to(self.device, non_blocking=pin), stop_at_layer=self.layer)
        start = 0 if self.cfg.keep_bos else 1
        return grab.value[:, start:].to(getattr(torch, self.cfg.dtype))


class StreamBatches:
    """One pass of a `StreamSource`: an iterator of [batch_size, d_in] batches in the storage dtype, and the state
    after any draw (`checkpoint`). The model runs in a background thread, a few forward batches ahead."""

    def __init__(self, source: StreamSource, rows: torch.Tensor, position: int, step: int) -> None:
        self.src = source
        capacity = max(len(source.sample), rows.shape[0])
        self.buffer = torch.empty((capacity, source.d_in), dtype=rows.dtype, device=source.device)
        self.buffer[: rows.shape[0]] = rows
        self.n_valid, self.position, self.drawn = rows.shape[0], position, step
        self.holes: np.ndarray | None = None  # slots of the last draw, refilled at the next one
        self._producer: Iterator[torch.Tensor] | None = None
        self._carry = rows[:0]  # rows pulled from the producer, not yet in the buffer
        self._final_hash: str | None = None

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> torch.Tensor:
        self._refill()
        B = self.src.batch_size
        if self.n_valid < B:
            raise RuntimeError(f"the stream ran out after {self.drawn} batches ({self.n_valid} rows left); "
                               f"raise --stream-tokens")
        self.holes = draw_slots(self.src.seed, self.drawn, self.n_valid, B)
        self.drawn += 1
        return self.buffer[torch.from_numpy(self.holes).to(self.buffer.device)]

    def checkpoint(self, step: int, final: bool = False) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, train.json fields) of the state after `step` draws, or None when this pass cannot give it
        (a state ahead of the stream: unchanged since loaded, so its own checkpoint stands). With `final`,
        --cache-out is finished first, so train.json names the finished cache's hash."""
        if step == self.drawn and self.holes is not None:  # the refill the next draw would do, on a copy
            rows = self.buffer[: self.n_valid].clone()
            new = self._peek(len(self.holes))
            rows = rows[: fill_slots(rows, self.n_valid, self.holes, new)]
            position = self.position + new.shape[0]
        elif step == self.drawn or (step == self.drawn - 1 and self.holes is not None):
            rows, position = self.buffer[: self.n_valid], self.position  # not refilled yet: the state before
        else:
            return None
        tensors = {STATE_PREFIX + "buffer": rows, STATE_PREFIX + "position": torch.tensor(position),
                   STATE_PREFIX + "step": torch.tensor(step)}
        return tensors, {"cache_hash": self._cache_hash(final), "stream_position": position}

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()

    def _refill(self) -> None:
        if self.holes is None:
            return
        new = self._peek(len(self.holes))
        self._carry = self._carry[new.shape[0]:]
        self.position += new.shape[0]
        self.n_valid = fill_slots(self.buffer, self.n_valid, self.holes, new)
        self.holes = None

    def _peek(self, n: int) -> torch.Tensor:
        """The stream's next `n` rows (fewer at its end), without consuming them."""
        if self._producer is None:
            self._producer = background(self.src.rows_from(self.position, write=True), depth=4, name="vsae-stream")
        parts = [self._carry]
        have = self._carry.shape[0]
        while have < n:
            part = next(self._producer, None)
            if part is None:
                break
            parts.append(part)
            have += part.shape[0]
        self._carry = torch.cat(parts) if len(parts) > 1 else self._carry
        return self._carry[:n]

    def _cache_hash(self, final: bool) -> str:
        if not (final and self.src.cfg.cache_out):
            return self.src.info["cache_hash"]
        if self._final_hash is None:
            self._peek(0)  # starts the producer if no draw has
            for _ in self._producer:  # the rest of the stream: forwarded only to finish the cache
                pass
            self._final_hash = manifest_hash(read_manifest(self.src.cfg.cache_out))
        return self._final_hash


class _CacheOut:
    """--cache-out: the harvest's cache, written shard by shard as the stream passes, locked meanwhile; a cache a
    killed run left is resumed from its manifest, as the harvest does."""

    def __init__(self, src: StreamSource) -> None:
        h, self.src = src.harvest, src
        self.dir = Path(h.out)
        self.lock = DirLock(self.dir, "cache")
        try:
            self.lock.__enter__()
        except OSError as e:
            raise CacheError(f"cannot write to --cache-out {self.dir}: {e.strerror or e}; choose a writable "
                             f"directory") from None
        try:
            _prepare_out_dir(self.dir, overwrite=False)
            self.manifest = _begin_manifest(self.dir, h, _settings(h, src.source, src.hook, src.layout),
                                            _model_fields(h, src.model, src.source, src.layer, src.d_in, src.layout))
            done = _verified_shards(self.dir, self.manifest, src.d_in, h.dtype)
            self.manifest["shards"] = [done[i] for i in sorted(done)]
            update_totals(self.manifest)
            write_json_atomic(self.dir / MANIFEST, self.manifest)
        except BaseException:
            self.lock.__exit__()
            raise
        todo = [i for i in range(src.layout.n_shards) if i not in done]
        self.t0, self.built_rows = time.perf_counter(), 0
        self.todo, self.first_todo = set(todo), min(todo, default=src.layout.n_shards)
        rows = src.layout.rows_per_seq
        self.copies = HostCopies(src.device, h.batch_size * rows, src.d_in, getattr(torch, h.dtype))
        self.positions = np.arange(h.context - rows, h.context, dtype=np.int32)

    def open(self, index: int, n_seqs: int) -> ShardWriter | None:
        """The writer of shard `index`, or None when the cache has it already."""
        if index not in self.todo:
            return None
        return ShardWriter(self.dir, index, n_seqs * self.src.layout.rows_per_seq, self.src.d_in, self.src.cfg.dtype)

    def put(self, shard: ShardWriter, lo: int, acts: torch.Tensor, batch: torch.Tensor, first_seq: int) -> None:
        """One forward batch's rows (acts [n, rows, d_in]) and token rows into the shard from row `lo`."""
        put_rows(self.copies, shard, lo, acts, batch, first_seq, self.positions)

    def commit(self, shard: ShardWriter) -> None:
        self.copies.drain()  # every row is in its memmap before the shard is listed
        _commit_shard(shard, self.manifest, self.dir / MANIFEST)
        self.built_rows += shard.n_rows

    def finish(self, stats: CorpusStats) -> None:
        """List the cache complete, as the harvest does at its end."""
        built = [(self.built_rows, len(self.todo), asdict(stats) if self.todo else None)]
        _finish(self.dir, self.manifest, built, Ranks(), self.t0)

    def close(self) -> None:
        self.copies.close()
        self.lock.__exit__()


def _check_stream(cfg: StreamConfig, batch_size: int, world_size: int) -> None:
    if world_size > 1:
        raise ValueError("streaming training (--model) runs in one process; for several, harvest a cache (a "
                         "one-process run's --cache-out, or vsae harvest) and train on it with --cache under torchrun")
    if cfg.stream_tokens is not None and cfg.stream_tokens <= 0:
        raise ValueError(f"--stream-tokens must be a positive number of rows, got {cfg.stream_tokens}")
    if cfg.shuffle_buffer < batch_size:
        raise ValueError(f"--shuffle-buffer {cfg.shuffle_buffer} is smaller than one batch (--batch-size "
                         f"{batch_size}); give it several batches of rows")
