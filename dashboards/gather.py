"""One pass over an activation cache gathering every dashboard statistic of many latents at once.

Pure tensor code: `select_firings` picks the firings out of a batch's TopK code (`SAEWeights.encode_topk`),
`Gatherer.update` folds a batch of firings into running per-latent state, `Gatherer.result` hands back
`LatentStats`. The driver (`dashboards/build.py`) reads the cache and writes pages; nothing here opens a file.

Per latent, over all scanned tokens (a latent "fires" on a token when its activation is > 0):
- count, sum and max of its activations;
- top contexts: the `n_top` sequences with the highest max activation of the latent (one entry per sequence), kept
  by a running `torch.topk` merge of each batch's per-sequence maxima; each entry keeps the latent's activations
  over a window of tokens around the max token;
- a uniform random sample of `n_reservoir` firings (priority sampling: every firing draws a uniform priority, the
  `n_reservoir` highest priorities are kept, merged by `torch.topk`), each with its window; `quantile_bands` splits
  it into activation-quantile bands at the end;
- an exact histogram of its nonzero activations over `n_bins` equal bins of [0, 2^e), e the smallest integer
  with max < 2^e. The range doubles as larger activations arrive; doubling merges bins pairwise, so the
  counts equal those of one histogram over the final edges.

Batches must hold whole sequences, rows in cache order (`rows_per_seq` rows each), so that a sequence's maximum
and every window lie inside one batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

EMPTY_EXP = -1000  # histogram exponent of a latent that has not fired yet (its counts are all zero)


@dataclass
class GatherConfig:
    n_top: int = field(default=20, metadata={"help": "top activating contexts kept per latent"})
    n_reservoir: int = field(default=60, metadata={
        "help": "uniformly sampled firings kept per latent, from which the quantile bands are drawn"})
    # a power of two keeps bin edges exact as the range doubles
    n_bins: int = field(default=64, metadata={"help": "activation histogram bins (a power of two)"})
    before: int = field(default=24, metadata={"help": "tokens shown before the marked token"})
    after: int = field(default=8, metadata={"help": "tokens shown after the marked token"})
    seed: int = field(default=0, metadata={"help": "seed of the priorities of the uniform sample"})

    def __post_init__(self) -> None:
        if self.n_top < 1 or self.n_reservoir < 1:
            raise ValueError(f"n_top and n_reservoir must be positive, got {self.n_top}, {self.n_reservoir}")
        if self.n_bins < 1 or self.n_bins & (self.n_bins - 1):
            raise ValueError(f"n_bins must be a power of two, got {self.n_bins}")
        if self.before < 0 or self.after < 0:
            raise ValueError("before and after must be >= 0")


@dataclass
class LatentStats:
    """Everything gathered, latent-major; position p describes latent `latents[p]`.

    Rows are global cache rows (the concatenated shards). Empty slots of `top_*` / `sample_*` have row -1.
    Windows: `*_start[p, j]` is the global row of the window's first token, `*_window[p, j]` the latent's
    activations over the `window` tokens from there; `*_row` is the marked token's row.
    """

    latents: Tensor  # [L] int64
    n_tokens: int
    window: int
    count: Tensor  # [L] int64
    act_sum: Tensor  # [L] float64
    act_max: Tensor  # [L] float32
    hist_counts: Tensor  # [L, n_bins] int64 over [0, hist_top)
    hist_top: Tensor  # [L] float64, 2^e (0 for latents that never fired)
    top_value: Tensor  # [L, n_top] descending
    top_row: Tensor
    top_start: Tensor
    top_window: Tensor  # [L, n_top, window]
    sample_priority: Tensor  # [L, n_reservoir] descending; -1 marks an empty slot
    sample_value: Tensor
    sample_row: Tensor
    sample_start: Tensor
    sample_window: Tensor

    @property
    def density(self) -> Tensor:
        return self.count.double() / max(self.n_tokens, 1)

    @property
    def dead(self) -> Tensor:
        return self.count == 0

    def take(self, positions: Tensor) -> LatentStats:
        """The statistics of the latents at `positions` only."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return LatentStats(**{k: v[positions] if torch.is_tensor(v) else v for k, v in fields.items()})


