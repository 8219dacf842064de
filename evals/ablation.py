"""Per-latent ablation effect on the model's next-token predictions (DESIGN.md, Metrics: Ablation (a)).

For latent i, on up to `max_contexts` contexts where it fires at some counted (non-special) position, in
token order:
- baseline: the SAE reconstruction spliced in at the hook at counted positions (`evals.splice`, SAELens's
  splice: special-token positions keep their activation);
- ablated: the same, with z_i set to 0 before decoding, i.e. z_i * W_dec[i] removed from the reconstruction at
  every position where i fires (the other latents keep their values: TopK is not re-run).
Per position t of those contexts: the CE increase CE_ablated(t) - CE_baseline(t) of the next-token prediction made
at t (t < L-1), and KL(p_baseline || p_ablated) at t, counted where the input token at t is not special (the
positions `splice_losses` counts). These are averaged over three sets of positions, each with its own count,
because an effect averaged over every position scales with how early in its contexts a latent fires (positions
before its first firing are untouched by the ablation and contribute exactly 0):
- *firing* (`ce_increase`, `kl`): the positions where latent i fires: the effect where it acts;
- *after first* (`ce_increase_after_first`, `kl_after_first`): the positions at or after its first firing in each
  context, where the ablation can have reached (attention carries it forward);
- *all positions* (`ce_increase_all_positions`, `kl_all_positions`): every counted position of the contexts, the
  diluted mean this module reported as `ce_increase` / `kl` before.
`DEFINITIONS` defines every key. A latent that never fires on `tokens` gets {"n_contexts": 0}.

Work: one pass up to the hook finds firing contexts for all latents at once (stopping early once every latent
has `max_contexts`); then per chunk of contexts one baseline forward (which also records where each latent
fires), and the (latent, context) ablations batched `batch_size` rows per forward.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.models import stop_layer
from evals.splice import counted_mask, kl_to_clean, log_probs, next_token_ce, sae_to, splice_hook
from evals.stats import normal_interval
from vsae.checkpoint import SAEWeights

POSITION_SETS = ("firing", "after_first", "all_positions")
# The reported keys of each position set: (CE mean, KL mean, CE count, KL count).
_KEYS = {
    "firing": ("ce_increase", "kl", "n_firing_ce", "n_firing"),
    "after_first": ("ce_increase_after_first", "kl_after_first", "n_after_first_ce", "n_after_first"),
    "all_positions": ("ce_increase_all_positions", "kl_all_positions", "n_tokens", "n_tokens_kl"),
}
_INTERVAL = ("95% normal interval, mean +/- 1.96 SE, the SE clustered by context (the ratio estimator's "
             "linearised variance over the n_contexts contexts: positions of one context share its prefix and the "
             "ablation's effect on it, so they are not independent); absent with fewer than 2 contexts")
DEFINITIONS: dict[str, str] = {
    "n_contexts": "contexts used: the first max_contexts held-out contexts where the latent fires at a counted "
                  "(non-special) position",
    "ce_increase": "mean over the counted positions where the latent fires of CE_ablated - CE_spliced of the "
                   "next-token prediction made there (ablation: z_i * W_dec[i] removed from the spliced "
                   "reconstruction wherever i fires)",
    "kl": "mean over the counted positions where the latent fires of KL(p_spliced || p_ablated)",
    "n_firing_ce": "positions ce_increase averages over (firing positions that have a next token)",
    "n_firing": "positions kl averages over: counted positions where the latent fires in its contexts",
    "ce_increase_after_first": "ce_increase over the counted positions at or after the latent's first firing in "
                               "each context",
    "kl_after_first": "kl over the counted positions at or after the latent's first firing in each context",
    "n_after_first_ce": "positions ce_increase_after_first averages over",
    "n_after_first": "positions kl_after_first averages over",
    "ce_increase_all_positions": "ce_increase over every counted position of the contexts (positions before the "
                                 "first firing contribute 0; this module's `ce_increase` before per-firing means)",
    "kl_all_positions": "kl over every counted position of the contexts (the old `kl`)",
    "n_tokens": "positions ce_increase_all_positions averages over",
    "n_tokens_kl": "positions kl_all_positions averages over",
    "intervals": "per latent, {mean key: [lo, hi]} for each of the six means: " + _INTERVAL,
}


@torch.no_grad()
def _firing_contexts(
    model, hook_name: str, sae: SAEWeights, tokens: Tensor, latents: list[int], special_ids: set[int],
    max_contexts: int, batch_size: int, device: str, progress: bool,
) -> dict[int, list[int]]:
    """Per latent, the first `max_contexts` context indices where it fires at a counted position."""
    columns = torch.tensor(latents, device=device)
    contexts: dict[int, list[int]] = {i: [] for i in latents}
    stop = stop_layer(model, hook_name)
    bar = tqdm(total=tokens.shape[0], desc="ablation: find firing contexts", disable=not progress, leave=False)
    for start in range(0, tokens.shape[0], batch_size):
        if all(len(c) >= max_contexts for c in contexts.values()):
            break  # every latent has its contexts; the rest of the tokens are not needed
        tok = tokens[start : start + batch_size].to(device=device, dtype=torch.long)
        _, cache = model.run_with_cache(tok, names_filter=[hook_name], stop_at_layer=stop)
        fires = (sae.encode(cache[hook_name])[..., columns] != 0) & counted_mask(tok, special_ids)[..., None]
        per_row = fires.any(dim=1).cpu()  # [B, n_latents]
        for j, latent in enumerate(latents):
            room = max_contexts - len(contexts[latent])
            contexts[latent].extend((per_row[:, j].nonzero()[:room, 0] + start).tolist())
        bar.update(tok.shape[0])
    bar.close()
    return contexts


@torch.no_grad()
def latent_ablation_effects(
    model,
    hook_name: str,
    sae: SAEWeights,
    tokens: Tensor,
    latents: list[int],
    special_ids: set[int],
    max_contexts: int = 16,
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
) -> dict[int, dict]:
    """{latent: {every key of DEFINITIONS}} as the module docstring defines; {"n_contexts": 0} for latents that
    never fire. `tokens` is LongTensor [n, ctx]."""
    latents = list(dict.fromkeys(int(i) for i in latents))  # unique, order kept
    bad = [i for i in latents if not 0 <= i < sae.d_sae]
    if bad:
        raise ValueError(f"latents {bad} out of range 0..{sae.d_sae - 1}")
    sae = sae_to(sae, device)
    contexts = _firing_contexts(
        model, hook_name, sae, tokens, latents, special_ids, max_contexts, batch_size, device, progress
    )
    sums = _ablation_sums(model, hook_name, sae, tokens, contexts, special_ids, batch_size, device, progress)
    return {latent: latent_effect(sums[latent]) for latent in latents}


def position_sums(d_ce: Tensor, kl: Tensor, fires: Tensor, counted: Tensor) -> Tensor:
    """Per ablation job (a context with one latent ablated): [J, 12] float64, for each position set of
    POSITION_SETS in order, (CE increase sum, CE positions, KL sum, KL positions).

    d_ce [J, L-1]: CE increase of the prediction made at each position; kl [J, L]; fires [J, L] (bool): where the
    ablated latent fires; counted [J, L] (bool): positions whose input token is not special.
    """
    fires = fires & counted
    after = (fires.cumsum(dim=1) > 0) & counted
    out = []
    for where in (fires, after, counted):
        ce_where = where[:, :-1]
        out += [(d_ce.double() * ce_where).sum(1), ce_where.sum(1).double(),
                (kl.double() * where).sum(1), where.sum(1).double()]
    return torch.stack(out, dim=1)


def _ratio(sums: Tensor, counts: Tensor) -> tuple[float, float]:
    """sum(sums) / sum(counts) over contexts, and its SE clustered by context (NaN below 2 contexts)."""
    n = counts.sum().item()
    if n == 0:
        return math.nan, math.nan
    mean = sums.sum().item() / n
    c = len(sums)
    if c < 2:
        return mean, math.nan
    resid = sums - mean * counts  # a context's share of the error, linearised
    return mean, math.sqrt(c / (c - 1) * resid.square().sum().item()) / n


def latent_effect(per_context: Tensor) -> dict:
    """One latent's entry from its `position_sums` rows, one per context ([C, 12])."""
    if per_context.shape[0] == 0:
        return {"n_contexts": 0}
    out: dict = {"n_contexts": per_context.shape[0]}
    intervals: dict[str, list[float]] = {}
    for k, name in enumerate(POSITION_SETS):
        ce_key, kl_key, n_ce_key, n_kl_key = _KEYS[name]
        s = per_context[:, 4 * k : 4 * k + 4]
        for key, n_key, (sums, counts) in ((ce_key, n_ce_key, (s[:, 0], s[:, 1])),
                                           (kl_key, n_kl_key, (s[:, 2], s[:, 3]))):
            mean, se = _ratio(sums, counts)
            out[key], out[n_key] = mean, int(counts.sum().item())
            if math.isfinite(se):
                intervals[key] = normal_interval(mean, se)
    out["intervals"] = intervals
    return out


