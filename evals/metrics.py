"""Core SAE metrics as pure tensor functions, and streaming accumulators over batches (no I/O).

Definitions follow SAELens 6.54.12 `sae_lens/evals.py` (`get_sparsity_and_variance_metrics`,
`ExplainedVarianceCalculator`, `get_downstream_reconstruction_metrics`); `shared/METRICS.md` section 1 spells
each one out. Inputs are the rows that count: the caller drops special-token positions (BOS/EOS/PAD, by input
token id) before calling, as SAELens does with its mask. x is the hooked model activation [B, d_in] in raw
activation units, x_hat = sae.decode(sae.encode(x)) [B, d_in], z = sae.encode(x) [B, d_sae].

Per-token values are computed in (at least) float32 like SAELens; every cross-batch sum is float64.
Firing counts and densities are `vsae.firing` (shared with the trainer and the dashboards).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# SAELens's ExplainedVarianceCalculator: below this total variance EV is 1 if the MSE is ~0 too, else 0.
_EV_EPS = 1e-10


def _work(t: Tensor) -> Tensor:
    # Promote fp16/bf16 before squaring or reducing (as SAELens does); keep float64 as float64.
    return t.to(torch.promote_types(t.dtype, torch.float32))


def l0(z: Tensor) -> Tensor:
    """Per token, the number of nonzero latents [B] (SAELens: `(f != 0).sum(-1)`; `!=` also counts negatives)."""
    return (z != 0).sum(dim=-1).to(torch.float32)


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per token, ||x - x_hat||^2 summed over dimensions [B] (SAELens 6.54 `mse`; not divided by d_in)."""
    return (_work(x) - _work(x_hat)).pow(2).sum(dim=-1)


