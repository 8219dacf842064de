"""`vsae demo`: the whole pipeline on the embedded default, from nothing to a comparison page.

    OUT/
      cache/                  the harvested activations (activations.harvest)
      sae/topk, sae/vsae      the paper's two arms, trained in one pass (vsae.trainer), evaluated (evals.driver)
      dashboards/topk, ...    one feature dashboard per run (dashboards.build)
      compare.html            both runs side by side (dashboards.compare)

Every stage resumes: the model is built once, the harvest and the training continue from what is on disk.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from activations.harvest import HarvestConfig, harvest
from activations.tiny_model import ensure_tiny_model
from dashboards.build import DashboardConfig, build_dashboard
from dashboards.compare import CompareConfig, compare_runs
from evals.driver import EvalConfig, evaluate, table
from evals.registry import METRICS
from vsae.config import SAEConfig, TrainConfig, apply_preset
from vsae.trainer import train

ARMS = ("topk", "vsae")  # run names; each trains with the preset paper-NAME


@dataclass
class DemoConfig:
    """The demo's sizes: small enough for minutes on a laptop CPU."""

    out: str = field(default="runs/demo", metadata={
        "help": "output directory (cache/, sae/, dashboards/, compare.html)"})
    corpus: str = field(default="shakespeare", metadata={"help": "corpus to harvest"})
    tokens: int = field(default=500_000, metadata={"help": "tokens to harvest"})
    d_sae: int = field(default=2048, metadata={"help": "latents of each SAE"})
    k: int = field(default=32, metadata={"help": "active latents per token"})
    train_steps: int = field(default=300, metadata={"help": "training steps"})
    batch_size: int = field(default=4096, metadata={"help": "activations per step"})


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage, printing one line (or table) per stage; returns where each output went."""
    out = Path(cfg.out)
    cache = str(out / "cache")
    model_dir = ensure_tiny_model()
    report = json.loads((model_dir / "vsae_model.json").read_text())
    print(f"[1/5] embedded model {model_dir}: validation CE {report['val_ce']:.3f} "
          f"(unigram {report['unigram_ce']:.3f})")
    summary = harvest(HarvestConfig(out=cache, corpus=[cfg.corpus], tokens=cfg.tokens))
    print(f"[2/5] {summary.line()}")
    # The paper's two arms as its code ran them, scaled to the tiny model (16 x d_in latents), in one pass.
    arms = [apply_preset(f"paper-{name}", SAEConfig(), TrainConfig())[0] for name in ARMS]
    arms = [dataclasses.replace(a, d_sae=cfg.d_sae, k=cfg.k, dead_after=None) for a in arms]
    tcfg = TrainConfig(cache=cache, out=str(out / "sae"), steps=cfg.train_steps,
                       batch_size=cfg.batch_size, lr_warmup_steps=cfg.train_steps // 10)
    runs = train(tcfg, arms, resume=(out / "sae").exists(), names=list(ARMS))
    print("[3/5] SAEs trained: " + ", ".join(str(r) for r in runs))
    results = evaluate(runs, EvalConfig(cache=cache, metrics=list(METRICS)))
    print("[4/5] evaluation (eval.json, figures/ in each run):")
    print(table(results))
    pages = []
    for run in runs:
        d = build_dashboard(run, DashboardConfig(cache=cache, out=str(out / "dashboards" / run.name)))
        pages.append(str(out / "dashboards" / run.name))
        print(f"      dashboard {Path(d['out']) / 'index.html'}")
    cmp = compare_runs([str(r) for r in runs],
                       CompareConfig(cache=cache, out=str(out / "compare.html"), dashboards=pages))
    print(f"[5/5] comparison page {cmp['out']}")
    return {"model": str(model_dir), "cache": cache, "runs": [str(r) for r in runs], "dashboards": pages,
            "compare": str(cmp["out"])}
