"""What a run directory says about itself: config, identity (model, hook), training log, eval results.

Every file is optional except cfg.json (read through `vsae.checkpoint.read_sae` elsewhere); a missing or unreadable
one reads as empty, so the pages show what is there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


@dataclass
class RunInfo:
    path: Path
    cfg: dict = field(default_factory=dict)  # cfg.json
    train: dict = field(default_factory=dict)  # train.json
    eval: dict = field(default_factory=dict)  # eval.json
    log: list[dict] = field(default_factory=list)  # log.jsonl

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def hook_name(self) -> str | None:
        return self.train.get("hook_name") or self.cfg.get("metadata", {}).get("hook_name")

    @property
    def model_name(self) -> str | None:
        model = self.train.get("model")
        if isinstance(model, dict):
            return model.get("name")
        return self.cfg.get("metadata", {}).get("model_name")

    @property
    def metrics(self) -> dict:
        return self.eval.get("metrics", {}) if isinstance(self.eval.get("metrics"), dict) else {}

    def config(self) -> dict:
        """A flat view of the configuration: SAE shape, variant options, training settings."""
        out = {k: self.cfg.get(k) for k in ("architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input", "dtype")
               if k in self.cfg}
        out["hook_name"], out["model"] = self.hook_name, self.model_name
        for section in ("sae", "train"):
            for k, v in (self.train.get(section) or {}).items():
                if k not in ("out", "cache", "progress", "device"):
                    out[f"{section}.{k}"] = v
        for k in ("tokens_seen", "step", "norm_scale", "cache_hash"):
            if k in self.train:
                out[k] = self.train[k]
        return out

    def figure_file(self, relative: str | None) -> Path | None:
        """A file that eval.json names relative to the run directory, if it exists."""
        if not relative:
            return None
        path = self.path / relative
        return path if path.is_file() else None


def flat_scalars(d: dict, prefix: str = "", depth: int = 2) -> list[tuple[str, object]]:
    """(dotted key, value) of the numbers, strings and nulls in a nested dict, `depth` levels deep."""
    out = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 0:
            out += flat_scalars(v, name + ".", depth - 1)
        elif isinstance(v, bool | int | float | str) or v is None:
            out.append((name, v))
    return out


def read_run(path: str | Path) -> RunInfo:
    path = Path(path)
    log = []
    log_path = path / "log.jsonl"
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if isinstance(entry, dict):
                log.append(entry)
    return RunInfo(path=path, cfg=read_json(path / "cfg.json"), train=read_json(path / "train.json"),
                   eval=read_json(path / "eval.json"), log=log)


def eval_density_histogram(info: RunInfo) -> dict | None:
    """eval.json's log10 density histogram as {"edges", "counts", "n_dead"?} (either key layout of `vsae eval`)."""
    density = info.metrics.get("density") or {}
    for key, edges_key in (("log10_density_histogram", "edges"), ("log10_histogram", "bin_edges")):
        h = density.get(key)
        if isinstance(h, dict) and h.get(edges_key) is not None and h.get("counts") is not None:
            out = {"edges": h[edges_key], "counts": h["counts"]}
            if "n_dead" in h:
                out["n_dead"] = h["n_dead"]
            return out
    return None


def eval_tsne_maps(info: RunInfo) -> dict[str, dict]:
    """The t-SNE coordinate files eval.json lists, read: name -> {coords, latent_ids, colors, ...}."""
    maps = {}
    for name, entry in (info.metrics.get("tsne") or {}).items():
        if isinstance(entry, dict):
            path = info.figure_file(entry.get("coordinates"))
            doc = read_json(path) if path else {}
            if doc.get("coords") is not None and doc.get("latent_ids") is not None:
                maps[name] = doc
    return maps


def eval_figure_files(info: RunInfo) -> list[tuple[str, Path]]:
    """(label, path) of the HTML figures `vsae eval` wrote for this run."""
    out = []
    tsne = info.metrics.get("tsne") or {}
    for name, entry in tsne.items():
        if isinstance(entry, dict) and (path := info.figure_file(entry.get("figure"))):
            out.append((f"t-SNE: {name}", path))
    density = info.figure_file("figures/density.html")
    if density:
        out.append(("density histogram", density))
    return out
