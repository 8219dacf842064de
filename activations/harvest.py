"""Run a model over a corpus and cache one hook's activations to disk, resumably."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from activations.atomic import temp_target
from activations.cache import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TOKEN_COLUMNS,
    CacheError,
    ShardWriter,
    read_manifest,
    stamp_shards,
    update_totals,
    verify_shard,
    write_json_atomic,
)
from activations.checksums import RECORD
from activations.corpus import CorpusStats, corpus_documents, describe_corpus
from activations.devices import resolve_device
from activations.guard import DirLock, plain_name
from activations.models import (
    EMBEDDED_MODEL,
    ModelSource,
    check_hook,
    default_hook,
    load_model,
    special_token_ids,
    stop_layer,
    tokenizer_id,
)
from activations.prefetch import background
from activations.tokens import pack_contexts

DTYPES = ("float16", "float32")
MODEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class HarvestConfig:
    out: str = field(metadata={"help": "output directory (the cache)"})
    model: str = field(default=EMBEDDED_MODEL, metadata={
        "help": f"TransformerLens model name (e.g. pythia-70m-deduped), or {EMBEDDED_MODEL} for the embedded model"})
    model_path: str | None = field(default=None, metadata={
        "help": "local Hugging Face checkpoint directory (overrides model; needs no network)"})
    hook: str | None = field(default=None, metadata={
        "help": "hook point to cache (unset: blocks.{n_layers // 2}.hook_resid_post)"})
    corpus: list[str] = field(default_factory=lambda: ["shakespeare"], metadata={
        "help": "shakespeare | stdlib | hf:NAME[:split[:column]] | .txt/.jsonl files or folders"})
    tokens: int = field(default=1_000_000, metadata={
        "help": "number of activation rows to cache (rounded up to whole contexts)"})
    context: int = field(default=128, metadata={"help": "tokens per context window, BOS included"})
    dtype: str = field(default="float16", metadata={"help": "storage dtype of the activations"})
    model_dtype: str = field(default="float32", metadata={
        "help": "dtype the model computes in: float32, or bfloat16 / float16 (about twice as fast on a GPU; "
                "activations then differ from float32 ones by the dtype's rounding)"})
    batch_size: int = field(default=32, metadata={"help": "contexts per forward pass"})
    device: str = field(default="auto", metadata={
        "help": "torch device (cpu, cuda, cuda:1, ...); auto: CUDA when this machine has it, else CPU"})
    shard_tokens: int = field(default=1 << 17, metadata={
        "help": "rows per shard file (rounded down to whole contexts)"})
    keep_bos: bool = field(default=False, metadata={
        "help": "keep the BOS position of each context (dropped by default: its norm is an outlier)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing cache made with other settings"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)


@dataclass
class HarvestSummary:
    out: str
    tokens: int
    shards: int
    built_shards: int
    bytes: int
    seconds: float
    tokens_per_second: float

    def line(self) -> str:
        return (
            f"cache {self.out}: {self.tokens:,} tokens in {self.shards} shards "
            f"({self.bytes / 1e6:,.1f} MB); built {self.built_shards} shards in "
            f"{self.seconds:,.1f} s ({self.tokens_per_second:,.0f} tok/s)"
        )


@dataclass(frozen=True)
class _Layout:
    """How the cache's rows fall into sequences and shards; fixed by the config alone."""

    rows_per_seq: int
    n_seqs: int
    shard_seqs: int
    n_shards: int


