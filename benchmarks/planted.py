"""Recovery of true features by each SAE variant, trained together in one pass.

    python benchmarks/planted.py [--preset tiny] [--steps 1500] [--tokens 254000] [--kl-coef 1e-3]
    python benchmarks/planted.py --generator planted      # independent features, no correlation or hierarchy

Default: a SynthSAEBench cache from `vsae synth` (activations/synthetic.py: sae_lens.synthetic's generator, with
correlated, hierarchical, mutually exclusive firing and per-feature magnitudes), scored by the ground-truth metrics
of `vsae eval --metrics ground_truth` (evals/ground_truth.py: MCC, precision / recall / F1 per latent, uniqueness,
shrinkage, each against three random SAEs of the same shape, with the paired 95% interval of trained - null) on
held-out rows. Also reported: the fraction of true features whose best-matching decoder row has cosine > 0.9, the
fraction of latents that fired, and the explained variance.

`--generator planted`: the unit tests' fixture generator (tests/synthetic.py: SAELens's `ActivationGenerator` and
`FeatureDictionary` with independent firing, 512 random unit directions in 64 dimensions). The "Planted features"
table in benchmarks/RESULTS.md was measured with vsae's earlier hand-written generator (lognormal magnitudes),
which gave way to the library's; rerun this to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activations.loader import ActivationLoader  # noqa: E402
from activations.synthetic import SynthConfig, ground_truth_tensors, synthesize  # noqa: E402
from evals.ground_truth import ground_truth_metrics, held_out_rows  # noqa: E402
from vsae.checkpoint import read_sae  # noqa: E402
from vsae.config import SAEConfig, TrainConfig  # noqa: E402
from vsae.trainer import train  # noqa: E402

CONFIGS = {
    "topk": dict(variant="topk"),
    "vsae (paper code: L2, free decoder, no pre-bias, no AuxK)": dict(
        variant="vsae", decoder="free", pre_bias=False, b_dec_init="zero", aux_k_coef=0.0),
    "vsae fixed variance, unit decoder, pre-bias, AuxK": dict(variant="vsae"),
    "vsae sampled, fixed variance": dict(variant="vsae", sample=True),
    "vsae sampled, learned variance": dict(variant="vsae", sample=True, variance="learned"),
}
HELD_OUT = 4096


def recovery(W_dec: torch.Tensor, truth: torch.Tensor, x: torch.Tensor, z: torch.Tensor, x_hat: torch.Tensor
             ) -> dict[str, float]:
    """Fraction of true features with a decoder row at cosine > 0.9, fraction of latents fired, explained variance."""
    dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    best = (truth / truth.norm(dim=1, keepdim=True) @ dec.T).max(dim=1).values
    ev = 1 - (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return {"recovered_cos>0.9": round(float((best > 0.9).float().mean()), 3),
            "fired_fraction": round(float((z > 0).any(0).float().mean()), 3), "explained_variance": round(float(ev), 4)}


def _train(cache: Path, out: Path, args: argparse.Namespace, d_sae: int) -> list[Path]:
    cfgs = [SAEConfig(d_sae=d_sae, k=args.k, dead_after=20_000, kl_coef=args.kl_coef, **c) for c in CONFIGS.values()]
    return train(TrainConfig(cache=str(cache), out=str(out), steps=args.steps, batch_size=512, lr=2e-3,
                             lr_warmup_steps=50, checkpoint_every=10**9, progress=True), cfgs)


def run_synthetic(args: argparse.Namespace, tmp: Path) -> dict:
    cache = tmp / "cache"
    print(synthesize(SynthConfig(out=str(cache), preset=args.preset, seed=args.seed, tokens=args.tokens,
                                 device="cpu")).line())
    truth = ground_truth_tensors(cache)["feature_vectors"]
    runs = _train(cache, tmp / "runs", args, args.d_sae or truth.shape[0])
    rows = held_out_rows(cache, {"split": "eval", "eval_fraction": TrainConfig.eval_fraction}, HELD_OUT)
    results = {}
    for name, run in zip(CONFIGS, runs, strict=True):
        sae, _ = read_sae(run)
        gt = ground_truth_metrics(sae, cache, torch.from_numpy(rows), seed=0)
        with ActivationLoader(cache, 1, split="all", shuffle=False) as loader:
            x = torch.from_numpy(loader.gather(rows)[0]).float()
        z = sae.encode(x)
        results[name] = {**recovery(sae.W_dec, truth, x, z, sae.decode(z)),
                         **{k: round(gt[k], 4) for k in ("mcc", "f1", "precision", "recall", "uniqueness",
                                                         "shrinkage")},
                         "null": {k: {"null_mean": round(gt["null"][k]["null_mean"], 4),
                                      "interval": [round(v, 4) for v in gt["null"][k]["interval"]]}
                                  for k in ("mcc", "f1")}}
        r = results[name]
        print(f"{name:60s} MCC {r['mcc']:.3f} (null {r['null']['mcc']['null_mean']:.3f})  F1 {r['f1']:.3f} "
              f"(null {r['null']['f1']['null_mean']:.3f})  recovered {r['recovered_cos>0.9']:.1%}  "
              f"fired {r['fired_fraction']:.1%}  EV {r['explained_variance']:.4f}")
    return results


def run_planted(args: argparse.Namespace, tmp: Path) -> dict:
    from tests.synthetic import planted_features, synthetic_cache

    rows, dirs = planted_features(args.tokens or 120_000, d_in=64, n_features=512, active=5, seed=0)
    held, _ = planted_features(HELD_OUT, d_in=64, n_features=512, active=5, seed=0)
    cache = synthetic_cache(tmp / "cache", rows)
    runs = _train(cache, tmp / "runs", args, args.d_sae or 1024)
    x, truth = torch.from_numpy(held[: HELD_OUT - HELD_OUT % 16]), torch.from_numpy(dirs)
    results = {}
    for name, run in zip(CONFIGS, runs, strict=True):
        sae, _ = read_sae(run)
        z = sae.encode(x)
        results[name] = recovery(sae.W_dec, truth, x, z, sae.decode(z))
        print(f"{name:60s} recovered {results[name]['recovered_cos>0.9']:.1%}  "
              f"fired {results[name]['fired_fraction']:.1%}  EV {results[name]['explained_variance']:.4f}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", choices=("synth", "planted"), default="synth")
    ap.add_argument("--preset", default="tiny", help="vsae synth preset (with --generator synth)")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (with --generator synth)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--tokens", type=int, default=None, help="rows (synth: the preset's default; planted: 120000)")
    ap.add_argument("--d-sae", type=int, default=None, help="latents (synth: the true feature count; planted: 1024)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--kl-coef", type=float, default=1e-3, help="KL weight of the vsae configs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = run_synthetic if args.generator == "synth" else run_planted
        results = run(args, Path(tmp))
    print(json.dumps({**vars(args), "results": results}))


if __name__ == "__main__":
    main()