def select_firings(vals: Tensor, idx: Tensor, position: Tensor | None,
                   counted: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, latent positions, values) of the firings (vals > 0) of the selected latents.

    `position[i]` is latent i's position in the selection, -1 when not selected; None selects every latent.
    `counted` [B] bool drops the firings of rows that do not count (special tokens); None keeps every row.
    """
    fired = vals > 0
    if counted is not None:
        fired &= counted[:, None]
    if position is not None:
        pos = position[idx]
        fired &= pos >= 0
        idx = pos
    rows = fired.nonzero(as_tuple=True)[0]
    return rows, idx[fired], vals[fired].float()


class Gatherer:
    """Running per-latent dashboard statistics; `update` per batch of whole sequences, `result` at the end."""

    def __init__(self, latents: Tensor, rows_per_seq: int, cfg: GatherConfig | None = None) -> None:
        self.cfg = cfg = cfg or GatherConfig()
        self.latents = torch.as_tensor(latents, dtype=torch.int64).cpu()
        self.R = int(rows_per_seq)
        self.W = min(cfg.before + 1 + cfg.after, self.R)
        L = self.latents.numel()
        self.L = L
        self.n_tokens = 0
        self.count = torch.zeros(L, dtype=torch.int64)
        self.act_sum = torch.zeros(L, dtype=torch.float64)
        self.act_max = torch.zeros(L, dtype=torch.float32)
        self.hist = torch.zeros(L, cfg.n_bins, dtype=torch.int64)
        self.hist_exp = torch.full((L,), EMPTY_EXP, dtype=torch.int64)
        self.top = _Slots(L, cfg.n_top, self.W, empty_key=0.0)  # key = value; only values > 0 enter
        self.sample = _Slots(L, cfg.n_reservoir, self.W, empty_key=-1.0, dtype=torch.float64)  # key: priority
        self._bin_ids = torch.arange(cfg.n_bins)
        self._dense = _DenseBatch(L)

    @torch.no_grad()
    def update(self, rows: Tensor, lat: Tensor, vals: Tensor, n_rows: int, first_row: int,
               n_counted: int | None = None) -> None:
        """Fold in one batch: firings (local row, latent position, value > 0) of `n_rows` cache rows.

        The batch is rows `first_row .. first_row + n_rows - 1` of the cache: whole sequences. `n_counted` is how
        many of them count for densities (special-token rows do not, as in `vsae eval`); default all.
        """
        if n_rows % self.R or first_row % self.R:
            raise ValueError(f"a batch must hold whole sequences of {self.R} rows (got {n_rows} rows at {first_row})")
        rows, lat, vals = rows.cpu(), lat.cpu(), vals.cpu().float()
        self.n_tokens += n_rows if n_counted is None else n_counted
        if rows.numel() == 0:
            return
        L = self.L
        self.count += torch.bincount(lat, minlength=L)
        self.act_sum.index_add_(0, lat, vals.double())
        batch_max = torch.zeros(L).scatter_reduce_(0, lat, vals, "amax")
        torch.maximum(self.act_max, batch_max, out=self.act_max)
        self._histogram(lat, vals, batch_max)

        dense = self._dense
        dense.next_batch(rows, lat, vals, n_rows)
        # Top contexts: each sequence's max activation of each latent, merged into the running top n_top.
        S = n_rows // self.R
        seq = rows // self.R
        key = seq * L + lat
        seq_max = torch.zeros(S * L).scatter_reduce_(0, key, vals, "amax")
        at_max = vals == seq_max[key]
        arg = torch.full((S * L,), n_rows, dtype=torch.int64).scatter_reduce_(0, key[at_max], rows[at_max], "amin")
        cand = seq_max.view(S, L) > self.top.threshold
        if cand.any():
            s, p = cand.nonzero(as_tuple=True)
            r = arg.view(S, L)[s, p]
            self.top.merge(p, seq_max.view(S, L)[s, p], seq_max.view(S, L)[s, p], r, self._starts(r), dense,
                           first_row)
        # Uniform sample: firings whose priority beats the latent's current lowest kept priority.
        prio = firing_priority(rows + first_row, self.latents[lat], self.cfg.seed)
        keep = prio > self.sample.threshold[lat]
        if keep.any():
            r, p, v, u = rows[keep], lat[keep], vals[keep], prio[keep]
            self.sample.merge(p, u, v, r, self._starts(r), dense, first_row)

    def _starts(self, local_rows: Tensor) -> Tensor:
        """Local row of each window's first token: `before` tokens ahead of the row, kept inside its sequence."""
        seq_start = local_rows - local_rows % self.R
        offset = (local_rows - seq_start - self.cfg.before).clamp(0, self.R - self.W)
        return seq_start + offset

    def _histogram(self, lat: Tensor, vals: Tensor, batch_max: Tensor) -> None:
        n_bins = self.cfg.n_bins
        _, need = torch.frexp(batch_max)  # batch_max = m * 2^need, m in [0.5, 1): batch_max < 2^need
        need = torch.where(batch_max > 0, need.to(torch.int64), EMPTY_EXP)
        new_exp = torch.maximum(self.hist_exp, need)
        grown = (new_exp > self.hist_exp).nonzero(as_tuple=True)[0]
        if grown.numel():
            shift = (new_exp[grown] - self.hist_exp[grown]).clamp(max=62)
            merged = self._bin_ids[None, :] >> shift[:, None]  # old bin b lands in bin b >> shift
            self.hist[grown] = torch.zeros(grown.numel(), n_bins, dtype=torch.int64).scatter_add_(
                1, merged, self.hist[grown])
            self.hist_exp = new_exp
        scaled = torch.ldexp(vals.double(), (int(np.log2(n_bins)) - self.hist_exp[lat]).double())
        bins = scaled.floor().to(torch.int64).clamp_(0, n_bins - 1)
        self.hist.view(-1).index_add_(0, lat * n_bins + bins, torch.ones_like(bins))

    def result(self) -> LatentStats:
        fired = self.hist_exp > EMPTY_EXP
        top = torch.where(fired, torch.ldexp(torch.ones(self.L, dtype=torch.float64), self.hist_exp.double()), 0.0)
        best, sample = self.top.sorted(), self.sample.sorted()
        return LatentStats(
            latents=self.latents, n_tokens=self.n_tokens, window=self.W, count=self.count.clone(),
            act_sum=self.act_sum.clone(), act_max=self.act_max.clone(), hist_counts=self.hist.clone(), hist_top=top,
            top_value=best["value"], top_row=best["row"], top_start=best["start"], top_window=best["window"],
            sample_priority=sample["key"], sample_value=sample["value"], sample_row=sample["row"],
            sample_start=sample["start"], sample_window=sample["window"],
        )


