"""Per-latent ablation effect on the model's next-token predictions (DESIGN.md, Metrics: Ablation (a)).

For latent i, on up to `max_contexts` contexts where it fires at some counted (non-special) position, in
token order:
- baseline: the SAE reconstruction spliced in at the hook at counted positions (`evals.splice`, SAELens's
  splice: special-token positions keep their activation);
- ablated: the same, with z_i set to 0 before decoding, i.e. z_i * W_dec[i] removed from the reconstruction at
  every position where i fires (the other latents keep their values: TopK is not re-run).
Reported, as global means over the positions of those contexts (the same positions `splice_losses` counts):
- `ce_increase`: mean over positions t whose input token is not special (t < L-1) of
  CE_ablated(t) - CE_baseline(t), next-token cross-entropy; positions before the first firing contribute 0;
- `kl`: mean over positions whose input token is not special of KL(p_baseline || p_ablated), summed over the
  vocabulary (log-softmax, `kl_div`);
plus `n_contexts`, `n_tokens` (the CE positions), `n_firing` (counted positions where i fires in those contexts).
A latent that never fires on `tokens` gets {"n_contexts": 0}.

Work: one pass up to the hook finds firing contexts for all latents at once (stopping early once every latent
has `max_contexts`); then per chunk of contexts one baseline forward, and the (latent, context) ablations
batched `batch_size` rows per forward.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.models import stop_layer
from evals.splice import counted_mask, kl_to_clean, log_probs, next_token_ce, sae_to, splice_hook
from vsae.checkpoint import SAEWeights


@torch.no_grad()
def _firing_contexts(
    model, hook_name: str, sae: SAEWeights, tokens: Tensor, latents: list[int], special_ids: set[int],
    max_contexts: int, batch_size: int, device: str, progress: bool,
) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Per latent, the first `max_contexts` context indices where it fires at a counted position, and the number
    of counted firing positions in those contexts."""
    columns = torch.tensor(latents, device=device)
    contexts: dict[int, list[int]] = {i: [] for i in latents}
    n_firing: dict[int, int] = dict.fromkeys(latents, 0)
    stop = stop_layer(model, hook_name)
    bar = tqdm(total=tokens.shape[0], desc="ablation: find firing contexts", disable=not progress, leave=False)
    for start in range(0, tokens.shape[0], batch_size):
        if all(len(c) >= max_contexts for c in contexts.values()):
            break  # every latent has its contexts; the rest of the tokens are not needed
        tok = tokens[start : start + batch_size].to(device=device, dtype=torch.long)
        _, cache = model.run_with_cache(tok, names_filter=[hook_name], stop_at_layer=stop)
        fires = (sae.encode(cache[hook_name])[..., columns] != 0) & counted_mask(tok, special_ids)[..., None]
        per_row = fires.sum(dim=1).cpu()  # [B, n_latents] counted firing positions per context
        for j, latent in enumerate(latents):
            room = max_contexts - len(contexts[latent])
            rows = per_row[:, j].nonzero()[:room, 0]
            contexts[latent].extend((rows + start).tolist())
            n_firing[latent] += int(per_row[rows, j].sum())
        bar.update(tok.shape[0])
    bar.close()
    return contexts, n_firing


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
    """{latent: {"n_contexts", "n_tokens", "n_firing", "ce_increase", "kl"}} as the module docstring defines;
    {"n_contexts": 0} for latents that never fire. `tokens` is LongTensor [n, ctx]."""
    latents = list(dict.fromkeys(int(i) for i in latents))  # unique, order kept
    bad = [i for i in latents if not 0 <= i < sae.d_sae]
    if bad:
        raise ValueError(f"latents {bad} out of range 0..{sae.d_sae - 1}")
    sae = sae_to(sae, device)
    contexts, n_firing = _firing_contexts(
        model, hook_name, sae, tokens, latents, special_ids, max_contexts, batch_size, device, progress
    )
    sums = _ablation_sums(model, hook_name, sae, tokens, contexts, special_ids, batch_size, device, progress)
    return {latent: _effect(len(contexts[latent]), n_firing[latent], sums[latent]) for latent in latents}


