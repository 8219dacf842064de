"""Compare page of a study's worth of runs: its size, and how fast it opens in headless Chromium.

    python benchmarks/compare_page.py                   # the target: 90 runs, under 3 s to open, under 20 MB
    python benchmarks/compare_page.py --runs 20         # a quick run
    python benchmarks/compare_page.py --keep DIR        # keep the runs and the page in DIR

Runs: random TopK SAEs of the demo's shape (d_in 128, d_sae 2048, k 32 unless the grid says otherwise; unit decoder
rows, W_enc = W_dec^T), with a train.json naming study-like switches (variant, k, decoder, pre-bias, seed) and a
50-line log.jsonl. eval.json: ONE real `vsae eval` (`evals.driver.evaluate`, what the CLI calls) of the first run
on a small synthetic cache (core, density and independence: a synthetic cache has no model, so no CE score or
probes), then copied to every run with perturbed numbers and with a CE score and SCR/TPP blocks (every N, in
`vsae eval`'s layout) added by hand, so the page shows every headline and the frontier as a study's would.
The compare page also measures every run's latent densities on the cache and matches latents against the first
run, as `vsae compare` does.

Measured (median of --repeats fresh page loads in Debian's chromium via Playwright, 1280 x 900 window):
- `load_s`: navigation to the `load` event (the page's HTML, its inline plotly.js and data parsed);
- `open_s`: navigation to every figure in the first screen drawn (plotly's `.main-svg` in each `.plot` in view),
  the time a reader waits for the page; figures further down are drawn as they are scrolled to;
- `all_figures_s`: opening every <details> and scrolling each figure into view until every one is drawn
  (a reader who looks at everything).
Target (issue 13): `open_s` under 3 s and the page under 20 MB for 90 runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.synthetic

from dashboards.compare import CompareConfig, compare_runs  # noqa: E402
from evals.driver import EvalConfig, evaluate  # noqa: E402
from evals.registry import N_VALUES  # noqa: E402
from tests.synthetic import planted_features, synthetic_cache  # noqa: E402
from vsae.checkpoint import SAEWeights, write_sae  # noqa: E402
from vsae.config import SAEConfig  # noqa: E402

D_IN, D_SAE = 128, 2048
GRID = {"variant": ("topk", "vsae"), "k": (16, 32, 64), "decoder": ("unit", "free"), "pre_bias": (True, False)}


def random_sae(d_in: int, d_sae: int, k: int, seed: int) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return SAEWeights(W_enc=W_dec.T.contiguous(), b_enc=torch.zeros(d_sae), W_dec=W_dec, b_dec=torch.zeros(d_in),
                      k=k, apply_b_dec_to_input=True)


def make_runs(root: Path, n_runs: int, cache: Path) -> list[Path]:
    """`n_runs` random SAEs over the switch grid, seed by seed, each a run directory."""
    points = itertools.product(range(10), *GRID.values())
    runs = []
    for i, (seed, variant, k, decoder, pre_bias) in zip(range(n_runs), points, strict=False):
        run = root / f"{variant}-k{k}-{decoder}-{'pb' if pre_bias else 'nopb'}-s{seed}"
        run.mkdir(parents=True)
        write_sae(run, random_sae(D_IN, D_SAE, k, seed=i),
                  {"model_name": "planted", "hook_name": "synthetic", "context_size": 17, "dataset_path": str(cache)})
        sae = SAEConfig(variant=variant, d_sae=D_SAE, k=k, decoder=decoder, pre_bias=pre_bias)
        train = {"sae": dataclasses.asdict(sae), "train": {"seed": seed, "steps": 200, "lr": 3e-4, "batch_size": 4096},
                 "hook_name": "synthetic", "model": {"name": "planted"}, "step": 200, "tokens_seen": 200 * 4096}
        (run / "train.json").write_text(json.dumps(train))
        rng = np.random.default_rng(i)
        log = [{"step": s * 4, "tokens": s * 4 * 4096, "loss": float(1 / (s + 1) + rng.random() * 0.01),
                "mse": float(0.9 / (s + 1)), "l0": float(k), "dead_fraction": float(0.5 / (s + 1))} for s in range(50)]
        (run / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))
        runs.append(run)
    return runs


def perturbed_evals(runs: list[Path], cache: Path, tsne: bool) -> None:
    """A real eval.json for the first run, copied to every run with its numbers perturbed and CE/SCR/TPP added
    (with `tsne`, random activation and decoder t-SNE maps of eval's coordinate format too)."""
    evaluate([runs[0]], EvalConfig(cache=str(cache), metrics=["core", "density", "independence"], tokens=4000,
                                   independence_tokens=2000, progress=False))
    base = json.loads((runs[0] / "eval.json").read_text())
    for i, run in enumerate(runs):
        rng = np.random.default_rng(1000 + i)
        train = json.loads((run / "train.json").read_text())
        k, vsae = train["sae"]["k"], train["sae"]["variant"] == "vsae"
        doc = json.loads(json.dumps(base))
        m = doc["metrics"]
        m["core"].update(explained_variance=float(0.70 + 0.05 * np.log2(k / 16) - 0.03 * vsae + rng.normal(0, .01)),
                         ce_score=float(0.85 + 0.03 * np.log2(k / 16) - 0.02 * vsae + rng.normal(0, 0.01)),
                         l0=float(k), note=None)
        m["core"].pop("note")
        m["density"]["dead_fraction"] = float(np.clip(0.05 + 0.4 * vsae + rng.normal(0, 0.03), 0, 1))
        m["independence"]["mean_abs_rho"] = float(0.02 + rng.normal(0, 0.003))
        for task, key in (("scr", "scr_metric_threshold_{}"), ("tpp", "tpp_threshold_{}_total_metric")):
            scores = {key.format(n): float(rng.uniform(0, 0.5) * (1 - np.exp(-n / 20))) for n in N_VALUES}
            m[task] = {"metrics": scores, "n_values": list(N_VALUES),
                       f"{task}_mean": float(np.mean(list(scores.values()))),
                       "accuracy": {"clean": 0.9}, "dataset": "offline generated set (benchmark stand-in)"}
        if tsne:
            m["tsne"] = {}
            (run / "figures").mkdir(exist_ok=True)
            for kind, n_points in (("activations", 400), ("decoder", D_SAE)):
                coords = {"coords": rng.normal(size=(n_points, 2)).tolist(), "latent_ids": list(range(n_points)),
                          "colors": {"log10_density": rng.uniform(-4, -1, n_points).tolist()}}
                (run / "figures" / f"tsne_{kind}.json").write_text(json.dumps(coords))
                m["tsne"][kind] = {"n_points": n_points, "coordinates": f"figures/tsne_{kind}.json"}
        (run / "eval.json").write_text(json.dumps(doc))


IN_VIEW = """() => [...document.querySelectorAll('.plot')].filter(e => {
  const r = e.getBoundingClientRect(); return r.bottom > 0 && r.top < window.innerHeight; })
  .every(e => e.querySelector('.main-svg'))"""


def measure(page_path: Path, repeats: int) -> dict:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install -y chromium)")
    loads, opens, alls, errors = [], [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        for _ in range(repeats):
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            t0 = time.perf_counter()
            page.goto(page_path.as_uri(), wait_until="load", timeout=120_000)
            page.wait_for_function(IN_VIEW, timeout=120_000, polling=20)
            opens.append(time.perf_counter() - t0)
            loads.append(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd") / 1000)
            t1 = time.perf_counter()
            page.evaluate("document.querySelectorAll('details').forEach(d => { d.open = true; })")
            plots = page.locator(".plot")
            for j in range(plots.count()):
                plots.nth(j).scroll_into_view_if_needed()
                page.wait_for_function(f"document.querySelectorAll('.plot')[{j}].querySelector('.main-svg')",
                                       timeout=120_000, polling=20)
            alls.append(time.perf_counter() - t1)
            n_plots = plots.count()
            page.close()
        browser.close()
    return {"load_s": round(statistics.median(loads), 2), "open_s": round(statistics.median(opens), 2),
            "all_figures_s": round(statistics.median(alls), 2), "figures": n_plots, "page_errors": errors[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=90)
    ap.add_argument("--cache-rows", type=int, default=16_000, help="rows of the synthetic cache")
    ap.add_argument("--tokens", type=int, default=8_000, help="held-out rows the page measures densities on")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tsne", action="store_true", help="give every run t-SNE maps (a study evaluates none)")
    ap.add_argument("--keep", default=None, help="build in this directory and keep it (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows, _ = planted_features(args.cache_rows, d_in=D_IN, n_features=4096, active=8.0)
        cache = synthetic_cache(root / "cache", rows)
        t = time.perf_counter()
        runs = make_runs(root / "runs", args.runs, cache)
        perturbed_evals(runs, cache, args.tsne)
        setup = time.perf_counter() - t
        out = root / "compare.html"
        t = time.perf_counter()
        compare_runs(runs, CompareConfig(cache=str(cache), out=str(out), tokens=args.tokens, progress=False))
        build = time.perf_counter() - t
        size = out.stat().st_size
        result = {"runs": len(runs), "tsne": args.tsne, "d_in": D_IN, "d_sae": D_SAE, "page_mb": round(size / 2**20, 2),
                  "setup_s": round(setup, 1), "build_s": round(build, 1), **measure(out, args.repeats)}
    print(json.dumps(result))
    ok = result["open_s"] < 3 and size < 20 * 2**20
    print(f"compare page of {len(runs)} runs: {result['page_mb']} MB, opens in {result['open_s']} s "
          f"(load event {result['load_s']} s; every figure drawn after {result['all_figures_s']} s more); "
          f"target < 3 s and < 20 MB: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