def _ablation_sums(
    model, hook_name: str, sae: SAEWeights, tokens: Tensor, contexts: dict[int, list[int]], special_ids: set[int],
    batch_size: int, device: str, progress: bool,
) -> dict[int, Tensor]:
    """Per latent, the `position_sums` rows [C, 12] of its contexts."""
    # Jobs sorted by context, so a chunk of contexts shares one baseline forward among all its latents.
    jobs_by_context: dict[int, list[int]] = defaultdict(list)
    for latent, ctxs in contexts.items():
        for c in ctxs:
            jobs_by_context[c].append(latent)
    context_ids = sorted(jobs_by_context)
    rows: dict[int, list[Tensor]] = {i: [] for i in contexts}

    n_jobs = sum(len(v) for v in jobs_by_context.values())
    bar = tqdm(total=n_jobs, desc="ablation: forwards", disable=not progress, leave=False)
    for start in range(0, len(context_ids), batch_size):
        chunk = context_ids[start : start + batch_size]
        tok = tokens[chunk].to(device=device, dtype=torch.long)
        jobs = [(row, latent) for row, c in enumerate(chunk) for latent in jobs_by_context[c]]
        mask = counted_mask(tok, special_ids)
        for ablated, sums in _chunk_ablations(model, hook_name, sae, tok, mask, jobs, batch_size):
            for b, latent in enumerate(ablated):
                rows[latent].append(sums[b])
            bar.update(len(ablated))
    bar.close()
    return {i: torch.stack(r) if r else torch.zeros(0, 4 * len(POSITION_SETS), dtype=torch.float64)
            for i, r in rows.items()}