def cosine_similarity(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per token, <x, x_hat> / (||x|| ||x_hat||) [B] (SAELens `cossim`: no epsilon, so a zero vector gives NaN)."""
    x, x_hat = _work(x), _work(x_hat)
    return (x / x.norm(dim=-1, keepdim=True) * (x_hat / x_hat.norm(dim=-1, keepdim=True))).sum(dim=-1)


def _explained_variance_from_sums(sum_sse: float, sum_sq_norm: float, sum_x: Tensor, n: int) -> float:
    """SAELens `ExplainedVarianceCalculator.compute`: 1 - (SSE/N) / (E||x||^2 - ||E x||^2), from float64 sums."""
    if n == 0:
        return 0.0
    mean_sse = sum_sse / n
    total_variance = sum_sq_norm / n - (sum_x / n).pow(2).sum().item()
    if total_variance < _EV_EPS:
        return 1.0 if mean_sse < _EV_EPS else 0.0
    return 1.0 - mean_sse / total_variance


def _sums(x: Tensor, x_hat: Tensor) -> tuple[float, float, Tensor]:
    """(sum of SSE, sum of ||x||^2, per-dimension sum of x), all float64."""
    x64, x_hat64 = x.to(torch.float64), x_hat.to(torch.float64)
    return (x64 - x_hat64).pow(2).sum().item(), x64.pow(2).sum().item(), x64.sum(dim=0).cpu()


def _block_sums(x: Tensor, x_hat: Tensor, rows: int) -> list[tuple[float, float, Tensor, int]]:
    """`_sums` per block of `rows` consecutive rows (the last block may be shorter), in one device round trip."""
    x64, x_hat64 = x.to(torch.float64), x_hat.to(torch.float64)
    block = torch.arange(x.shape[0], device=x.device) // rows
    n_blocks = int(block[-1]) + 1
    zeros = torch.zeros(n_blocks, dtype=torch.float64, device=x.device)
    sse = zeros.clone().index_add_(0, block, (x64 - x_hat64).pow(2).sum(1))
    sq = zeros.index_add_(0, block, x64.pow(2).sum(1))
    sx = torch.zeros(n_blocks, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, block, x64).cpu()
    counts = torch.bincount(block).tolist()
    return list(zip(sse.tolist(), sq.tolist(), sx, counts, strict=True))


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """Global explained variance (a 0-d float64 tensor): 1 - sum_t SSE_t / sum_t ||x_t - mean(x)||^2.

    SAELens 6.54's `explained_variance` (the fixed formula of PR #665, `ExplainedVarianceCalculator`), computed
    as 1 - mean SSE / (mean ||x||^2 - ||mean x||^2) in float64; with total variance < 1e-10 it is 1 when the MSE
    is < 1e-10 too, else 0. Not the inflated pre-#665 / SAEBench 0.6.0 formula (METRICS.md, known bugs).
    """
    sse, sq_norm, sum_x = _sums(x, x_hat)
    return torch.tensor(_explained_variance_from_sums(sse, sq_norm, sum_x, x.shape[0]), dtype=torch.float64)


def explained_variance_legacy(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-token legacy explained variance [B]: 1 - SSE_t / ||x_t - mean_batch(x)||^2.

    SAELens 6.54 `explained_variance_legacy` (the form SAEBench's paper and leaderboard report): the mean is over
    *this batch's* rows, and the reported number is the mean of these per-token ratios over all tokens. Because
    of the batch mean it depends on how tokens are batched; pass SAELens's batches to reproduce its number.
    """
    x, x_hat = _work(x), _work(x_hat)
    return 1 - mse(x, x_hat) / (x - x.mean(dim=0)).pow(2).sum(dim=-1)


def relative_reconstruction_bias(x: Tensor, x_hat: Tensor) -> Tensor:
    """mean_t ||x_hat_t||^2 / mean_t <x_t, x_hat_t> over one batch (a 0-d tensor).

    SAELens 6.54 `relative_reconstruction_bias` (Gated SAE paper, eq. 10) for one batch; SAELens reports the mean
    of these per-batch ratios (`CoreAccumulator` does the same). 1 means no shrinkage; < 1 means x_hat is shrunk.
    """
    x, x_hat = _work(x), _work(x_hat)
    return x_hat.pow(2).sum(dim=-1).mean() / (x * x_hat).sum(dim=-1).mean()


class CoreAccumulator:
    """Streams `update(x, x_hat, z)` over batches of counted (unmasked) rows; `result()` gives the core metrics.

    Token means (l0, mse, cosine_similarity, explained_variance_legacy) are global means over all tokens, as
    SAELens's `torch.cat(...).mean()`; explained_variance uses SAELens's streaming float64 sums, so it equals
    `explained_variance` on the concatenated batches. Two SAELens metrics are per batch by definition and so do
    depend on batching: explained_variance_legacy (batch mean) and relative_reconstruction_bias (mean of the
    per-batch ratios). `relative_reconstruction_bias_global` is the batch-independent ratio of global means.
    """

    BLOCK_ROWS = 128  # rows per bootstrap unit of explained variance (about one context of consecutive rows)

    def __init__(self) -> None:
        self._blocks: list[tuple[float, float, Tensor, int]] = []  # per block: sse, sum ||x||^2, sum x, rows
        self.n_tokens = 0
        self._sum_l0 = 0.0
        self._sum_sse = 0.0
        self._sum_sq_norm = 0.0
        self._sum_x: Tensor | None = None
        self._sum_cos = 0.0
        self._sum_ev_legacy = 0.0
        self._rrb_batches: list[float] = []
        self._sum_xhat_sq = 0.0
        self._sum_dot = 0.0

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, z: Tensor) -> None:
        """Add one batch: x, x_hat [B, d_in] and z [B, d_sae], special-token rows already removed.

        z is used only for L0, so the [B, k] values of a TopK code serve as well as the dense [B, d_sae].
        """
        if x.shape[0] == 0:
            return  # an all-special batch adds nothing (SAELens would add a NaN rrb here)
        sse, sq_norm, sum_x = _sums(x, x_hat)
        self._blocks += _block_sums(x, x_hat, self.BLOCK_ROWS)
        self._sum_sse += sse
        self._sum_sq_norm += sq_norm
        self._sum_x = sum_x if self._sum_x is None else self._sum_x + sum_x
        self._sum_l0 += l0(z).to(torch.float64).sum().item()
        self._sum_cos += cosine_similarity(x, x_hat).to(torch.float64).sum().item()
        self._sum_ev_legacy += explained_variance_legacy(x, x_hat).to(torch.float64).sum().item()
        self._rrb_batches.append(relative_reconstruction_bias(x, x_hat).item())
        x64, x_hat64 = x.to(torch.float64), x_hat.to(torch.float64)
        self._sum_xhat_sq += x_hat64.pow(2).sum().item()
        self._sum_dot += (x64 * x_hat64).sum().item()
        self.n_tokens += x.shape[0]

    def result(self) -> dict:
        """Floats: l0, mse, explained_variance, explained_variance_legacy, cosine_similarity,
        relative_reconstruction_bias (SAELens: mean of per-batch ratios), relative_reconstruction_bias_global,
        and n_tokens."""
        n = self.n_tokens
        if n == 0:
            nan = math.nan
            return {
                "l0": nan, "mse": nan, "explained_variance": nan, "explained_variance_legacy": nan,
                "cosine_similarity": nan, "relative_reconstruction_bias": nan,
                "relative_reconstruction_bias_global": nan, "n_tokens": 0,
            }
        return {
            "l0": self._sum_l0 / n,
            "mse": self._sum_sse / n,
            "explained_variance": _explained_variance_from_sums(self._sum_sse, self._sum_sq_norm, self._sum_x, n),
            "explained_variance_legacy": self._sum_ev_legacy / n,
            "cosine_similarity": self._sum_cos / n,
            "relative_reconstruction_bias": sum(self._rrb_batches) / len(self._rrb_batches),
            "relative_reconstruction_bias_global": self._sum_xhat_sq / self._sum_dot,
            "n_tokens": n,
        }

    def blocks(self) -> dict[str, list[float]]:
        """`explained_variance_blocks` of the rows seen: the bootstrap units of explained variance."""
        return explained_variance_blocks(self._blocks)


def explained_variance_blocks(blocks: list[tuple[float, float, Tensor, int]]) -> dict[str, list[float]]:
    """Per block of consecutive rows: its SSE and its sum of ||x - mean||^2 about the global mean, so that
    1 - sum(sse) / sum(sst) is the global explained variance and a bootstrap over blocks resamples it."""
    if not blocks:
        return {"sse": [], "sst": []}
    n = sum(b[3] for b in blocks)
    mean = sum(b[2] for b in blocks) / n
    sst = [sq - 2 * float(sx @ mean) + m * float(mean @ mean) for _, sq, sx, m in blocks]
    return {"sse": [b[0] for b in blocks], "sst": sst}


def ce_kl_scores(ce_clean: float, ce_sae: float, ce_zero: float, kl_sae: float, kl_zero: float) -> dict:
    """SAELens `ce_loss_score` = (CE_zero - CE_sae) / (CE_zero - CE_clean) and `kl_div_score` =
    (KL_zero - KL_sae) / KL_zero, ratios of the global means (1 is perfect; either can leave [0, 1]).

    A zero denominator gives NaN (SAELens divides floats and would raise ZeroDivisionError).
    """

    def ratio(num, den):
        if np.ndim(den):  # arrays of bootstrap replicates
            return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)
        return num / den if den != 0 else math.nan

    return {"ce_score": ratio(ce_zero - ce_sae, ce_zero - ce_clean), "kl_score": ratio(kl_zero - kl_sae, kl_zero)}