def _layout(cfg: HarvestConfig) -> _Layout:
    rows_per_seq = cfg.context - (0 if cfg.keep_bos else 1)
    n_seqs = math.ceil(cfg.tokens / rows_per_seq)
    shard_seqs = max(1, cfg.shard_tokens // rows_per_seq)
    return _Layout(rows_per_seq, n_seqs, shard_seqs, math.ceil(n_seqs / shard_seqs))


def harvest(cfg: HarvestConfig) -> HarvestSummary:
    """Write (or finish) the cache `cfg.out`; the same config always gives the same cache.

    The cache is locked for the whole run: a second harvest into it, or a reader of it, is refused meanwhile.
    """
    _check_config(cfg)
    out = Path(cfg.out)
    lock = DirLock(out, "cache")
    try:
        lock.__enter__()
    except OSError as e:
        raise CacheError(f"cannot write to --out {out}: {e.strerror or e}; choose a writable directory") from None
    try:
        return _harvest(cfg, out)
    finally:
        lock.__exit__()


def _harvest(cfg: HarvestConfig, out: Path) -> HarvestSummary:
    _prepare_out_dir(out, cfg.overwrite)

    source = ModelSource(cfg.model, cfg.model_path)
    model = load_model(source, device=cfg.device, dtype=cfg.model_dtype)
    hook = cfg.hook or default_hook(model)
    check_hook(model, hook)
    layer = stop_layer(model, hook)
    d_in = _hook_width(model, hook, layer, cfg.device)
    layout = _layout(cfg)

    manifest = _start_manifest(out, _settings(cfg, source, hook, layout), cfg.overwrite)
    manifest.update(_model_fields(cfg, model, source, layer, d_in, layout))
    todo = _keep_verified_shards(out, manifest, d_in, cfg.dtype, layout.n_shards)

    t0 = time.perf_counter()
    built_tokens = 0
    if todo:
        built_tokens, stats = _build_shards(model, hook, layer, d_in, cfg, out, manifest, layout, todo)
        manifest["corpus_stats"] = asdict(stats)
    manifest["complete"] = True
    update_totals(manifest)
    write_json_atomic(out / MANIFEST, manifest)
    stamp_shards(out, manifest)  # every listed shard was hashed in this run: its first reader need not
    seconds = time.perf_counter() - t0
    return HarvestSummary(
        out=str(out), tokens=manifest["total_tokens"], shards=len(manifest["shards"]),
        built_shards=len(todo),
        bytes=sum((out / e[k]).stat().st_size for e in manifest["shards"] for k in ("file", "tokens_file")),
        seconds=seconds, tokens_per_second=built_tokens / max(seconds, 1e-9),
    )


def _settings(cfg: HarvestConfig, source: ModelSource, hook: str, layout: _Layout) -> dict:
    """The manifest's `settings`: a resumed harvest must match them exactly (`_start_manifest`)."""
    return {
        "model": source.describe(),
        "hook_name": hook,
        "corpus": describe_corpus(cfg.corpus),
        "tokens": cfg.tokens,
        "context": cfg.context,
        "dtype": cfg.dtype,
        **({"model_dtype": cfg.model_dtype} if cfg.model_dtype != "float32" else {}),  # older caches lack it
        "bos_dropped": not cfg.keep_bos,
        "shard_sequences": layout.shard_seqs,
    }


def _model_fields(cfg: HarvestConfig, model, source: ModelSource, layer: int | None, d_in: int,
                  layout: _Layout) -> dict:
    """Manifest fields that follow from the settings and the loaded model."""
    return dict(
        d_in=d_in, tokenizer=tokenizer_id(model, source), n_sequences=layout.n_seqs,
        rows_per_sequence=layout.rows_per_seq, n_shards=layout.n_shards, stop_at_layer=layer,
        weight_processing="none (from_pretrained_no_processing)",
        bos_token_id=model.tokenizer.bos_token_id,
        special_token_ids=sorted(special_token_ids(model.tokenizer)),
        harvest={"batch_size": cfg.batch_size, "device": cfg.device},
    )


def _keep_verified_shards(out: Path, manifest: dict, d_in: int, dtype: str, n_shards: int) -> list[int]:
    """List only the shards that verify, write that manifest, and return the indices of the shards to build."""
    done = _verified_shards(out, manifest, d_in, dtype)
    manifest["shards"] = [done[i] for i in sorted(done)]
    update_totals(manifest)
    write_json_atomic(out / MANIFEST, manifest)
    return [i for i in range(n_shards) if i not in done]


def _build_shards(model, hook: str, layer: int | None, d_in: int, cfg: HarvestConfig, out: Path, manifest: dict,
                  layout: _Layout, todo: list[int]) -> tuple[int, CorpusStats]:
    """Forward and commit the shards in `todo`; returns the rows built and the statistics of the text read."""
    stats = CorpusStats()
    # Tokenization runs a few shards ahead in a thread, overlapped with the forward.
    contexts = background(
        pack_contexts(corpus_documents(cfg.corpus, stats), model.tokenizer, cfg.context),
        depth=4 * layout.shard_seqs, name="vsae-tokenize",
    )
    bar = tqdm(
        total=layout.n_seqs * layout.rows_per_seq, initial=sum(e["n_tokens"] for e in manifest["shards"]),
        unit="tok", unit_scale=True, desc=f"harvest {hook}", disable=not cfg.progress, smoothing=0.1,
    )
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vsae-commit")  # checksums, fsyncs
    copies = HostCopies(torch.device(cfg.device), cfg.batch_size * layout.rows_per_seq, d_in,
                        getattr(torch, cfg.dtype))
    pending: Future | None = None
    grab = _Grab()
    built_tokens = 0
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[(hook, grab)]):
            for index, first, seqs in _shard_contexts(contexts, cfg, layout, todo):
                shard = _run_shard(model, grab, layer, cfg, out, index, first, seqs, d_in, bar, copies)
                copies.drain()  # every row of the shard is in its memmap before it is committed
                if pending is not None:
                    pending.result()
                pending = writer.submit(_commit_shard, shard, manifest, out)
                built_tokens += shard.n_rows
        if pending is not None:
            pending.result()
    except OSError as e:
        raise CacheError(f"cannot write the cache in {out}: {e}; free space or choose another --out") from e
    finally:
        copies.close()
        writer.shutdown(wait=True)
        bar.close()
    return built_tokens, stats


