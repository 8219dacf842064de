"""The embedded default model: a small GPT-NeoX that vsae trains itself, offline.

No package ships Pythia's weights, and the hub may be out of reach, so vsae
trains a model of Pythia's architecture (rotary on a quarter of each head,
parallel attention + MLP, LayerNorm, untied unembedding) on a corpus with a
fixed seed, in minutes on a CPU. It is saved as an ordinary Hugging Face
checkpoint (config.json + model.safetensors + tokenizer), so it loads through
the same path as a real Pythia checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from .corpus import CorpusStats, corpus_documents, describe_corpus
from .paths import cache_dir
from .tokenizer import train_bpe
from .tokens import pack_contexts

# Read at most this many characters per token the run needs (training plus
# validation), so a huge corpus (hf:...) is not read whole for a small model;
# BPE on English averages ~4 characters a token, so this is ample.
_CHARS_PER_TOKEN_BUDGET = 8
_MIN_LR_FRACTION = 0.1  # cosine decay ends at lr / 10 (as in nanoGPT and Pythia)


@dataclass
class TinyModelConfig:
    """Corpus, tokenizer, architecture and training of the embedded model."""

    corpus: str = field(default="shakespeare", metadata={
        "help": "corpus to train the tokenizer and the model on (shakespeare | stdlib | hf:NAME | files)"})
    vocab_size: int = field(default=4096, metadata={"help": "byte-level BPE vocabulary size"})
    d_model: int = field(default=128, metadata={"help": "residual stream width"})
    n_layers: int = field(default=4, metadata={"help": "transformer blocks"})
    n_heads: int = field(default=4, metadata={"help": "attention heads per block"})
    d_mlp: int = field(default=512, metadata={"help": "MLP hidden width"})
    context: int = field(default=128, metadata={"help": "tokens per training context"})
    # ~4 min on 2 CPU cores: val CE 4.6 vs unigram 7.0
    train_tokens: int = field(default=2_000_000, metadata={
        "help": "training tokens (epochs over the corpus as needed)"})
    batch_size: int = field(default=32, metadata={"help": "contexts per optimiser step"})
    lr: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate (cosine decay to a tenth)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of the weight matrices"})
    warmup_steps: int = field(default=50, metadata={
        "help": "linear lr warm-up steps (capped at half the run)"})
    val_contexts: int = field(default=200, metadata={
        "help": "contexts from the corpus's end held out for the validation CE"})
    seed: int = field(default=0, metadata={"help": "seed of the init and the batch order"})


def model_dir(cfg: TinyModelConfig) -> Path:
    """Where the model built from `cfg` lives: a short hash of every field names it."""
    digest = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()
    return cache_dir() / "models" / f"tiny-neox-{digest[:10]}"


def ensure_tiny_model(cfg: TinyModelConfig | None = None, progress: bool = True) -> Path:
    """The directory of the model for `cfg` (default config if None), built first if missing."""
    cfg = cfg or TinyModelConfig()
    out = model_dir(cfg)
    if not (out / "vsae_model.json").is_file():
        if progress:
            print(f"building the embedded model into {out} (a few minutes)", file=sys.stderr)
        build_tiny_model(cfg, out, progress=progress)
    return out


def build_tiny_model(cfg: TinyModelConfig, out_dir: Path | None = None, progress: bool = True) -> dict:
    """Train tokenizer and model on `cfg.corpus`, save them to `out_dir` atomically.

    Returns (and writes as `vsae_model.json`) the config, validation CE, the
    unigram baseline CE, throughput and versions.
    """
    out_dir = Path(out_dir) if out_dir is not None else model_dir(cfg)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    stats = CorpusStats()

    # Read only as much of a large corpus as the run can use (all of shakespeare);
    # the tokenizer and the contexts see the same documents.
    n_tokens = cfg.train_tokens + cfg.val_contexts * cfg.context
    documents = _take_chars(corpus_documents(cfg.corpus, stats), n_tokens * _CHARS_PER_TOKEN_BUDGET)
    tokenizer = train_bpe(documents, cfg.vocab_size)
    contexts = list(pack_contexts(documents, tokenizer, cfg.context))
    if len(contexts) <= cfg.val_contexts:
        raise ValueError(
            f"corpus {cfg.corpus!r} gave only {len(contexts)} contexts of {cfg.context} tokens, "
            f"not more than val_contexts={cfg.val_contexts}; use a larger corpus"
        )
    contexts = np.stack(contexts)
    train = torch.from_numpy(contexts[: -cfg.val_contexts]).long()
    val = torch.from_numpy(contexts[-cfg.val_contexts :]).long()  # the corpus's end: unseen text

    model = GPTNeoXForCausalLM(_neox_config(cfg, len(tokenizer)))
    seconds, tokens = _train(model, train, cfg, progress)
    model.eval()
    info = {
        "config": asdict(cfg),
        "val_ce": _model_ce(model, val, cfg.batch_size),
        "unigram_ce": _unigram_ce(train, val, len(tokenizer)),
        "train_tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "train_seconds": seconds,
        "build_seconds": time.perf_counter() - start,  # all of it: corpus, tokenizer, training, eval
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "n_train_contexts": len(train),
        "n_val_contexts": len(val),
        "corpus": describe_corpus(cfg.corpus),
        "corpus_stats": asdict(stats),  # of the documents read (all, unless the corpus is large)
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    _save_atomically(out_dir, model, tokenizer, info)
    return info


def _take_chars(documents: Iterable[str], max_chars: int) -> list[str]:
    taken, n = [], 0
    for doc in documents:
        taken.append(doc)
        n += len(doc)
        if n >= max_chars:
            break
    return taken


def _neox_config(cfg: TinyModelConfig, vocab_size: int) -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_mlp,
        max_position_embeddings=cfg.context,
        rotary_pct=0.25,  # Pythia's: rotary on a quarter of each head's dims
        use_parallel_residual=True,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def _n_steps(cfg: TinyModelConfig) -> int:
    return max(1, math.ceil(cfg.train_tokens / (cfg.batch_size * cfg.context)))


def _lr_at(step: int, cfg: TinyModelConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to lr / 10 at the last step."""
    n_steps = _n_steps(cfg)
    warmup = min(cfg.warmup_steps, n_steps // 2)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, n_steps - 1 - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (_MIN_LR_FRACTION + (1 - _MIN_LR_FRACTION) * cosine)


def _train(model: GPTNeoXForCausalLM, train: torch.Tensor, cfg: TinyModelConfig, progress: bool) -> tuple[float, int]:
    """AdamW over shuffled training contexts (epochs as needed); returns (seconds, tokens seen)."""
    # Weight decay on matrices only, not on biases, LayerNorm gains or offsets.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    order = torch.Generator().manual_seed(cfg.seed)
    batches = _batches(len(train), cfg.batch_size, order)
    n_steps = _n_steps(cfg)
    model.train()
    bar = tqdm(range(n_steps), desc="tiny model", unit="step", disable=not progress)
    start, tokens = time.perf_counter(), 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        x = train[next(batches)]
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += x.numel()
        if step % 10 == 0 or step == n_steps - 1:
            tok_s = tokens / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tok_s:,.0f}")
    return time.perf_counter() - start, tokens


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices: a fresh permutation per epoch, a batch never spans two."""
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


@torch.no_grad()
def _model_ce(model: GPTNeoXForCausalLM, contexts: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position."""
    total = 0.0
    for i in range(0, len(contexts), batch_size):
        x = contexts[i : i + batch_size]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1]
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
    return total / contexts[:, 1:].numel()


def _unigram_ce(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """CE of predicting validation tokens by training-split frequency (add-one smoothed)."""
    counts = torch.bincount(train[:, 1:].flatten(), minlength=vocab_size).double() + 1
    log_p = counts.log() - counts.sum().log()
    return -log_p[val[:, 1:].flatten()].mean().item()


def _save_atomically(out_dir: Path, model, tokenizer, info: dict) -> None:
    """Write into a sibling temp dir, then rename: a reader never sees half a model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    old = None
    try:
        model.save_pretrained(tmp)  # config.json + model.safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / "vsae_model.json").write_text(json.dumps(info, indent=2) + "\n")
        for path in tmp.iterdir():  # mkdtemp (and transformers for the weights) make them private
            path.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():  # rebuilding: move the old one aside, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
