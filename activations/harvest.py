"""Run a model over a corpus and cache one hook's activations to disk, resumably; in one process, or in one
process per device under torchrun.

Distributed (`harvest(cfg, ranks)`): the shards keep the indices, names and boundaries one process gives them,
and rank r builds the contiguous block `block_range(n_shards, r, world_size)`, so the cache is the one a single
process writes. Rank 0 alone holds the cache's lock and writes `manifest.json` (at the start, then once every rank
is done); each rank lists the shards of its block that are built and verified in its own `progress-rankNNNNN.json`
as it goes. A rerun after any rank was killed merges those files into the manifest, drops the `.tmp` files of
shards in flight and rebuilds only what is missing or fails its check, with any number of ranks.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatch
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
    validate_manifest,
    verify_shard,
    write_json_atomic,
)
from activations.checksums import RECORD
from activations.corpus import CorpusStats, corpus_documents, describe_corpus
from activations.devices import resolve_device
from activations.distributed import Ranks, all_gather, block_range, check_agreement, rank_device, settle
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
PROGRESS_FORMAT = "vsae-harvest-progress"
PROGRESS_GLOB = "progress-rank*.json"
COUNT_DOCS = 1024  # documents per round of a distributed harvest's parallel token count (`_token_ends`)


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


def harvest(cfg: HarvestConfig, ranks: Ranks | None = None) -> HarvestSummary:
    """Write (or finish) the cache `cfg.out`; the same config always gives the same cache.

    The cache is locked for the whole run: a second harvest into it, or a reader of it, is refused meanwhile.
    Under torchrun (`ranks` from `activations.distributed.process_group`) every rank runs this with the same
    settings (checked before any file is touched) and builds the shards of its own block of shard indices
    (`block_range`), recording them in its progress file; rank 0 holds the lock, and writes the manifest at the
    start and, once every rank is done, the final one: the same cache as one process would write.
    """
    ranks = ranks or Ranks()
    _check_config(cfg)
    if ranks.distributed:
        check_agreement(_agreed_settings(cfg), ranks, "harvest")
    device = rank_device(cfg.device, ranks.world_size, ranks.local_rank)
    cfg = replace(cfg, device=str(device), progress=cfg.progress and ranks.rank == 0)
    out = Path(cfg.out)
    with ExitStack() as held:
        settle("locking --out", ranks, lambda: ranks.rank == 0 and _lock_out(out, held))
        return _harvest(cfg, out, ranks)


def _lock_out(out: Path, held: ExitStack) -> None:
    try:
        held.enter_context(DirLock(out, "cache"))
    except OSError as e:
        raise CacheError(f"cannot write to --out {out}: {e.strerror or e}; choose a writable directory") from None


def _harvest(cfg: HarvestConfig, out: Path, ranks: Ranks) -> HarvestSummary:
    lead = ranks.rank == 0
    settle("preparing --out", ranks, lambda: lead and _prepare_out_dir(out, cfg.overwrite))
    source = ModelSource(cfg.model, cfg.model_path)
    model, hook, layer, d_in = settle("loading the model", ranks, lambda: _load(cfg, source))
    layout = _layout(cfg)
    started = settle("starting the manifest", ranks, lambda: lead and _begin_manifest(
        out, cfg, _settings(cfg, source, hook, layout), _model_fields(cfg, model, source, layer, d_in, layout)))
    manifest = settle("reading the manifest", ranks, lambda: started or _lead_manifest(out, ranks.rank))

    t0 = time.perf_counter()
    ends = _token_ends(cfg, model.tokenizer, _last_block_start(cfg, layout, ranks), ranks) if ranks.distributed \
        else None
    mine = settle("building shards", ranks, lambda: _build_own(model, hook, layer, d_in, cfg, out, manifest,
                                                                layout, ranks, ends))
    built = all_gather(mine, ranks)
    summary = settle("writing the manifest", ranks, lambda: lead and _finish(out, manifest, built, ranks, t0))
    return all_gather(summary, ranks)[0]


def _load(cfg: HarvestConfig, source: ModelSource) -> tuple:
    """(model, hook name, stop layer, d_in) of the harvest, on its device."""
    model = load_model(source, device=cfg.device, dtype=cfg.model_dtype)
    hook = cfg.hook or default_hook(model)
    check_hook(model, hook)
    layer = stop_layer(model, hook)
    return model, hook, layer, _hook_width(model, hook, layer, cfg.device)


def _agreed_settings(cfg: HarvestConfig) -> dict:
    """What every rank of a distributed harvest must share: every setting but its device and progress bar, the
    model and corpus as the manifest describes them (local files by path and content), --out as an absolute
    path."""
    agreed = {k: v for k, v in asdict(cfg).items() if k not in ("device", "progress", "model", "model_path")}
    agreed.update(out=str(Path(cfg.out).absolute()), model=ModelSource(cfg.model, cfg.model_path).describe(),
                  corpus=describe_corpus(cfg.corpus))
    return agreed


def _begin_manifest(out: Path, cfg: HarvestConfig, settings: dict, model_fields: dict) -> dict:
    """Rank 0 (or the one process): the manifest to resume from, with the shards that the progress files of a
    killed distributed run list merged in (verified later, by the rank that owns each), written before any rank
    builds; the progress files are then removed."""
    manifest = _start_manifest(out, settings, cfg.overwrite)
    manifest.update(model_fields)
    listed = {e["index"]: e for e in manifest["shards"]}
    progress = sorted(out.glob(PROGRESS_GLOB))
    for path in progress:
        listed.update({e["index"]: e for e in _progress_shards(path, manifest)})
    manifest["shards"] = [listed[i] for i in sorted(listed)]
    update_totals(manifest)
    write_json_atomic(out / MANIFEST, manifest)
    for path in progress:
        path.unlink()
    return manifest


def _lead_manifest(out: Path, rank: int) -> dict:
    """The manifest rank 0 has just written, as another rank reads it."""
    if not (out / MANIFEST).is_file():
        raise CacheError(f"rank {rank} sees no {MANIFEST} in {out}, which rank 0 has written; --out must be one "
                         f"directory that every node shares (a shared filesystem)")
    return read_manifest(out)


def _build_own(model, hook: str, layer: int | None, d_in: int, cfg: HarvestConfig, out: Path, manifest: dict,
               layout: _Layout, ranks: Ranks, ends: np.ndarray | None) -> tuple[int, int, dict | None]:
    """Verify this rank's listed shards (bad ones are rebuilt) and build its missing ones (`ends`: `_token_ends`);
    returns (rows built, shards built, the statistics of the text read or None)."""
    own = block_range(layout.n_shards, ranks.rank, ranks.world_size)
    listed = [e for e in manifest["shards"] if e["index"] in own]
    done = _verified_shards(out, {"shards": listed}, d_in, cfg.dtype)
    if ranks.distributed:  # every rank records its own shards; rank 0 lists them all at the end (`_finish`)
        doc = {"format": PROGRESS_FORMAT, "rank": ranks.rank, "world_size": ranks.world_size,
               "settings": manifest["settings"], "shards": []}
        path = out / progress_file(ranks.rank)
    else:
        doc, path = manifest, out / MANIFEST
    doc["shards"] = [done[i] for i in sorted(done)]
    update_totals(doc)
    write_json_atomic(path, doc)
    todo = [i for i in own if i not in done]
    if not todo:
        return 0, 0, None
    rows = (min(own.stop * layout.shard_seqs, layout.n_seqs) - own.start * layout.shard_seqs) * layout.rows_per_seq
    built_tokens, stats = _build_shards(model, hook, layer, d_in, cfg, out, (doc, path), layout, todo, rows,
                                        (own.start, ends))
    return built_tokens, len(todo), asdict(stats)


def _finish(out: Path, manifest: dict, built: list[tuple[int, int, dict | None]], ranks: Ranks,
            t0: float) -> HarvestSummary:
    """Rank 0 (or the one process): list every shard, complete the manifest, and record the checksums."""
    progress = [out / progress_file(r) for r in range(ranks.world_size)] if ranks.distributed else []
    if progress:
        manifest["shards"] = sorted((e for path in progress for e in _rank_shards(path, manifest)),
                                    key=lambda e: e["index"])
        manifest["harvest"]["world_size"] = ranks.world_size
    if len(manifest["shards"]) != manifest["n_shards"]:
        raise CacheError(f"{out}: {len(manifest['shards'])} of {manifest['n_shards']} shards were built; rerun the "
                         f"same `vsae harvest` command to finish it")
    stats = [s for _, _, s in built if s is not None]
    if stats:
        manifest["corpus_stats"] = stats[-1]  # the last rank that read text read the furthest
    manifest["complete"] = True
    update_totals(manifest)
    write_json_atomic(out / MANIFEST, manifest)
    stamp_shards(out, manifest)  # every listed shard was hashed in this run: its first reader need not
    for path in progress:
        path.unlink()
    seconds = time.perf_counter() - t0
    built_tokens = sum(t for t, _, _ in built)
    return HarvestSummary(
        out=str(out), tokens=manifest["total_tokens"], shards=len(manifest["shards"]),
        built_shards=sum(n for _, n, _ in built),
        bytes=sum((out / e[k]).stat().st_size for e in manifest["shards"] for k in ("file", "tokens_file")),
        seconds=seconds, tokens_per_second=built_tokens / max(seconds, 1e-9),
    )


def progress_file(rank: int) -> str:
    """The file in which rank `rank` of a distributed harvest lists the shards of its block that are built."""
    return f"progress-rank{rank:05d}.json"


def _progress_shards(path: Path, manifest: dict) -> list[dict]:
    """The shard entries a progress file lists, checked as a manifest's are; [] (with a warning) for one that is
    damaged or made with other settings: its shards are then rebuilt."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != PROGRESS_FORMAT:
            raise CacheError(f"{path}: not a {PROGRESS_FORMAT} file")
        if doc.get("settings") != manifest["settings"]:
            raise CacheError(f"{path}: made with other settings than {MANIFEST}")
        candidate = {**manifest, "shards": doc.get("shards"), "complete": False}
        update_totals(candidate)
        validate_manifest(candidate, path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, CacheError) as e:
        tqdm.write(f"{path.name}: {e}; ignoring it (its shards are rebuilt)", file=sys.stderr)
        return []
    return candidate["shards"]