_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, m: int) -> Tensor:
    """x * m mod 2^32 for x < 2^32 held in int64, without overflowing int64."""
    return ((((x >> 16) * m) & 0xFFFF) << 16) + (x & 0xFFFF) * m & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mix (Wellons' lowbias32) of x < 2^32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def firing_priority(rows: Tensor, latent_ids: Tensor, seed: int) -> Tensor:
    """A uniform [0, 1) priority per firing, a fixed function of (global row, latent id, seed).

    Hashing rather than drawing from a generator makes a latent's sample the same whichever other latents are
    gathered with it and however the rows are batched.
    """
    key = _hash32(latent_ids ^ _hash32(torch.full_like(latent_ids, seed & _MASK32)))
    key = _hash32((rows >> 32) ^ key)
    lo = _hash32((rows & _MASK32) ^ key)
    hi = _hash32(lo ^ 0x5BD1E995)
    return ((hi << 21) + (lo >> 11)).double() / 2.0**53


class _DenseBatch:
    """The batch's activations as a dense [n_rows, L] matrix, filled on first use (only to cut windows).

    One buffer serves every batch: loading a batch clears just the entries the previous one set, so no
    [n_rows, L] allocation or memset happens per batch.
    """

    def __init__(self, L: int) -> None:
        self.L, self._z, self._set, self._parts = L, torch.zeros(0, L), None, None

    def next_batch(self, rows: Tensor, lat: Tensor, vals: Tensor, n_rows: int) -> None:
        self._parts, self._n = (rows, lat, vals), n_rows

    def windows(self, starts: Tensor, lat: Tensor, width: int) -> Tensor:
        if self._parts is not None:
            rows, lat_all, vals = self._parts
            if self._z.shape[0] < self._n:
                self._z, self._set = torch.zeros(self._n, self.L), None
            if self._set is not None:
                self._z[self._set] = 0.0
            self._z[rows, lat_all] = vals
            self._set, self._parts = (rows, lat_all), None
        return self._z[starts[:, None] + torch.arange(width)[None, :], lat[:, None]]


class _Slots:
    """Per latent, the `n` entries with the highest key so far, each with a window (unordered until `sorted`).

    A merge overwrites only the slots whose entries drop out, so a batch costs in proportion to what changes.
    """

    def __init__(self, L: int, n: int, width: int, empty_key: float, dtype: torch.dtype = torch.float32) -> None:
        self.n, self.width = n, width
        self.key = torch.full((L, n), empty_key, dtype=dtype)
        self.value = torch.zeros(L, n)
        self.row = torch.full((L, n), -1, dtype=torch.int64)
        self.start = torch.full((L, n), -1, dtype=torch.int64)
        self.window = torch.zeros(L, n, width)
        self.threshold = self.key.amin(1)  # the lowest kept key per latent: a candidate must beat it

    def merge(self, lat: Tensor, key: Tensor, value: Tensor, local_row: Tensor, local_start: Tensor,
              dense: _DenseBatch, first_row: int) -> None:
        """Merge candidates (latent position, key, value, rows) into the kept entries: top n keys per latent."""
        touched, inverse, per_latent = torch.unique(lat, return_inverse=True, return_counts=True)
        # Rank of each candidate among its latent's candidates by key (descending); at most n can enter.
        order = torch.argsort(inverse.double() * 2.0 - key.double() / (key.abs().max().double() + 1.0))
        first = torch.cumsum(per_latent, 0) - per_latent
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel()) - first[inverse[order]]
        ok = rank < self.n
        inverse, rank, idx = inverse[ok], rank[ok], ok.nonzero(as_tuple=True)[0]

        T, n = touched.numel(), self.n
        cand_key = torch.full((T, n), float("-inf"), dtype=self.key.dtype)
        cand_key[inverse, rank] = key[idx]
        cand_id = torch.full((T, n), -1, dtype=torch.int64)
        cand_id[inverse, rank] = idx
        _, pick = torch.cat([self.key[touched], cand_key], 1).topk(n, dim=1)
        chosen = torch.zeros(T, 2 * n, dtype=torch.bool).scatter_(1, pick, True)
        # Per latent, as many old slots drop out as candidates enter: pair them in order and overwrite.
        t_old, slot = (~chosen[:, :n]).nonzero(as_tuple=True)
        t_new, c = chosen[:, n:].nonzero(as_tuple=True)
        if t_new.numel() == 0:
            return
        which, p = cand_id[t_new, c], touched[t_old]
        self.key[p, slot] = key[which]
        self.value[p, slot] = value[which]
        self.row[p, slot] = local_row[which] + first_row
        self.start[p, slot] = local_start[which] + first_row
        self.window[p, slot] = dense.windows(local_start[which], p, self.width)
        self.threshold[touched] = self.key[touched].amin(1)

    def sorted(self) -> dict[str, Tensor]:
        """The kept entries of every latent in descending key order."""
        order = self.key.argsort(dim=1, descending=True, stable=True)
        out = {name: getattr(self, name).gather(1, order) for name in ("key", "value", "row", "start")}
        out["window"] = self.window.gather(1, order[..., None].expand(-1, -1, self.width))
        return out


def quantile_bands(values: np.ndarray, n_bands: int) -> list[np.ndarray]:
    """Indices into `values` (a uniform sample, in random order) of each activation-quantile band, lowest first.

    The sample is sorted by value and cut into `n_bands` groups of (nearly) equal size; each group's indices are
    returned in ascending order, i.e. in the sample's own random order, so its first few are a random pick.
    """
    order = np.argsort(np.asarray(values), kind="stable")
    return [np.sort(group) for group in np.array_split(order, n_bands)]