def _shard_contexts(contexts: Iterator[np.ndarray], cfg: HarvestConfig, layout: _Layout,
                    todo: list[int]) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """(shard index, first sequence, its sequences) for each shard in `todo`, in order.

    The contexts of shards already built are read and dropped, so a resumed shard gets the very sequences it
    would have got in one uninterrupted harvest.
    """
    for index in range(layout.n_shards):
        first = index * layout.shard_seqs
        n = min(layout.shard_seqs, layout.n_seqs - first)
        seqs = list(islice(contexts, n))
        if index not in todo:
            continue
        if len(seqs) < n:
            raise CacheError(
                f"corpus {' '.join(cfg.corpus)} gives only {first + len(seqs)} "
                f"contexts of {cfg.context} tokens, fewer than the {layout.n_seqs} that "
                f"--tokens {cfg.tokens} needs; lower --tokens or add text"
            )
        yield index, first, seqs


class _Grab:
    """Forward hook that keeps the latest activation of its hook point."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, act: torch.Tensor, hook) -> None:
        self.value = act


class HostCopies:
    """Moves each batch's activations from the model's device into a shard's memmap, off the forward's path.

    A batch is cast to the storage dtype on the device and copied into one of `n_buffers` reused host buffers:
    on CUDA a pinned buffer, filled by a non-blocking copy on a copy stream that waits only for that batch's
    forward. A writer thread waits for the copy (its event) and moves the rows into the memmap while the next
    forward runs. A buffer is refilled once the writer has emptied it: with two, the copy and write of batch i
    overlap the forward of batch i + 1. On the CPU the same path runs with plain buffers and no stream.
    """

    def __init__(self, device: torch.device, max_rows: int, d_in: int, dtype: torch.dtype, n_buffers: int = 2):
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty((max_rows, d_in), dtype=dtype, pin_memory=self.cuda) for _ in range(n_buffers)]
        self.busy: list[Future | None] = [None] * n_buffers
        self.turn = 0
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vsae-rows")
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def put(self, act: torch.Tensor, dest: np.ndarray) -> None:
        """Queue act [n, d_in] (on the model's device) to be written into dest [n, d_in] (a memmap slice)."""
        i, self.turn = self.turn, (self.turn + 1) % len(self.buffers)
        if self.busy[i] is not None:
            self.busy[i].result()  # emptied (and a failed write raises here)
        host = self.buffers[i][: act.shape[0]]
        act = act.to(host.dtype)  # cast where the activations are: half the bytes to copy
        done = None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(act.device))
            with torch.cuda.stream(self.stream):
                host.copy_(act, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
            act.record_stream(self.stream)  # not reused by the next forward before the copy has read it
        else:
            host.copy_(act)
        self.busy[i] = self.writer.submit(_write_rows, host, dest, done)

    def drain(self) -> None:
        """Wait until every queued batch is in its memmap."""
        for i, f in enumerate(self.busy):
            if f is not None:
                f.result()
                self.busy[i] = None

    def close(self) -> None:
        self.writer.shutdown(wait=True)


def _write_rows(host: torch.Tensor, dest: np.ndarray, done) -> None:
    if done is not None:
        done.synchronize()
    dest[...] = host.numpy()


def _run_shard(model, grab, layer, cfg, out, index, first, seqs, d_in, bar, copies: HostCopies) -> ShardWriter:
    """Forward one shard's sequences batch by batch; `copies` moves the activations into its memmaps."""
    ctx = cfg.context
    start = 0 if cfg.keep_bos else 1
    rows = ctx - start
    shard = ShardWriter(out, index, len(seqs) * rows, d_in, cfg.dtype)
    tokens = torch.from_numpy(np.stack(seqs))
    positions = np.arange(start, ctx, dtype=np.int32)
    pin = copies.cuda  # a pageable host-to-device copy would wait for the GPU to drain
    for b in range(0, len(seqs), cfg.batch_size):
        batch = tokens[b : b + cfg.batch_size]
        model((batch.pin_memory() if pin else batch).to(cfg.device, non_blocking=pin), stop_at_layer=layer)
        lo, hi = b * rows, (b + len(batch)) * rows
        copies.put(grab.value[:, start:].reshape(-1, d_in), shard.acts[lo:hi])
        tok_rows = shard.tokens[lo:hi].reshape(len(batch), rows, len(TOKEN_COLUMNS))
        tok_rows[:, :, 0] = batch[:, start:].numpy()
        tok_rows[:, :, 1] = (first + b + np.arange(len(batch), dtype=np.int32))[:, None]
        tok_rows[:, :, 2] = positions[None, :]
        bar.update(hi - lo)
    return shard


def _commit_shard(shard: ShardWriter, manifest: dict, out: Path) -> None:
    """Finalise a shard's files, then list it in the manifest (in that order, for crash safety)."""
    manifest["shards"].append(shard.finalize())
    manifest["shards"].sort(key=lambda e: e["index"])
    update_totals(manifest)
    write_json_atomic(out / MANIFEST, manifest)


def _check_config(cfg: HarvestConfig) -> None:
    if cfg.tokens <= 0:
        raise ValueError(f"--tokens must be a positive number of tokens, got {cfg.tokens}")
    if cfg.context < 2:
        raise ValueError(f"--context must be at least 2 tokens, got {cfg.context}")
    if cfg.model_dtype not in MODEL_DTYPES:
        raise ValueError(f"--model-dtype must be one of {', '.join(MODEL_DTYPES)}, got {cfg.model_dtype!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.shard_tokens <= 0:
        raise ValueError(f"--shard-tokens must be positive, got {cfg.shard_tokens}")


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Make `out` (refusing directories that hold something other than a cache)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".vsae-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CacheError(f"cannot write to --out {out}: {e.strerror or e}; choose a writable directory") from e
    ours = [p for p in out.iterdir() if _is_cache_file(p)]
    others = [p.name for p in out.iterdir() if not _is_cache_file(p)]
    if others:
        raise CacheError(
            f"--out {out} holds files that are not part of an activation cache "
            f"({', '.join(sorted(others)[:5])}); choose an empty or new directory"
        )
    if overwrite:
        for p in ours:
            p.unlink()
    else:
        for p in ours:
            if p.name.endswith(".tmp"):
                p.unlink()  # leftovers of a killed run: never listed, safe to drop


def _is_cache_file(p: Path) -> bool:
    # A killed atomic write leaves `.NAME.<pid>.<rand>.tmp`; a killed shard write leaves `NAME.tmp`.
    name = temp_target(p) or p.name.removesuffix(".tmp")
    return p.is_file() and (
        name in (MANIFEST, RECORD) or (name.startswith(("acts-", "tokens-")) and name.endswith(".npy"))
    )


def _start_manifest(out: Path, settings: dict, overwrite: bool) -> dict:
    """The existing manifest when its settings match, else a fresh one (never a silent overwrite)."""
    fresh = {"format": FORMAT, "format_version": FORMAT_VERSION, "settings": settings,
             "shards": [], "complete": False}
    if not (out / MANIFEST).exists():
        if any(out.iterdir()):
            if not overwrite:
                raise CacheError(
                    f"--out {out} holds shards but no {MANIFEST}; pass --overwrite to rebuild it"
                )
            for p in out.iterdir():
                p.unlink()
        return fresh
    try:
        old = read_manifest(out)
    except CacheError:
        if not overwrite:
            raise
        old = None
    if old is not None and old["settings"] != settings:
        diff = sorted(k for k in settings.keys() | old["settings"].keys()
                      if settings.get(k) != old["settings"].get(k))
        if not overwrite:
            raise CacheError(
                f"--out {out} holds a cache made with other settings (differs in: "
                f"{', '.join(diff)}); pass --overwrite to replace it, or choose another --out"
            )
        old = None
    if old is None:
        for p in out.iterdir():
            p.unlink()
        return fresh
    return old


def _verified_shards(out: Path, manifest: dict, d_in: int, dtype: str) -> dict[int, dict]:
    """Listed shards whose files check out; bad ones are named, deleted and rebuilt."""
    good = {}
    for entry in manifest["shards"]:
        problem = verify_shard(out, entry, d_in, dtype)
        if problem is None:
            good[entry["index"]] = entry
        else:
            tqdm.write(f"shard {entry['index']}: {problem}; rebuilding it", file=sys.stderr)
            for key in ("file", "tokens_file"):
                # A plain name (read_manifest checked it is the one its index gives): the unlink stays in the
                # cache, and removes a symlink, never what it points to.
                (out / plain_name(entry[key], "shard file")).unlink(missing_ok=True)
    return good


def _hook_width(model, hook: str, layer: int | None, device: str) -> int:
    grab = _Grab()
    with torch.no_grad(), model.hooks(fwd_hooks=[(hook, grab)]):
        bos = model.tokenizer.bos_token_id or 0
        model(torch.tensor([[bos, bos]], device=device), stop_at_layer=layer)
    if grab.value is None or grab.value.dim() < 3:
        raise ValueError(f"hook {hook!r} does not give per-token activations; choose a residual or MLP hook")
    return int(np.prod(grab.value.shape[2:]))