def _rank_shards(path: Path, manifest: dict) -> list[dict]:
    """At the end of a distributed harvest, the shards one rank built or verified."""
    if not path.is_file():
        raise CacheError(f"{path} is missing: rank 0 does not see the progress file its peer wrote; --out must "
                         f"be one directory that every node shares (a shared filesystem)")
    return _progress_shards(path, manifest)


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


def _build_shards(model, hook: str, layer: int | None, d_in: int, cfg: HarvestConfig, out: Path,
                  ledger: tuple[dict, Path], layout: _Layout, todo: list[int], rows: int,
                  begin: tuple[int, np.ndarray | None] = (0, None)) -> tuple[int, CorpusStats]:
    """Forward and commit the shards in `todo`, each recorded in `ledger` (the manifest, or this rank's progress
    file: the document and its path) once written; `rows` is the progress bar's total. The text is read from the
    shard `begin[0]` on (`begin[1]`: `_token_ends`, needed unless that is shard 0). Returns the rows built and the
    statistics of the text read."""
    doc, path = ledger
    stats = CorpusStats()
    start, ends = begin
    # Tokenization runs a few shards ahead in a thread, overlapped with the forward.
    contexts = background(
        _contexts_from(corpus_documents(cfg.corpus, stats), model.tokenizer, cfg.context, start * layout.shard_seqs,
                       ends),
        depth=4 * layout.shard_seqs, name="vsae-tokenize",
    )
    bar = tqdm(
        total=rows, initial=sum(e["n_tokens"] for e in doc["shards"]),
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
            for index, first, seqs in _shard_contexts(contexts, cfg, layout, todo, start):
                shard = _run_shard(model, grab, layer, cfg, out, index, first, seqs, d_in, bar, copies)
                copies.drain()  # every row of the shard is in its memmap before it is committed
                if pending is not None:
                    pending.result()
                pending = writer.submit(_commit_shard, shard, doc, path)
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
                    todo: list[int], start: int = 0) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """(shard index, first sequence, its sequences) for each shard in `todo`, in order; `contexts` begin at the
    first sequence of shard `start`.

    The contexts of shards already built are read and dropped, so a resumed shard gets the very sequences it
    would have got in one uninterrupted harvest.
    """
    for index in range(start, max(todo, default=-1) + 1):  # no text past the last shard to build is read
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


