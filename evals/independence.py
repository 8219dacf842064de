"""Statistical independence of SAE latents (DESIGN.md, Metrics: Independence (b)), each statistic beside its null.

Over z [N, d_sae] (latent activations of the first N counted eval tokens) and W_dec [d_sae, d_in]. The |Pearson
rho| of two independent latents is not 0 but about 0.8 / sqrt(N) (E|N(0, 1/N)|), so a raw mean |rho| mostly
measures N. Every correlation and co-firing statistic here is therefore also computed on a *column-permutation
null*: z with each latent's column permuted over the N tokens by its own seeded permutation, which keeps each
latent's values and firing density and destroys every dependence between latents; the excess over the null is
the dependence. `DEFINITIONS` defines every key of the result (eval.json carries it).

Sparse codes are held as scipy CSR matrices: the co-moment blocks (Z^T Z) and the bootstrap's weighted sums are
then sparse matrix products whose cost follows the nonzeros, N k^2 for TopK codes, not N d_sae^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from evals.stats import N_BOOT, bootstrap_weights, percentile_interval

MIN_SUPPORT = 5.0  # expected co-firings N p_i p_j a pair needs before its lift is counted
N_TAIL_TOP = 10  # latents listed in `tail_top`

# Memory bounds: entries of one dense block of the latent x latent matrix; gathered entries per chunk of pairs;
# bootstrap replicates per matrix product.
_BLOCK_ENTRIES = 1 << 24
_PAIR_ENTRIES = 1 << 23
_BOOT_CHUNK = 64
_NULL_TAIL_LATENTS = 2048  # latents whose null max |rho| estimates the null's tail summaries

_NULL = "the same statistic on the column-permutation null (each latent's column permuted independently, seeded)"
DEFINITIONS: dict[str, str] = {
    "n_tokens": "N: rows of z used (the first N held-out counted tokens; fixed by the caller so runs compare)",
    "n_alive": "latents that fire (z != 0) on at least one of the N tokens",
    "n_constant": "alive latents with the same value on every token (rho undefined; left out of every statistic)",
    "n_pairs": "pairs (i < j) of alive non-constant latents the rho statistics use: all of them, or a seeded uniform "
               "sample when there are more than max_pairs (`sampled` says which)",
    "sampled": "whether the rho pairs are a sample of all pairs",
    "rho_threshold": "the |rho| threshold of frac_abs_rho_above",
    "mean_abs_rho": "mean over the pairs of |Pearson rho| between the two latents' activation columns (population "
                    "moments over the N tokens, zeros included); about 0.8/sqrt(N) for independent latents",
    "null_mean_abs_rho": f"mean_abs_rho, {_NULL}, same pairs",
    "mean_abs_rho_excess": "mean_abs_rho - null_mean_abs_rho: the mean |rho| above the noise floor of N tokens",
    "mean_abs_rho_excess_se": "bootstrap standard error of mean_abs_rho_excess (rows resampled, pairs fixed)",
    "intervals": "intervals.mean_abs_rho_excess: 95% paired bootstrap interval over the N tokens (n_boot "
                 "replicates; trained and null recomputed on the same resampled rows, pairs fixed), recentred on "
                 "the point estimate (see _bootstrap_excess)",
    "n_boot": "bootstrap replicates of the interval (0: no interval)",
    "frac_abs_rho_above": "fraction of the pairs with |rho| > rho_threshold",
    "null_frac_abs_rho_above": f"frac_abs_rho_above, {_NULL}",
    "tail_partners": "partners each latent's max |rho| is taken over: every other alive non-constant latent",
    "max_abs_rho_mean": "per latent, max over partners of |rho|; mean over latents",
    "max_abs_rho_median": "median over latents of the per-latent max |rho|",
    "max_abs_rho_p95": "95th percentile over latents of the per-latent max |rho|",
    "null_max_abs_rho_mean": f"max_abs_rho_mean, {_NULL}; over a seeded random subset of at most "
                             f"{_NULL_TAIL_LATENTS} latents (each against all partners)",
    "null_max_abs_rho_median": f"max_abs_rho_median, {_NULL}; latents as null_max_abs_rho_mean",
    "null_max_abs_rho_p95": f"max_abs_rho_p95, {_NULL}; latents as null_max_abs_rho_mean",
    "frac_latents_above_null_p95": "fraction of latents whose max |rho| exceeds null_max_abs_rho_p95 (about 0.05 "
                                   "for independent latents)",
    "tail_top": f"the {N_TAIL_TOP} latents with the largest max |rho|: [latent, partner, signed rho]",
    "min_support": "expected co-firing count N P(i) P(j) a pair needs to enter the lift statistics",
    "n_supported_pairs": "pairs (i < j) of alive non-constant latents with N P(i) P(j) >= min_support (all pairs, "
                         "not sampled; the null has the same, since permutation keeps P(i))",
    "mean_log2_lift": "mean over supported pairs of log2 lift, lift = P(i and j fire) / (P(i) P(j)), with 0.5 "
                      "added to the observed and the expected co-firing counts so never-co-firing pairs stay finite",
    "frac_lift_above_2": "fraction of supported pairs that co-fire more than twice as often as chance (lift > 2)",
    "frac_lift_below_half": "fraction of supported pairs that co-fire less than half as often as chance (lift < "
                            "0.5; TopK's competition between latents shows here)",
    "null_mean_log2_lift": f"mean_log2_lift, {_NULL}",
    "null_frac_lift_above_2": f"frac_lift_above_2, {_NULL}",
    "null_frac_lift_below_half": f"frac_lift_below_half, {_NULL}",
    "mean_max_decoder_cos": "mean over alive latents of max_{j != i} |cos(W_dec[i], W_dec[j])|, j over all latents "
                            "(SAEBench's average_max_decoder_cosine_sim takes the signed max; anti-parallel rows "
                            "are as redundant as parallel ones)",
    "cofiring_jaccard": "among the top_k alive latents of highest firing density, mean over pairs of the Jaccard "
                        "index of their firing sets (no null: use the lift statistics for dependence)",
    "top_k_latents": "the latents cofiring_jaccard used",
}


@dataclass(frozen=True)
class _Codes:
    """Activations z [N, m] of the m latents studied, as CSR float64 (`z`) and its transpose (`zt`, [m, N])."""

    z: sp.csr_matrix
    zt: sp.csr_matrix

    @classmethod
    def of(cls, z: sp.csr_matrix) -> _Codes:
        z = z.tocsr().astype(np.float64)
        return cls(z, z.T.tocsr())

    @property
    def n_tok(self) -> int:
        return self.z.shape[0]

    def fires(self) -> sp.csr_matrix:
        """zt with every nonzero set to 1: [m, N] firing indicators."""
        f = self.zt.copy()
        f.data[:] = 1.0
        return f


def _to_csr(z: Tensor) -> sp.csr_matrix:
    row, col = z.nonzero(as_tuple=True)
    vals = z[row, col].to(torch.float64).numpy()
    return sp.csr_matrix((vals, (row.numpy(), col.numpy())), shape=tuple(z.shape))


def _permute_columns(z: sp.csr_matrix, seed: int) -> sp.csr_matrix:
    """The column-permutation null: each column's entries moved by its own uniform random permutation of the N
    rows, i.e. its nonzero values land on a uniformly random set of rows, drawn without replacement."""
    csc = z.tocsc()
    rng = np.random.default_rng([seed, 0x5EED])
    rows = np.empty_like(csc.indices)
    for c in range(z.shape[1]):
        lo, hi = csc.indptr[c], csc.indptr[c + 1]
        rows[lo:hi] = rng.choice(z.shape[0], size=hi - lo, replace=False)
    return sp.csc_matrix((csc.data, rows, csc.indptr), shape=z.shape).tocsr()


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


# --- rho over the sampled pairs, and its bootstrap ------------------------------------------------------------------

@dataclass(frozen=True)
class _PairMoments:
    """What the rho of the pairs (i_p, j_p) under any row weighting is computed from: the [2m, N] matrix of z and
    z^2 (transposed) for the per-latent moments, and chunks of the [n_pairs, N] matrix whose row p is
    z[:, i_p] * z[:, j_p] (nonzero only where both latents fire)."""

    moments: sp.csr_matrix
    products: list[sp.csr_matrix]
    i: Tensor
    j: Tensor

    @classmethod
    def of(cls, codes: _Codes, i: Tensor, j: Tensor) -> _PairMoments:
        per_latent = max(1.0, codes.zt.nnz / max(1, codes.zt.shape[0]))
        step = max(1, int(_PAIR_ENTRIES // per_latent))
        i_np, j_np = i.numpy(), j.numpy()
        products = [codes.zt[i_np[lo : lo + step]].multiply(codes.zt[j_np[lo : lo + step]]).tocsr()
                    .astype(np.float32) for lo in range(0, len(i_np), step)]
        return cls(sp.vstack([codes.zt, codes.zt.power(2)]).tocsr(), products, i, j)

    def rho(self, weights: np.ndarray) -> Tensor:
        """rho [n_pairs, B] under B row weightings `weights` [B, N] (a row of ones: the data itself). A replicate
        that leaves a latent constant makes its pairs NaN.

        Per-latent moments in float64 (var = E[z^2] - E[z]^2 cancels for dense latents); the pair stage in float32,
        which halves its memory traffic: E[z_i z_j] - E[z_i] E[z_j] loses about 1e-7 of E[z_i] E[z_j], and in units
        of rho that is 1e-7 sqrt(P(i) P(j)) at most, far below the 1/sqrt(N) noise.
        """
        wt = np.ascontiguousarray(weights.T)
        total = torch.from_numpy(weights.sum(axis=1))
        m = self.moments.shape[0] // 2
        sums = torch.from_numpy(self.moments @ wt) / total
        mean = sums[:m]
        inv_std = (sums[m:] - mean.square()).rsqrt_().float()  # a constant latent: 1/0 = inf, its pairs NaN below
        mean, total, wt = mean.float(), total.float(), wt.astype(np.float32)
        rho = torch.empty(sum(p.shape[0] for p in self.products), len(weights))
        lo = 0
        for p in self.products:
            rho[lo : lo + p.shape[0]] = torch.from_numpy(p @ wt)
            lo += p.shape[0]
        rho.div_(total).sub_(mean[self.i] * mean[self.j]).mul_(inv_std[self.i]).mul_(inv_std[self.j])
        return rho.nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan).clamp_(-1.0, 1.0)


def _mean_abs(rho: Tensor, pair_counts: Tensor | None = None) -> np.ndarray:
    """Mean |rho| over pairs (axis 0) per replicate, NaN pairs left out; weighted by `pair_counts` [n_pairs, B]
    (how often each pair is drawn in each replicate) when given."""
    ok = ~rho.isnan()
    a = rho.abs_().nan_to_num_(nan=0.0)
    if pair_counts is None:
        return (a.sum(0) / ok.sum(0)).numpy()
    drawn = pair_counts.sum(0) if ok.all() else (ok * pair_counts).sum(0)  # NaN pairs are rare: skip a pass
    return ((a * pair_counts).sum(0) / drawn).numpy()


def _resample_counts(n: int, b: int, gen: torch.Generator) -> Tensor:
    """[n, b]: how often each of n units is drawn in each of b replicates of n draws with replacement."""
    draws = torch.randint(n, (b, n), generator=gen) + n * torch.arange(b)[:, None]
    return torch.bincount(draws.flatten(), minlength=n * b).view(b, n).T.float()


def _bootstrap_excess(arms: list[_PairMoments], excess: float, sampled: bool, n_boot: int, seed: int) -> dict:
    """Paired bootstrap of mean_abs_rho - null_mean_abs_rho over the N rows, both arms recomputed on the same
    resampled rows. Pairs stay fixed when they are all the pairs; when they are a sample of them, each replicate
    resamples the pairs too (a two-way bootstrap, so the interval covers the all-pairs quantity; it ignores the
    finite-population correction, which is conservative).

    Resampling rows adds its own noise to every rho, and |.| turns that noise into a positive shift, larger for
    pairs near 0 (all of the null's) than for strongly dependent ones, so with dependence the replicates of the
    excess sit slightly below the estimate. The bootstrap gives the spread only: its percentile interval is
    recentred on the point estimate.
    """
    if n_boot <= 0:
        return {"mean_abs_rho_excess_se": math.nan, "intervals": {}}
    weights = bootstrap_weights(arms[0].moments.shape[1], n_boot, seed)
    n_pairs = len(arms[0].i)
    gen = torch.Generator().manual_seed(seed + 1)
    boot = np.zeros(n_boot)
    for lo in range(0, n_boot, _BOOT_CHUNK):
        w = weights[lo : lo + _BOOT_CHUNK]
        counts = _resample_counts(n_pairs, len(w), gen) if sampled else None
        boot[lo : lo + len(w)] = _mean_abs(arms[0].rho(w), counts) - _mean_abs(arms[1].rho(w), counts)
    centred = boot - np.nanmean(boot) + excess
    return {"mean_abs_rho_excess_se": float(np.nanstd(boot, ddof=1)) if n_boot > 1 else math.nan,
            "intervals": {"mean_abs_rho_excess": percentile_interval(centred)}}


def _rho_stats(trained: _Codes, null: _Codes, i: Tensor, j: Tensor, sampled: bool, threshold: float, n_boot: int,
               seed: int) -> dict:
    if not len(i):
        return {"mean_abs_rho": math.nan, "null_mean_abs_rho": math.nan, "mean_abs_rho_excess": math.nan,
                "frac_abs_rho_above": math.nan, "null_frac_abs_rho_above": math.nan,
                "mean_abs_rho_excess_se": math.nan, "intervals": {}}
    arms = [_PairMoments.of(c, i, j) for c in (trained, null)]
    rho, rho0 = (arm.rho(np.ones((1, trained.n_tok)))[:, 0].abs() for arm in arms)
    out = {"mean_abs_rho": rho.double().mean().item(), "null_mean_abs_rho": rho0.double().mean().item()}
    out["mean_abs_rho_excess"] = out["mean_abs_rho"] - out["null_mean_abs_rho"]
    out["frac_abs_rho_above"] = (rho > threshold).double().mean().item()
    out["null_frac_abs_rho_above"] = (rho0 > threshold).double().mean().item()
    return out | _bootstrap_excess(arms, out["mean_abs_rho_excess"], sampled, n_boot, seed)


# --- all pairs, in blocks: the per-latent tail and the co-firing lift ---------------------------------------------

def _rows_per_block(m: int) -> int:
    return max(1, _BLOCK_ENTRIES // max(1, m))


def _max_abs_rho(codes: _Codes, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each latent of `rows` (default: all): max over all other latents of |rho|, that partner, and the signed
    rho (population moments)."""
    m, n_tok = codes.z.shape[1], codes.n_tok
    rows = np.arange(m) if rows is None else rows
    mean = np.asarray(codes.z.sum(axis=0)).ravel() / n_tok
    std = np.sqrt(np.clip(np.asarray(codes.z.power(2).sum(axis=0)).ravel() / n_tok - mean**2, 0.0, None))
    partner, signed = np.full(len(rows), -1), np.zeros(len(rows))
    if m < 2:
        return np.zeros(len(rows)), partner, signed
    step = _rows_per_block(m)
    for lo in range(0, len(rows), step):
        r = rows[lo : lo + step]
        rho = (codes.zt[r] @ codes.z).toarray() / n_tok
        rho -= np.outer(mean[r], mean)
        rho /= np.outer(std[r], std)
        rho[np.arange(len(r)), r] = 0.0  # not itself
        arg = np.abs(rho).argmax(axis=1)
        partner[lo : lo + step], signed[lo : lo + step] = arg, rho[np.arange(len(r)), arg]
    return np.clip(np.abs(signed), 0.0, 1.0), partner, signed


def _tail_stats(trained: _Codes, null: _Codes, columns: np.ndarray, seed: int) -> dict:
    best, partner, signed = _max_abs_rho(trained)
    # The null's summaries describe a distribution over latents: a random subset of them estimates it, at a
    # fraction of the cost (each still against all partners).
    m = len(columns)
    subset = np.sort(np.random.default_rng([seed, 2]).permutation(m)[:_NULL_TAIL_LATENTS])
    best0 = _max_abs_rho(null, subset)[0]
    out = {"tail_partners": max(0, len(columns) - 1)}
    for prefix, v in (("", best), ("null_", best0)):
        have = len(v) > 1
        out[f"{prefix}max_abs_rho_mean"] = float(v.mean()) if have else math.nan
        out[f"{prefix}max_abs_rho_median"] = float(np.median(v)) if have else math.nan
        out[f"{prefix}max_abs_rho_p95"] = float(np.percentile(v, 95)) if have else math.nan
    out["frac_latents_above_null_p95"] = (float((best > out["null_max_abs_rho_p95"]).mean())
                                          if len(best) > 1 else math.nan)
    top = np.argsort(-best, kind="stable")[:N_TAIL_TOP] if len(best) > 1 else []
    out["tail_top"] = [[int(columns[t]), int(columns[partner[t]]), float(signed[t])] for t in top]
    return out


def _lift(codes: _Codes, min_support: float) -> tuple[int, float, float, float]:
    """Over pairs i < j with expected co-firing count N p_i p_j >= min_support: their number, mean log2 lift
    (0.5 added to both counts), and the fractions with lift > 2 and lift < 0.5."""
    fires = codes.fires()
    n_tok = fires.shape[1]
    p = np.asarray(fires.sum(axis=1)).ravel() / n_tok
    # Only latents frequent enough to have a supported partner at all enter the products.
    cand = np.flatnonzero(n_tok * p * (p.max() if len(p) else 0.0) >= min_support)
    fires, p, m = fires[cand], p[cand], len(cand)
    fires_t = fires.T.tocsr()
    n, log_sum, above, below = 0, 0.0, 0.0, 0.0
    for lo in range(0, m, _rows_per_block(m)):
        hi = min(m, lo + _rows_per_block(m))
        expected = n_tok * np.outer(p[lo:hi], p)
        keep = (expected >= min_support) & (np.arange(m)[None, :] > np.arange(lo, hi)[:, None])
        if not keep.any():
            continue
        observed, expected = (fires[lo:hi] @ fires_t).toarray()[keep], expected[keep]
        n += int(keep.sum())
        log_sum += float(np.log2((observed + 0.5) / (expected + 0.5)).sum())
        above += float((observed > 2 * expected).sum())
        below += float((observed < 0.5 * expected).sum())
    return (n, log_sum / n, above / n, below / n) if n else (0, math.nan, math.nan, math.nan)


def _lift_stats(trained: _Codes, null: _Codes, min_support: float) -> dict:
    n, log2_lift, above, below = _lift(trained, min_support)
    _, log2_lift0, above0, below0 = _lift(null, min_support)
    return {"min_support": min_support, "n_supported_pairs": n,
            "mean_log2_lift": log2_lift, "frac_lift_above_2": above, "frac_lift_below_half": below,
            "null_mean_log2_lift": log2_lift0, "null_frac_lift_above_2": above0, "null_frac_lift_below_half": below0}


# --- decoder geometry and the co-firing of the most frequent latents (no null) ------------------------------------

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


def _take_rows(z: Tensor, W_dec: Tensor, n_tokens: int | None) -> Tensor:
    if z.ndim != 2 or W_dec.ndim != 2 or z.shape[1] != W_dec.shape[0]:
        raise ValueError(f"need z [N, d_sae] and W_dec [d_sae, d_in], got {list(z.shape)} and {list(W_dec.shape)}")
    if n_tokens is None:
        return z
    if n_tokens < 2 or z.shape[0] < n_tokens:
        raise ValueError(f"independence needs n_tokens={n_tokens} rows of z (at least 2), but z has {z.shape[0]}: "
                         f"pass n_tokens <= {z.shape[0]} or sample more held-out rows")
    return z[:n_tokens]


@torch.no_grad()
def independence_stats(
    z: Tensor,
    W_dec: Tensor,
    max_pairs: int = 200_000,
    seed: int = 0,
    top_k: int = 32,
    rho_threshold: float = 0.3,
    n_tokens: int | None = None,
    n_boot: int = N_BOOT,
    min_support: float = MIN_SUPPORT,
) -> dict:
    """Every key of `DEFINITIONS`, over the first `n_tokens` rows of z (all rows when None).

    z: [N, d_sae] activations of counted tokens (any float dtype, moved to the CPU). W_dec: [d_sae, d_in].
    `seed` seeds the pair sample, the permutation null and the bootstrap.
    """
    z = _take_rows(z, W_dec, n_tokens).cpu().to(torch.float32)
    W_dec = W_dec.cpu()
    n_tok = z.shape[0]
    full = _to_csr(z)
    counts = np.diff(full.tocsc().indptr)
    alive = np.flatnonzero(counts)
    mean = np.asarray(full.sum(axis=0)).ravel()[alive] / n_tok
    var = np.asarray(full.power(2).sum(axis=0)).ravel()[alive] / n_tok - mean**2
    columns = alive[var > 1e-12 * mean**2]  # relative: E[z^2] - E[z]^2 rounds, never exactly 0

    trained = _Codes.of(full[:, columns])
    null = _Codes.of(_permute_columns(trained.z, seed))
    i, j, sampled = _sample_pairs(len(columns), max_pairs, seed)

    alive_t = torch.from_numpy(alive)
    max_cos = _max_abs_cos(W_dec, alive_t) if W_dec.shape[0] > 1 and len(alive) else torch.empty(0)
    top = alive_t[torch.from_numpy(counts[alive]).argsort(descending=True, stable=True)[:top_k]]
    return {
        "n_tokens": n_tok, "n_alive": len(alive), "n_constant": len(alive) - len(columns),
        "n_pairs": len(i), "sampled": sampled, "rho_threshold": rho_threshold, "n_boot": n_boot,
        **_rho_stats(trained, null, i, j, sampled, rho_threshold, n_boot, seed),
        **_tail_stats(trained, null, columns, seed),
        **_lift_stats(trained, null, min_support),
        "mean_max_decoder_cos": max_cos.mean().item() if max_cos.numel() else math.nan,
        "cofiring_jaccard": _cofiring_jaccard(z[:, top] != 0),
        "top_k_latents": top.tolist(),
    }
