"""Training-step throughput of vsae against SAELens's TopKTrainingSAE, same data, same process.

    python benchmarks/train.py [--device cpu|cuda] [--steps N] [--batch-size 4096]

d_in 512, d_sae 8192, k 64 on random activations. Each side runs forward +
backward + Adam, (a) with AuxK off and (b) with 10% of latents held dead and
AuxK on (coefficient 1/32, k_aux 256). Prints tokens/s and the ratios. Targets:
>= 4x SAELens on the 2-core CPU; on CUDA >= 4x SAELens and >= 10M tok/s in bf16.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vsae.config import SAEConfig, TrainConfig
from vsae.trainer import fresh_state, update_step

D_IN, D_SAE, K = 512, 8192, 64


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step, batches, device: str, warmup: int = 2) -> float:
    for i in range(warmup):
        step(i, batches[i % len(batches)])
    sync(device)
    t = time.perf_counter()
    n = 0
    for i, x in enumerate(batches):
        step(i, x)
        n += x.shape[0]
    sync(device)
    return n / (time.perf_counter() - t)


def vsae_step(aux: bool, device: str, batch: int, bf16: bool):
    dead_after = 10**6
    cfg = SAEConfig(d_sae=D_SAE, k=K, aux_k_coef=1 / 32 if aux else 0.0, k_aux=256, dead_after=dead_after)
    tcfg = TrainConfig(batch_size=batch, lr=1e-4, device=device)
    s = fresh_state(Path("unused"), cfg, tcfg, D_IN, 10**6, torch.device(device), sparse=device == "cpu")
    dead = torch.arange(D_SAE, device=device) < D_SAE // 10

    def step(i: int, x: torch.Tensor) -> None:
        if aux:
            s.tokens_since_fired[dead] = dead_after  # hold 10% of latents dead
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4096)
    args = ap.parse_args()
    bf16 = args.device.startswith("cuda")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, D_IN, generator=g).to(args.device) for _ in range(args.steps)]
    results = {"device": torch.cuda.get_device_name() if bf16 else f"cpu ({torch.get_num_threads()} threads)",
               "batch_size": args.batch_size, "steps": args.steps, "bf16": bf16}
    for aux in (False, True):
        name = "auxk_10pct_dead" if aux else "no_auxk"
        ours = timed(vsae_step(aux, args.device, args.batch_size, bf16), batches, args.device)
        theirs = timed(saelens_step(aux, args.device, bf16), batches, args.device)
        results[name] = {"vsae_tok_s": round(ours), "saelens_tok_s": round(theirs), "ratio": round(ours / theirs, 2)}
        print(f"{name}: vsae {ours:,.0f} tok/s, SAELens {theirs:,.0f} tok/s, ratio {ours / theirs:.2f} (target >= 4)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