@torch.no_grad()
def _chunk_ablations(
    model, hook_name: str, sae: SAEWeights, tok: Tensor, mask: Tensor, jobs: list[tuple[int, int]], batch_size: int
) -> Iterator[tuple[list[int], Tensor]]:
    """One baseline forward over a chunk of contexts `tok` (counted positions `mask`), recording where every latent
    fires, then its (row, latent) ablations `batch_size` rows per forward. Yields per forward the latents ablated
    and their `position_sums` rows (on the CPU)."""
    splice = splice_hook(sae, mask)
    seen: dict[str, Tensor] = {}

    def base_hook(activations: Tensor, hook) -> Tensor:
        seen["acts"] = activations.clone()  # the forward may reuse the tensor after the hook
        return splice(activations, hook)

    base_lp = log_probs(model.run_with_hooks(tok, return_type="logits", fwd_hooks=[(hook_name, base_hook)]))
    base_ce = next_token_ce(base_lp, tok)
    acts = seen.pop("acts")
    for j in range(0, len(jobs), batch_size):
        rows = torch.tensor([row for row, _ in jobs[j : j + batch_size]], device=tok.device)
        ablate = torch.tensor([latent for _, latent in jobs[j : j + batch_size]], device=tok.device)
        m = mask[rows]
        fires = sae.encode(acts[rows])[torch.arange(len(rows), device=tok.device), :, ablate] != 0  # [b, L]
        hook = splice_hook(sae, m, ablate=ablate)
        lp = log_probs(model.run_with_hooks(tok[rows], return_type="logits", fwd_hooks=[(hook_name, hook)]))
        d_ce = next_token_ce(lp, tok[rows]) - base_ce[rows]
        yield ablate.tolist(), position_sums(d_ce, kl_to_clean(base_lp[rows], lp), fires, m).cpu()
