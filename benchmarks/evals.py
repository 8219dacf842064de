"""Evaluation speed: core + density over 1M cached tokens for an 8192-latent SAE, and t-SNE of 8192 decoder rows.

    python benchmarks/evals.py [--tokens 1000000] [--d-sae 8192]

Synthetic cache (d_in 512, float16) and a random TopK SAE (k 64). Targets on
the 2-core CPU: each under 2 minutes. CE/KL splicing needs a model and is
timed separately by the tests' scale, not here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# This file's own name would shadow the `evals` package when run as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.synthetic

import torch  # noqa: E402

from evals.driver import EvalConfig, evaluate  # noqa: E402
from tests.synthetic import random_cache_and_sae  # noqa: E402
from vsae.checkpoint import read_sae  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--d-sae", type=int, default=8192)
    ap.add_argument("--d-in", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache, run = random_cache_and_sae(tmp, args.tokens, args.d_in, args.d_sae)
        W_dec = read_sae(run)[0].W_dec
        # evals read the held-out split named in train.json: hold out (almost) all of this cache
        (run / "train.json").write_text(json.dumps({"train": {"eval_fraction": 0.999}}))
        t = time.perf_counter()
        out = evaluate([run], EvalConfig(cache=str(cache), metrics=["core", "density"], tokens=args.tokens,
                                         progress=True))
        core_s = time.perf_counter() - t
        n_eval = out[str(run)]["metrics"]["density"]["n_tokens"]
        from evals.tsne import decoder_tsne

        t = time.perf_counter()
        decoder_tsne(W_dec, torch.ones(args.d_sae, dtype=torch.bool), torch.full((args.d_sae,), 0.01))
        tsne_s = time.perf_counter() - t
    print(json.dumps({"core_density_tokens": n_eval, "core_density_seconds": round(core_s, 1),
                      "tsne_points": args.d_sae, "tsne_seconds": round(tsne_s, 1),
                      "threads": torch.get_num_threads()}))
    print(f"core+density on {n_eval:,} tokens: {core_s:.1f} s (target < 120); "
          f"t-SNE of {args.d_sae} decoder rows: {tsne_s:.1f} s (target < 120)")


if __name__ == "__main__":
    main()
