"""What a metric group computes from: the SAEs, the held-out data, the model, and where its figures go.

`evals.driver` builds one `EvalContext` per `vsae eval`, fills `stream` in one pass over the held-out rows, and
hands the context to each requested group of `evals.registry`. The model and the held-out contexts are loaded
on first use, so a group that does not need them costs nothing. Figures are written into a staging directory
per run that the driver swaps in together with eval.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from activations.atomic import write_text_atomic
from activations.cache import sequence_tokens
from evals.figures import write_figure
from evals.provenance import EvalSplit
from vsae.checkpoint import CheckpointError, SAEWeights
from vsae.run import DENSITY_FIGURE, FIGURES_DIR, read_run, read_trainer_state

if TYPE_CHECKING:
    from evals.driver import EvalConfig


LABELLED_STORE = ".vsae-labelled"  # inside the cache: model activations of the SCR/TPP texts


class EvalError(RuntimeError):
    """A run or cache that cannot be evaluated as asked."""


@dataclass
class StreamStats:
    """One run's share of the pass over held-out rows."""

    core: dict  # CoreAccumulator.result()
    firing: dict  # FiringCounter.result(): counts, density, dead/dense fractions, histogram
    sample: torch.Tensor | None  # dense codes of the first rows, for independence and t-SNE
    blocks: dict | None = None  # CoreAccumulator.blocks(): the bootstrap units of explained variance


