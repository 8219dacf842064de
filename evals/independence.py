"""Statistical independence of SAE latents (DESIGN.md, Metrics: Independence (b)). Pure tensor code.

Definitions, over z [N, d_sae] (latent activations of N counted eval tokens) and W_dec [d_sae, d_in]:
- *alive*: fires (z != 0) on at least one of the N tokens.
- `mean_abs_rho`: mean over pairs (i < j) of alive latents of |Pearson rho| between their activation columns
  (population moments over all N tokens, zeros included). Latents with zero variance (the same value on every
  token) have no defined rho and are left out (`n_constant`). All pairs when there are at most `max_pairs` of
  them, else a seeded uniform sample of `max_pairs` distinct pairs: `n_pairs` counts the pairs used, `sampled`
  says which.
- `frac_abs_rho_above`: fraction of those pairs with |rho| > `rho_threshold` (default 0.3).
- `mean_max_decoder_cos`: mean over alive latents of max_{j != i} |cos(W_dec[i], W_dec[j])|, j over all latents
  (a zero decoder row has cosine 0 with everything). SAEBench's `average_max_decoder_cosine_sim` takes the
  signed max over all latents; here the absolute value (anti-parallel rows are as redundant as parallel ones).
- `cofiring_jaccard`: among the `top_k` alive latents with the highest firing density, the mean over pairs of
  the Jaccard index of their firing sets, |T_i and T_j| / |T_i or T_j|, T_i = tokens where i fires.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Memory for one block of the co-moment matrix (float64 entries) and for one chunk of pair products.
_BLOCK_ENTRIES = 1 << 25
_SCATTER_ENTRIES = 1 << 22


def _sample_pairs(n: int, max_pairs: int, seed: int) -> tuple[Tensor, Tensor, bool]:
    """(i, j) with i < j: every pair when n(n-1)/2 <= max_pairs, else `max_pairs` distinct pairs drawn uniformly
    (seeded): uniform draws, de-duplicated and topped up until there are enough, then a random subset of them."""
    total = n * (n - 1) // 2
    if total <= max_pairs:
        i, j = torch.triu_indices(n, n, offset=1)
        return i, j, False
    gen = torch.Generator().manual_seed(seed)
    flat = torch.zeros(0, dtype=torch.int64)
    while flat.numel() < max_pairs:
        m = 2 * (max_pairs - flat.numel())
        a = torch.randint(n, (m,), generator=gen)
        b = torch.randint(n - 1, (m,), generator=gen)
        b = b + (b >= a)  # uniform over j != i: ordered pairs, hence unordered pairs, are uniform
        flat = torch.unique(torch.cat([flat, torch.minimum(a, b) * n + torch.maximum(a, b)]))
    # unique() sorts, so keep a random subset (not the first max_pairs), then sort it back for memory locality.
    flat = flat[torch.randperm(flat.numel(), generator=gen)[:max_pairs]].sort().values
    return flat // n, flat % n, True


class _Activations:
    """z [N, n] with the per-latent sums the statistics need, read with as few passes over z as possible.

    Sparse z (TopK: k << n latents per row, the usual case) is held as padded rows `index`, `values` [N, kmax]
    (zeros pad short rows), built from one `nonzero` pass; dense z (a ReLU SAE firing widely) is kept as is.
    """

    def __init__(self, z: Tensor) -> None:
        self.z = z
        self.n_tok, self.n = z.shape
        self.sparse = int(torch.count_nonzero(z)) <= z.numel() // 8
        if self.sparse:
            row, col = z.nonzero(as_tuple=True)
            vals = z[row, col].to(torch.float64)
            self.counts = torch.bincount(col, minlength=self.n)
            self.sums = torch.bincount(col, weights=vals, minlength=self.n)
            self.sq_sums = torch.bincount(col, weights=vals.square(), minlength=self.n)
            per_row = torch.bincount(row, minlength=self.n_tok)
            self.kmax = int(per_row.max()) if row.numel() else 0
            slot = torch.arange(row.numel()) - (per_row.cumsum(0) - per_row)[row]  # position within its row
            self.index = torch.zeros(self.n_tok, max(self.kmax, 1), dtype=torch.int64)
            self.values = torch.zeros(self.n_tok, max(self.kmax, 1), dtype=torch.float64)
            self.index[row, slot] = col
            self.values[row, slot] = vals
        else:
            self.counts = (z != 0).sum(dim=0)
            self.sums = z.sum(dim=0, dtype=torch.float64)
            self.sq_sums = z.square().sum(dim=0, dtype=torch.float64)

    def co_moments(self, i: Tensor, j: Tensor) -> Tensor:
        """sum_t z[t, i_p] * z[t, j_p] for each pair p, in float64.

        Sparse: a scatter of each row's kmax x kmax outer product into the n x n matrix (N k^2 work instead of
        N n^2). Dense: a matmul. The matrix is built in blocks of rows, so its memory stays bounded for any n.
        """
        n = self.n
        out = torch.zeros(i.shape[0], dtype=torch.float64)
        z64 = None if self.sparse else self.z.to(torch.float64)
        rows_per_block = max(1, _BLOCK_ENTRIES // n)
        for lo in range(0, n, rows_per_block):
            hi = min(n, lo + rows_per_block)
            in_block = (i >= lo) & (i < hi)
            if not in_block.any():
                continue
            block = self._block(lo, hi) if z64 is None else z64[:, lo:hi].T @ z64
            out[in_block] = block[i[in_block] - lo, j[in_block]]
        return out

    def _block(self, lo: int, hi: int) -> Tensor:
        n, k = self.n, self.values.shape[1]
        block = torch.zeros((hi - lo) * n, dtype=torch.float64)
        tokens_per_chunk = max(1, _SCATTER_ENTRIES // k**2)
        for t in range(0, self.n_tok, tokens_per_chunk):
            v, idx = self.values[t : t + tokens_per_chunk], self.index[t : t + tokens_per_chunk]
            flat = (idx[:, :, None] - lo) * n + idx[:, None, :]
            prod = v[:, :, None] * v[:, None, :]  # padding slots have value 0 and add nothing
            if hi - lo < n:  # several blocks: keep the products whose first latent is in this one
                keep = ((idx >= lo) & (idx < hi))[:, :, None].expand_as(flat)
                flat, prod = flat[keep], prod[keep]
            block.index_add_(0, flat.flatten(), prod.flatten())
        return block.view(hi - lo, n)


def _max_abs_cos(W_dec: Tensor, rows: Tensor) -> Tensor:
    """For each latent in `rows`, the largest |cos| between its decoder row and any other decoder row."""
    W = W_dec.to(torch.float32)
    W = W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)  # a zero row stays zero: cosine 0
    out = torch.empty(rows.shape[0])
    step = max(1, _BLOCK_ENTRIES // W.shape[0])
    for lo in range(0, rows.shape[0], step):
        r = rows[lo : lo + step]
        cos = (W[r] @ W.T).abs()
        cos[torch.arange(r.shape[0]), r] = -1.0  # not itself
        out[lo : lo + step] = cos.max(dim=1).values
    return out


def _cofiring_jaccard(fires: Tensor) -> float:
    """Mean Jaccard index of the firing sets over all pairs of columns of `fires` [N, m] (bool)."""
    m = fires.shape[1]
    if m < 2:
        return math.nan
    f = fires.to(torch.float64)
    both = f.T @ f
    count = f.sum(dim=0)
    either = count[:, None] + count[None, :] - both
    i, j = torch.triu_indices(m, m, offset=1)
    return (both[i, j] / either[i, j]).mean().item()  # columns are alive, so either > 0


@torch.no_grad()
def independence_stats(
    z: Tensor,
    W_dec: Tensor,
    max_pairs: int = 200_000,
    seed: int = 0,
    top_k: int = 32,
    rho_threshold: float = 0.3,
) -> dict:
    """mean_abs_rho, frac_abs_rho_above, n_pairs, sampled, mean_max_decoder_cos, cofiring_jaccard, plus n_tokens,
    n_alive, n_constant and top_k_latents (the latents the co-firing rate used), as the module docstring defines.

    z: [N, d_sae] activations of counted tokens (CPU; any float dtype). W_dec: [d_sae, d_in].
    """
    if z.ndim != 2 or W_dec.ndim != 2 or z.shape[1] != W_dec.shape[0]:
        raise ValueError(f"need z [N, d_sae] and W_dec [d_sae, d_in], got {list(z.shape)} and {list(W_dec.shape)}")
    z, W_dec = z.cpu(), W_dec.cpu()
    n_tok = z.shape[0]
    acts = _Activations(z)
    alive = acts.counts.nonzero()[:, 0]

    # Pearson rho from float64 moments: cov = E[z_i z_j] - E[z_i] E[z_j].
    mean = acts.sums[alive] / n_tok
    var = acts.sq_sums[alive] / n_tok - mean.square()
    varying = (var > 1e-12 * mean.square()).nonzero()[:, 0]  # relative: E[z^2] - E[z]^2 rounds, never exactly 0
    columns, mean, std = alive[varying], mean[varying], var[varying].sqrt()
    i, j, sampled = _sample_pairs(columns.numel(), max_pairs, seed)
    if i.numel():
        cov = acts.co_moments(columns[i], columns[j]) / n_tok - mean[i] * mean[j]
        abs_rho = (cov / (std[i] * std[j])).abs().clamp(max=1.0)
        mean_abs_rho = abs_rho.mean().item()
        frac_above = (abs_rho > rho_threshold).to(torch.float64).mean().item()
    else:
        mean_abs_rho = frac_above = math.nan

    max_cos = _max_abs_cos(W_dec, alive) if W_dec.shape[0] > 1 and alive.numel() else torch.empty(0)
    top = alive[acts.counts[alive].argsort(descending=True, stable=True)[:top_k]]
    return {
        "mean_abs_rho": mean_abs_rho,
        "frac_abs_rho_above": frac_above,
        "rho_threshold": rho_threshold,
        "n_pairs": int(i.numel()),
        "sampled": sampled,
        "mean_max_decoder_cos": max_cos.mean().item() if max_cos.numel() else math.nan,
        "cofiring_jaccard": _cofiring_jaccard(z[:, top] != 0),
        "top_k_latents": top.tolist(),
        "n_tokens": n_tok,
        "n_alive": int(alive.numel()),
        "n_constant": int(alive.numel() - varying.numel()),
    }
