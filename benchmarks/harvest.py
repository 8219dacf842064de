"""Harvest throughput against the bare model forward on the same tokens, in one process.

    python benchmarks/harvest.py [--shape pythia-70m|embedded] [--tokens N] [--device cpu|cuda]
                                 [--model-dtype float32|bfloat16] [--json PATH]

Prints tokens/s of `model(tokens, stop_at_layer=L)` alone and of `vsae harvest`
(tokenisation, forward, copy, shard writes and checksums included), and their
ratio. Target on the 2-core CPU: ratio >= 0.9; on an H100/H200, >= 1.5M tok/s
written to disk (bf16 forward). The bare forward runs before and after the
harvest and the mean is used, since machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from activations.harvest import HarvestConfig, harvest
from activations.models import default_hook, load_local_checkpoint, stop_layer
from activations.tiny_model import ensure_tiny_model
from activations.tokens import pack_contexts

SHAPES = {  # GPT-NeoX configs; pythia-70m is EleutherAI/pythia-70m-deduped's shape, randomly initialised
    "pythia-70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
                       vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25),
}


def model_dir(shape: str, work: Path) -> Path:
    embedded = ensure_tiny_model()
    if shape == "embedded":
        return embedded
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(**SHAPES[shape], use_parallel_residual=True, tie_word_embeddings=False,
                        bos_token_id=0, eos_token_id=0)
    d = work / shape
    GPTNeoXForCausalLM(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(embedded).save_pretrained(d)  # ids fit: its vocab is smaller
    return d


def bare_forward(model, tokens: torch.Tensor, layer: int | None, batch: int, device: str) -> float:
    """tok/s of the forward alone (the tokens already on the device, as the harvest's copy overlaps)."""
    tokens = tokens.to(device)
    with torch.no_grad():
        model(tokens[:batch].to(device), stop_at_layer=layer)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(0, len(tokens), batch):
            model(tokens[i : i + batch].to(device), stop_at_layer=layer)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return (len(tokens) * (tokens.shape[1] - 1)) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["embedded", *SHAPES], default="pythia-70m")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--model-dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mdir = model_dir(args.shape, work)
        model = load_local_checkpoint(mdir, device=args.device, dtype=args.model_dtype)
        hook = default_hook(model)
        layer = stop_layer(model, hook)
        from activations.corpus import corpus_documents

        n_seqs = -(-args.tokens // (args.context - 1))
        contexts = pack_contexts(corpus_documents(args.corpus), model.tokenizer, args.context)
        tokens = torch.from_numpy(np.stack([c for _, c in zip(range(n_seqs), contexts, strict=False)]))

        bare_before = bare_forward(model, tokens, layer, args.batch_size, args.device)
        summary = harvest(HarvestConfig(
            out=str(work / "cache"), model_path=str(mdir), hook=hook, corpus=[args.corpus],
            tokens=args.tokens, context=args.context, dtype=args.dtype, batch_size=args.batch_size,
            device=args.device, progress=False, model_dtype=args.model_dtype,
        ))
        bare_after = bare_forward(model, tokens, layer, args.batch_size, args.device)
    bare = (bare_before + bare_after) / 2
    result = {
        "shape": args.shape, "device": args.device, "hook": hook, "stop_at_layer": layer,
        "tokens": summary.tokens, "batch_size": args.batch_size, "dtype": args.dtype,
        "model_dtype": args.model_dtype,
        "bare_tok_s": round(bare), "bare_tok_s_before_after": [round(bare_before), round(bare_after)],
        "harvest_tok_s": round(summary.tokens_per_second),
        "ratio": round(summary.tokens_per_second / bare, 3),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"harvest / bare forward = {result['ratio']:.3f} (target >= 0.9 on CPU)")


if __name__ == "__main__":
    main()