@dataclass
class EvalContext:
    cfg: EvalConfig
    manifest: dict
    saes: dict[Path, SAEWeights]
    split: EvalSplit  # the sequences scored: the runs' common held-out split, or the whole cache
    staging: dict[Path, Path]  # run -> directory its figures are written into before the swap
    stream: dict[Path | str, StreamStats] = field(default_factory=dict)
    # Random-SAE nulls (evals/null.py) by key, which of them each run is compared with, and those the group being
    # computed still needs (the others' results come from the null store).
    nulls: dict[str, SAEWeights] = field(default_factory=dict)
    null_of: dict[Path, list[str]] = field(default_factory=dict)
    active_nulls: dict[str, SAEWeights] = field(default_factory=dict)
    data_mean: torch.Tensor | None = None
    load_model: Callable[[], Any] | None = None
    _model: Any = None
    _contexts: torch.Tensor | None = None

    def subjects(self) -> dict[Path | str, SAEWeights]:
        """The SAEs a null-aware group scores: the runs and the nulls not yet in the store."""
        return {**self.saes, **self.active_nulls}

    @property
    def hook(self) -> str:
        return self.manifest["settings"]["hook_name"]

    @property
    def synthetic(self) -> bool:
        """A cache of synthetic rows: there is no model to splice into or to probe."""
        return self.manifest["settings"]["model"].get("kind") == "synthetic"

    def model(self) -> Any:
        if self._model is None:
            self._model = self.load_model()
        return self._model

    def special_ids(self) -> list[int]:
        from activations.models import special_token_ids

        return special_token_ids(self.model().tokenizer)

    def sequences(self) -> np.ndarray:
        """The evaluation split's sequence ids in the order they are scored (`held_sequences`)."""
        return held_sequences(self.split, int(self.manifest["n_sequences"]), self.cfg.sample_seed)

    def held_rows(self) -> np.ndarray | None:
        """Global row ids of `sequences()` in order, for the stream pass; None when `sample_seed` is unset (the
        loader's own split order, as before the field)."""
        if self.cfg.sample_seed is None:
            return None
        per = int(self.manifest["rows_per_sequence"])
        return (self.sequences()[:, None] * per + np.arange(per)[None, :]).reshape(-1)

    def contexts(self) -> torch.Tensor:
        """The first `ce_contexts` held-out contexts (of `sequences()`), as token ids [n, context]."""
        if self._contexts is None:
            held = self.sequences()
            self._contexts = torch.from_numpy(sequence_tokens(self.cfg.cache, held[: self.cfg.ce_contexts]))
        return self._contexts

    def labelled_activations(self, data: Any) -> Any:
        """Token activations of a labelled set's texts at the hook, from the store beside the cache when an earlier
        eval computed them for the same model, hook and texts (`evals.probes.cached_token_activations`)."""
        from evals.probes import cached_token_activations

        key = {"model": self.manifest["settings"]["model"], "hook": self.hook, "set": data.description,
               "weight_processing": self.manifest.get("weight_processing")}
        store = Path(self.cfg.cache) / LABELLED_STORE
        return cached_token_activations(self.model(), self.hook, data.texts, store=store, key=key,
                                        device=self.cfg.device, progress=self.cfg.progress)

    def top_latents(self, run: Path, n: int) -> list[int]:
        """The n most frequent latents on the held-out rows."""
        if run not in self.stream:
            raise EvalError("ablation without an explicit --latents list needs the density metric in the same run")
        return [int(i) for i in torch.argsort(self.stream[run].firing["density"], descending=True)[:n]]

    def training_dead(self, run: Path) -> dict | None:
        """The trainer's own dead counters at the end of training, from train.json + trainer_state."""
        info = read_run(run).train
        if info is None:
            return None
        try:
            state = read_trainer_state(run)
        except CheckpointError:
            return None
        since = state["tokens_since_fired"]
        return {"dead_after_tokens": info["dead_after"], "tokens_seen": info.get("tokens_seen"),
                "dead_fraction": float((since >= info["dead_after"]).float().mean()),
                "never_fired_fraction": float((state["fire_count"] == 0).float().mean())}

    # --- figures: written into the run's staging directory, named as eval.json will name them -------------------
    def figure(self, run: Path, name: str, fig: Any) -> str:
        write_figure(fig, self.staging[run] / name)
        return f"{FIGURES_DIR}/{name}"

    def density_figure(self, run: Path, dens: dict) -> str:
        import plotly.graph_objects as go

        hist = dens["log10_density_histogram"]
        fig = go.Figure(go.Bar(x=hist["edges"][:-1], y=hist["counts"], name="alive latents"))
        fig.update_layout(title=f"{run.name}: log10 feature density over {dens['n_tokens']:,} eval tokens "
                                f"(dead: {dens['dead_fraction']:.1%})", xaxis_title="log10 density",
                          yaxis_title="latents")
        return self.figure(run, DENSITY_FIGURE, fig)

    def tsne_files(self, run: Path, name: str, tsne_map: Any, title: str | None = None) -> dict:
        """A t-SNE map's figure and coordinates, and the eval.json entry naming them."""
        figure = self.figure(run, f"tsne_{name}.html", tsne_map.figure(title or f"{run.name}: t-SNE of {name}"))
        write_json(self.staging[run] / f"tsne_{name}.json", tsne_map.to_json())
        return {"n_points": len(tsne_map.coords), "figure": figure, "coordinates": f"{FIGURES_DIR}/tsne_{name}.json"}


def held_sequences(split: EvalSplit, n_total: int, sample_seed: int | None) -> np.ndarray:
    """The split's sequence ids: in id order, or (with `sample_seed`) in a seeded random order, so that the first n
    of them are a seeded random subset of the split: the held-out sample `vsae audit` varies between reseeds."""
    held = split.sequences(n_total)
    if sample_seed is None:
        return held
    return np.random.default_rng([SAMPLE_STREAM, sample_seed]).permutation(held)


SAMPLE_STREAM = 16  # keeps the sample's random stream apart from the other seeded draws of an eval


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=jsonable) + "\n")


def jsonable(v: Any) -> Any:
    """json.dumps `default` for tensors and numpy values (eval.json, the null store)."""
    if torch.is_tensor(v):
        return v.tolist()
    if isinstance(v, np.ndarray | np.generic):
        return v.tolist()
    raise TypeError(f"cannot serialise {type(v).__name__}")