def _ablation_sums(
    model, hook_name: str, sae: SAEWeights, tokens: Tensor, contexts: dict[int, list[int]], special_ids: set[int],
    batch_size: int, device: str, progress: bool,
) -> dict[int, dict[str, float]]:
    """Per latent, the CE increase and KL summed over the counted positions of its `contexts`, and the numbers of
    those positions ("ce", "kl", "n_ce", "n_kl")."""
    # Jobs sorted by context, so a chunk of contexts shares one baseline forward among all its latents.
    jobs_by_context: dict[int, list[int]] = defaultdict(list)
    for latent, ctxs in contexts.items():
        for c in ctxs:
            jobs_by_context[c].append(latent)
    context_ids = sorted(jobs_by_context)
    sums = {i: {"ce": 0.0, "kl": 0.0, "n_ce": 0, "n_kl": 0} for i in contexts}

    n_jobs = sum(len(v) for v in jobs_by_context.values())
    bar = tqdm(total=n_jobs, desc="ablation: forwards", disable=not progress, leave=False)
    for start in range(0, len(context_ids), batch_size):
        chunk = context_ids[start : start + batch_size]
        tok = tokens[chunk].to(device=device, dtype=torch.long)
        jobs = [(row, latent) for row, c in enumerate(chunk) for latent in jobs_by_context[c]]
        mask = counted_mask(tok, special_ids)
        for ablated, d_ce, kl, n_ce, n_kl in _chunk_ablations(model, hook_name, sae, tok, mask, jobs, batch_size):
            for b, latent in enumerate(ablated):
                s = sums[latent]
                s["ce"] += d_ce[b].item()
                s["kl"] += kl[b].item()
                s["n_ce"] += int(n_ce[b])
                s["n_kl"] += int(n_kl[b])
            bar.update(len(ablated))
    bar.close()
    return sums


@torch.no_grad()
def _chunk_ablations(
    model, hook_name: str, sae: SAEWeights, tok: Tensor, mask: Tensor, jobs: list[tuple[int, int]], batch_size: int
) -> Iterator[tuple[list[int], Tensor, Tensor, Tensor, Tensor]]:
    """One baseline forward over a chunk of contexts `tok` (counted positions `mask`), then its (row, latent)
    ablations `batch_size` rows per forward. Yields per forward the latents ablated and, per job, the CE increase
    and the KL summed over the row's counted positions, and the numbers of those positions (CE, KL)."""
    base_hooks = [(hook_name, splice_hook(sae, mask))]
    base_lp = log_probs(model.run_with_hooks(tok, return_type="logits", fwd_hooks=base_hooks))
    base_ce = next_token_ce(base_lp, tok)
    for j in range(0, len(jobs), batch_size):
        rows = torch.tensor([row for row, _ in jobs[j : j + batch_size]], device=tok.device)
        ablate = torch.tensor([latent for _, latent in jobs[j : j + batch_size]], device=tok.device)
        m = mask[rows]
        hook = splice_hook(sae, m, ablate=ablate)
        lp = log_probs(model.run_with_hooks(tok[rows], return_type="logits", fwd_hooks=[(hook_name, hook)]))
        d_ce = ((next_token_ce(lp, tok[rows]) - base_ce[rows]) * m[:, :-1]).double().sum(dim=1)
        kl = (kl_to_clean(base_lp[rows], lp) * m).double().sum(dim=1)
        yield ablate.tolist(), d_ce, kl, m[:, :-1].sum(dim=1), m.sum(dim=1)


def _effect(n_contexts: int, n_firing: int, s: dict[str, float]) -> dict:
    """One latent's entry of `latent_ablation_effects` from its `_ablation_sums`."""
    if not n_contexts:
        return {"n_contexts": 0}
    return {
        "n_contexts": n_contexts,
        "n_tokens": s["n_ce"],
        "n_firing": n_firing,
        # A context always has a counted position (the latent fired at one), so n_kl > 0; n_ce can be 0 only
        # when that position is the last one of every context.
        "ce_increase": s["ce"] / s["n_ce"] if s["n_ce"] else float("nan"),
        "kl": s["kl"] / s["n_kl"],
    }
