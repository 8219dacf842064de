"""The one firing statistic: which latents fire how often, which rows count, and the log10 density histogram.

The trainer's dead counters, `vsae eval`'s density metric, the dashboards and the compare page all count through
here, so "dead", "dense" and the histogram mean the same everywhere. A latent fires on a token when its value in
the TopK code is > 0 (what the exported SAE computes); special-token rows (BOS/EOS/PAD) are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from vsae.code import TopKCode

# A latent firing on more than this fraction of tokens is "dense" (SAEBench's freq_over_10_percent).
DENSE_THRESHOLD = 0.1


def special_ids(manifest: dict) -> list[int]:
    """The token ids whose rows no metric counts: the cache's special tokens (older caches name only BOS)."""
    return list(manifest.get("special_token_ids", [manifest.get("bos_token_id") or 0]))


def special_mask(token_ids: Tensor, special: Iterable[int]) -> Tensor:
    """Bool, shaped like `token_ids`: True on the rows to drop (their input token is special)."""
    special = torch.as_tensor(list(special), dtype=token_ids.dtype, device=token_ids.device)
    return torch.isin(token_ids, special)


def fired_counts(code: TopKCode, d_sae: int, dtype: torch.dtype = torch.int64) -> Tensor:
    """Per latent, the number of rows of `code` on which it fired (value > 0): [d_sae] on the code's device."""
    counts = torch.zeros(d_sae, dtype=dtype, device=code.idx.device)
    return counts.index_add_(0, code.idx.reshape(-1), (code.vals > 0).reshape(-1).to(dtype))


def log10_density_histogram(density: Tensor | np.ndarray, n_tokens: int, bins_per_decade: int = 4) -> dict:
    """Histogram of log10 density over the alive latents: {"edges": [...], "counts": [...], "n_dead": int}.

    Edges step 1/bins_per_decade from floor(log10(1 / n_tokens)) (the lowest density an alive latent can have) up
    to 0; fixed edges make histograms over the same number of tokens comparable. Densities below the range fall
    into the first bin.
    """
    density = torch.as_tensor(density, dtype=torch.float64).cpu()
    lo = math.floor(math.log10(1 / n_tokens)) if n_tokens > 0 else -1.0
    edges = torch.linspace(lo, 0.0, max(1, round(-lo * bins_per_decade)) + 1, dtype=torch.float64)
    alive = density > 0
    hist = torch.histogram(density[alive].log10().clamp(min=lo, max=0.0), bins=edges).hist.to(torch.int64)
    return {"edges": edges.tolist(), "counts": hist.tolist(), "n_dead": int((~alive).sum())}


class FiringCounter:
    """Per-latent firing counts over the counted tokens (SAELens `feature_density`).

    A latent is dead when it never fired in the n_tokens seen (SAEBench `frac_alive = mean(density > 0)`), dense
    when its density is > DENSE_THRESHOLD. Counts stay on the device of what is counted, so a training loop can
    count every step without a host sync.
    """

    def __init__(self, d_sae: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.int64) -> None:
        """`d_sae` may be left out for dense updates: the first `update` sets it."""
        self.d_sae = d_sae
        self.counts = torch.zeros(d_sae or 0, dtype=dtype, device=device)
        self.n_tokens = 0

    def add(self, counts: Tensor, n_tokens: int) -> None:
        """Add per-latent counts [d_sae] over `n_tokens` more tokens (counted elsewhere, e.g. all-reduced)."""
        if self.d_sae is None:
            self.d_sae = counts.shape[0]
            self.counts = self.counts.new_zeros(self.d_sae)
        if counts.shape != (self.d_sae,):
            raise ValueError(f"counts have {counts.shape[-1]} latents, expected {self.d_sae}")
        if self.counts.device != counts.device:
            self.counts = self.counts.to(counts.device)
        self.counts += counts.to(self.counts.dtype)
        self.n_tokens += n_tokens

    @torch.no_grad()
    def update_code(self, code: TopKCode) -> Tensor:
        """Count one batch's TopK code (value > 0 fires); returns the batch's own counts [d_sae]."""
        if self.d_sae is None:
            raise ValueError("FiringCounter needs d_sae to count a TopK code")
        counts = fired_counts(code, self.d_sae, self.counts.dtype)
        self.add(counts, code.vals.reshape(-1, code.vals.shape[-1]).shape[0])
        return counts

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        """Count dense codes [..., d_sae] (z != 0 fires, as SAELens counts)."""
        if self.d_sae is not None and z.shape[-1] != self.d_sae:
            raise ValueError(f"z has {z.shape[-1]} latents, expected {self.d_sae}")
        z = z.reshape(-1, z.shape[-1])
        self.add((z != 0).sum(dim=0), z.shape[0])

    def density(self) -> Tensor:
        """Per latent, the fraction of the counted tokens it fired on (float64, on the CPU)."""
        return self.counts.cpu().to(torch.float64) / max(self.n_tokens, 1)

    def result(self, bins_per_decade: int = 4) -> dict:
        """counts (int64 [d_sae]), density (float64 [d_sae]), dead_fraction, dense_fraction, n_tokens, and
        `log10_density_histogram` (see `log10_density_histogram`). Tensors are on the CPU."""
        density = self.density()
        alive = density > 0
        return {
            "counts": self.counts.to("cpu", torch.int64, copy=True),
            "density": density,
            "dead_fraction": (~alive).to(torch.float64).mean().item(),
            "dense_fraction": (density > DENSE_THRESHOLD).to(torch.float64).mean().item(),
            "n_tokens": self.n_tokens,
            "log10_density_histogram": log10_density_histogram(density, self.n_tokens, bins_per_decade),
        }