def _last_block_start(cfg: HarvestConfig, layout: _Layout, ranks: Ranks) -> int:
    """The first token, in the corpus's token stream, of the last rank's block of shards: how far ranks count."""
    shard = block_range(layout.n_shards, ranks.world_size - 1, ranks.world_size).start
    return shard * layout.shard_seqs * (cfg.context - 1)


def _token_ends(cfg: HarvestConfig, tokenizer, need: int, ranks: Ranks) -> np.ndarray:
    """Where each (non-empty) document's tokens end in the corpus's token stream (its tokens and the EOS after
    them, as `pack_contexts` joins them), until they reach token `need` or the corpus ends (a collective).

    Counted in parallel: each round, rank r tokenizes documents r, r + W, ... of the next COUNT_DOCS and the ranks
    exchange the counts. With it a rank starts tokenizing at its own block (`_contexts_from`) instead of
    tokenizing all the text before it: about 2/W of the corpus per rank, not up to all of it.
    """
    docs = settle("opening the corpus", ranks, lambda: (d for d in corpus_documents(cfg.corpus) if d))
    lengths, total, more = [np.zeros(0, dtype=np.int64)], 0, True
    while total < need and more:
        batch = settle("reading the corpus", ranks, lambda: list(islice(docs, COUNT_DOCS)))
        mine = batch[ranks.rank :: ranks.world_size]
        counts = settle("counting tokens", ranks, lambda mine=mine: [
            len(ids) + 1 for ids in (tokenizer(mine, add_special_tokens=False)["input_ids"] if mine else [])])
        lengths.append(np.zeros(len(batch), dtype=np.int64))
        for r, got in enumerate(all_gather(counts, ranks)):
            lengths[-1][r :: ranks.world_size] = got
        total, more = total + int(lengths[-1].sum()), len(batch) == COUNT_DOCS
    return np.cumsum(np.concatenate(lengths))


