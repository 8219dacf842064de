"""Training throughput of vsae against SAELens (and EleutherAI sparsify where installed), same data, same process.

    python benchmarks/train.py [--device cpu|cuda] [--steps N] [--batch-size 4096] [--end-to-end TOKENS]
                               [--json PATH]

d_in 512, d_sae 8192, k 64 on random activations. Each side runs forward +
backward + Adam, (a) with AuxK off and (b) with 10% of latents held dead and
AuxK on (coefficient 1/32, k_aux 256); the contenders are timed in interleaved
turns (`compare`), so a shared machine's load falls on all alike. Also: a
sampled vSAE against TopK, and four SAEs trained on one pass against one. With
--end-to-end, `vsae train`'s whole loop (loader included) on a random float16
cache of that many tokens, with the split held in device memory and streamed
from the files. Targets: CPU >= 4x SAELens; CUDA >= 6x SAELens and >= 10M tok/s
end to end in bf16, a sampled vSAE within 2x of TopK, 4 SAEs in one pass <= 3x
one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vsae.config import SAEConfig, TrainConfig
from vsae.trainer import fresh_state, train, update_step

D_IN, D_SAE, K = 512, 8192, 64


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare(steps: dict, batches, device: str, block: int, warmup: int = 2) -> dict[str, float]:
    """tok/s of each step function, timed in turns of `block` steps each, median over the turns.

    Turns interleave the contenders, so a shared machine's changing load falls on all of them alike; a block of
    several steps (on a GPU) keeps each one's launches overlapping its kernels, as in training.
    """
    for fn in steps.values():
        for i in range(warmup):
            fn(i, batches[i % len(batches)])
    times: dict[str, list[float]] = {name: [] for name in steps}
    for turn in range(max(1, len(batches) // block)):
        for name, fn in steps.items():
            sync(device)
            t = time.perf_counter()
            for j in range(block):
                fn(warmup + turn * block + j, batches[(turn * block + j) % len(batches)])
            sync(device)
            times[name].append(time.perf_counter() - t)
    rows = block * batches[0].shape[0]
    return {name: rows / statistics.median(ts) for name, ts in times.items()}


def vsae_step(aux: bool, device: str, batch: int, bf16: bool, n_saes: int = 1, **own):
    dead_after = 10**6
    cfg = SAEConfig(d_sae=D_SAE, k=K, aux_k_coef=1 / 32 if aux else 0.0, k_aux=256, dead_after=dead_after, **own)
    tcfg = TrainConfig(batch_size=batch, lr=1e-4, device=device)
    states = [fresh_state(Path("unused"), cfg, tcfg, D_IN, 10**6, torch.device(device), sparse=device == "cpu")
              for _ in range(n_saes)]
    dead = torch.arange(D_SAE, device=device) < D_SAE // 10

    def step(i: int, x: torch.Tensor) -> None:
        for s in states:
            if aux:
                s.tokens_since_fired.masked_fill_(dead, dead_after)  # hold 10% of latents dead, no host sync
            update_step(s, x, i, 10**6, tcfg, bf16, 1)

    return step


def saelens_step(aux: bool, device: str, bf16: bool):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, device=device,
                                                aux_loss_coefficient=1 / 32 if aux else 0.0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)
    mask = (torch.arange(D_SAE, device=device) < D_SAE // 10) if aux else None

    def step(i: int, x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=mask,
                                                           n_training_steps=i, is_logging_step=False))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()

    return step


def sparsify_step(aux: bool, device: str, bf16: bool):
    """EleutherAI sparsify's SparseCoder step as its trainer takes it: fvu + auxk_alpha * auxk_loss."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        from sparsify import Sae as SparseCoder
        from sparsify import SaeConfig as SparseCoderConfig

    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)
    mask = (torch.arange(D_SAE, device=device) < D_SAE // 10) if aux else None

    def step(i: int, x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sae(x, dead_mask=mask)
            loss = out.fvu + (1 / 32) * out.auxk_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def contenders(aux: bool, args, bf16: bool, batches) -> tuple[dict, dict[str, str]]:
    """vsae's step and each peer's that builds and runs (else why not)."""
    steps = {"vsae": vsae_step(aux, args.device, args.batch_size, bf16)}
    skipped = {}
    for name in args.peers:
        try:
            fn = {"saelens": saelens_step, "sparsify": sparsify_step}[name](aux, args.device, bf16)
            fn(0, batches[0])
            steps[name] = fn
        except Exception as e:  # a peer that is missing or fails must not hide the other figures
            skipped[name] = f"not measured: {type(e).__name__}: {str(e)[:200]}"
    return steps, skipped


def step_benchmarks(args, batches, bf16: bool) -> dict:
    results = {}
    for aux in (False, True):
        name = "auxk_10pct_dead" if aux else "no_auxk"
        steps, skipped = contenders(aux, args, bf16, batches)
        rates = compare(steps, batches, args.device, args.block)
        row = {f"{k}_tok_s": round(v) for k, v in rates.items()} | {f"{k}_tok_s": v for k, v in skipped.items()}
        row |= {f"ratio_vs_{k}": round(rates["vsae"] / v, 2) for k, v in rates.items() if k != "vsae"}
        results[name] = row
        print(f"{name}: {row}")
    kinds = compare({"topk": vsae_step(False, args.device, args.batch_size, bf16),
                     "sampled": vsae_step(False, args.device, args.batch_size, bf16, variant="vsae", sample=True)},
                    batches, args.device, args.block)
    results["vsae_sampled"] = {"tok_s": round(kinds["sampled"]), "topk_tok_s": round(kinds["topk"]),
                               "topk_over_sampled": round(kinds["topk"] / kinds["sampled"], 2)}
    passes = compare({"one": vsae_step(False, args.device, args.batch_size, bf16),
                      "four": vsae_step(False, args.device, args.batch_size, bf16, n_saes=4)},
                     batches, args.device, args.block)
    results["multi_sae_4"] = {"tok_s_per_pass": round(passes["four"]), "one_sae_tok_s": round(passes["one"]),
                              "cost_vs_one": round(passes["one"] / passes["four"], 2)}
    print(f"vsae sampled: {results['vsae_sampled']}; 4 SAEs in one pass: {results['multi_sae_4']}")
    return results


def end_to_end(args, tokens: int) -> dict:
    """`train()` from a random float16 cache: the split in device memory, then streamed from the files."""
    from activations.cache import write_array_cache

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        context = 129
        n = tokens - tokens % (context - 1)
        block = np.random.default_rng(0).standard_normal((min(n, 1 << 16), D_IN), dtype=np.float32)
        rows = np.resize(block.astype(np.float16), (n, D_IN))  # a tiled random block: speed is all it measures
        cache = Path(tmp) / "cache"
        write_array_cache(cache, rows, context, {"kind": "synthetic", "name": "random"})
        del rows
        steps = max(8, int(tokens * 0.95) // args.batch_size)
        for name, budget in (("resident", 0.5), ("streamed", 0.0)):
            cfg = TrainConfig(cache=str(cache), out=str(Path(tmp) / name), steps=steps, batch_size=args.batch_size,
                              lr=1e-4, log_every=max(1, steps // 8), checkpoint_every=10**9, progress=False,
                              device=args.device, device_data_budget=budget)
            t = time.perf_counter()
            [run] = train(cfg, [SAEConfig(d_sae=D_SAE, k=K, dead_after=10**6)])
            wall = time.perf_counter() - t
            lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
            rates = [x["tokens_per_s"] for x in lines[1:]] or [lines[-1]["tokens_per_s"]]
            out[name] = {"steps": steps, "tok_s_median": round(statistics.median(rates)),
                         "wall_s_with_setup": round(wall, 2)}
            print(f"end to end, {name}: {out[name]}")
    return out


def main() -> None:
    global D_IN, D_SAE, K
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--block", type=int, default=None, help="steps per timed turn (unset: 1 on CPU, 10 on CUDA)")
    ap.add_argument("--peers", default="saelens,sparsify", help="comma-separated: saelens, sparsify")
    ap.add_argument("--end-to-end", type=int, default=0, help="tokens of a random cache to train on (0: skip)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast on both sides (unset: on CUDA only)")
    ap.add_argument("--shape", default="512,8192,64", help="d_in,d_sae,k (a dry run uses a tiny one)")
    args = ap.parse_args()
    D_IN, D_SAE, K = (int(v) for v in args.shape.split(","))
    args.peers = [p for p in args.peers.split(",") if p]
    args.block = args.block or (10 if args.device.startswith("cuda") else 1)
    bf16 = args.device.startswith("cuda") if args.bf16 is None else args.bf16
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, D_IN, generator=g).to(args.device) for _ in range(args.steps)]
    on_gpu = args.device.startswith("cuda")
    results = {"device": torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
               "torch": torch.__version__, "shape": [D_IN, D_SAE, K], "batch_size": args.batch_size,
               "steps": args.steps, "block": args.block, "bf16": bf16,
               **step_benchmarks(args, batches, bf16)}
    if args.end_to_end:
        results["end_to_end"] = end_to_end(args, args.end_to_end)
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