def _contexts_from(documents: Iterator[str], tokenizer, context: int, first_seq: int,
                   ends: np.ndarray | None) -> Iterator[np.ndarray]:
    """`pack_contexts`'s contexts from sequence `first_seq` on, without tokenizing the documents before the one
    that holds its first token (`ends`: `_token_ends`, counted at least that far; unused when `first_seq` is 0)."""
    if first_seq == 0:
        return pack_contexts(documents, tokenizer, context)
    start = first_seq * (context - 1)
    d = int(np.searchsorted(ends, start, side="right"))  # the first document ending after token `start`
    skip = start - (int(ends[d - 1]) if d else 0)
    if d == len(ends) and skip:
        return iter(())  # the corpus ends before: `_shard_contexts` names it
    return pack_contexts(islice((doc for doc in documents if doc), d, None), _SkipTokens(tokenizer, skip), context)


class _SkipTokens:
    """A tokenizer for `pack_contexts` that drops the first `skip` tokens of the stream it makes (all of them in
    its first document: at most its tokens, its EOS then starts the stream)."""

    def __init__(self, tokenizer, skip: int) -> None:
        self.tokenizer, self.skip = tokenizer, skip
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id

    def __call__(self, batch: list[str], **kw) -> dict:
        ids = list(self.tokenizer(batch, **kw)["input_ids"])
        if self.skip and ids:
            ids[0], self.skip = ids[0][self.skip :], 0
        return {"input_ids": ids}


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
        put_rows(copies, shard, b * rows, grab.value[:, start:], batch, first + b, positions)
        bar.update(len(batch) * rows)
    return shard


def put_rows(copies: HostCopies, shard: ShardWriter, lo: int, acts: torch.Tensor, batch: torch.Tensor,
             first_seq: int, positions: np.ndarray) -> None:
    """One forward batch into a shard from row `lo`: its kept activations (acts [n, rows, d_in], through `copies`)
    and their token rows (token id, sequence id from `first_seq`, position), as the cache format lays them out."""
    n, rows = acts.shape[0], acts.shape[1]
    copies.put(acts.reshape(-1, acts.shape[2]), shard.acts[lo : lo + n * rows])
    tok_rows = shard.tokens[lo : lo + n * rows].reshape(n, rows, len(TOKEN_COLUMNS))
    tok_rows[:, :, 0] = batch[:, batch.shape[1] - rows :].numpy()
    tok_rows[:, :, 1] = (first_seq + np.arange(n, dtype=np.int32))[:, None]
    tok_rows[:, :, 2] = positions[None, :]


def _commit_shard(shard: ShardWriter, doc: dict, path: Path) -> None:
    """Finalise a shard's files, then list it in `doc` (the manifest or a progress file) and write that to `path`
    (in that order, for crash safety)."""
    doc["shards"].append(shard.finalize())
    doc["shards"].sort(key=lambda e: e["index"])
    update_totals(doc)
    write_json_atomic(path, doc)


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
        or fnmatch(name, PROGRESS_GLOB)
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
