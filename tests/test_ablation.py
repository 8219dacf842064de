"""evals.ablation: per-firing, after-first-firing and all-position means on planted per-position effects (where
the answer is known by hand: c where the latent fires, whatever its position), their context-clustered intervals;
and on the tiny GPT-NeoX (readout refitted, see tests/test_splice.py): zero and tiny decoder rows, dead latents,
a hand-computed reference for all three means, and independence from batching."""

import dataclasses

import pytest
import torch

from evals.ablation import DEFINITIONS, latent_ablation_effects, latent_effect, position_sums
from evals.splice import counted_mask
from tests.test_splice import HOOK, SPECIAL, corpus_tokens, fitted_sae, hook_activations, model_with_fitted_readout


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return model_with_fitted_readout(tiny_checkpoint)


@pytest.fixture(scope="module")
def tokens(model):
    return corpus_tokens(model, 24)


def firing_counts(model, sae, tokens) -> torch.Tensor:
    with torch.no_grad():
        z = sae.encode(hook_activations(model, tokens))
    return ((z != 0) & counted_mask(tokens, SPECIAL)[..., None]).sum(dim=(0, 1))


def effects(model, sae, tokens, latents, **kw):
    return latent_ablation_effects(model, HOOK, sae, tokens, latents, SPECIAL, progress=False, **kw)


def test_zero_decoder_row_has_exactly_zero_effect(model, tokens):
    sae = fitted_sae(model, tokens)
    latent = int(firing_counts(model, sae, tokens).argmax())
    W_dec = sae.W_dec.clone()
    W_dec[latent] = 0.0  # it still fires (the encoder is unchanged) but contributes nothing
    r = effects(model, dataclasses.replace(sae, W_dec=W_dec), tokens, [latent])[latent]
    assert r["n_contexts"] == 16 and r["n_firing"] > 0
    for key in ("ce_increase", "kl", "ce_increase_after_first", "kl_after_first", "ce_increase_all_positions",
                "kl_all_positions"):
        assert r[key] == 0.0 and r["intervals"][key] == [0.0, 0.0]
    assert set(r) <= set(DEFINITIONS)


def test_large_contribution_beats_tiny_decoder_row(model, tokens):
    sae = fitted_sae(model, tokens)
    counts = firing_counts(model, sae, tokens)
    big = int(counts[:64].argmax())  # a +/- principal-axis latent: the largest share of the reconstruction
    small = 64 + int(counts[64:].argmax())  # a random-direction latent, its decoder row shrunk 100-fold
    W_dec = sae.W_dec.clone()
    W_dec[small] *= 0.01
    r = effects(model, dataclasses.replace(sae, W_dec=W_dec), tokens, [big, small])
    assert r[big]["n_contexts"] > 0 and r[small]["n_contexts"] > 0
    assert r[big]["kl"] > 100 * r[small]["kl"] > 0
    # The signed CE change is first order in the removed contribution, and its mean over the few firing positions
    # can nearly cancel for the big latent; over all positions of 16 contexts it does not.
    assert abs(r[big]["ce_increase_all_positions"]) > 10 * abs(r[small]["ce_increase_all_positions"])


def test_dead_latent_reports_no_contexts(model, tokens):
    sae = fitted_sae(model, tokens)
    b_enc = sae.b_enc.clone()
    b_enc[5] = -1e4  # its pre-activation is never positive
    r = effects(model, dataclasses.replace(sae, b_enc=b_enc), tokens, [5, 0])
    assert r[5] == {"n_contexts": 0} and r[0]["n_contexts"] > 0
    with pytest.raises(ValueError, match="out of range"):
        effects(model, sae, tokens, [sae.d_sae])


def test_matches_hand_computation_and_ignores_batching(model, tokens):
    sae = fitted_sae(model, tokens)
    latent = int(firing_counts(model, sae, tokens)[:64].argmax())
    got = effects(model, sae, tokens, [latent, 70, 3], max_contexts=3, batch_size=2)
    other = effects(model, sae, tokens, [latent, 70, 3], max_contexts=3, batch_size=16)
    assert got.keys() == other.keys()
    for i in got:
        scalars = {k: v for k, v in got[i].items() if k != "intervals"}
        assert scalars == pytest.approx({k: v for k, v in other[i].items() if k != "intervals"}, rel=1e-5, abs=1e-8)
        for key, pair in got[i].get("intervals", {}).items():
            assert pair == pytest.approx(other[i]["intervals"][key], rel=1e-5, abs=1e-8)

    # By hand: the first 3 contexts where the latent fires at a counted position; spliced vs spliced-and-ablated.
    mask = counted_mask(tokens, SPECIAL)
    with torch.no_grad():
        fires = ((sae.encode(hook_activations(model, tokens))[..., latent] != 0) & mask).any(dim=1)
        rows = fires.nonzero()[:3, 0]
        tok, m = tokens[rows], mask[rows]

        def run(ablate: bool) -> torch.Tensor:
            def hook(acts, hook):
                z = sae.encode(acts)
                if ablate:
                    z[..., latent] = 0
                return torch.where(m[..., None], sae.decode(z), acts)

            return model.run_with_hooks(tok, fwd_hooks=[(HOOK, hook)]).log_softmax(-1)

        base, abl = run(False), run(True)
    with torch.no_grad():
        fires = (sae.encode(hook_activations(model, tok))[..., latent] != 0) & m
    after = (fires.cumsum(dim=1) > 0) & m
    ce = lambda lp: -lp[:, :-1].gather(-1, tok[:, 1:, None])[..., 0]  # noqa: E731
    d_ce_pos = ce(abl) - ce(base)
    kl_pos = (base.exp() * (base - abl)).sum(-1)
    r = got[latent]
    assert r["n_contexts"] == 3 and r["n_tokens"] == int(m[:, :-1].sum()) and r["n_tokens_kl"] == int(m.sum())
    assert r["n_firing"] == int(fires.sum()) and r["n_firing_ce"] == int(fires[:, :-1].sum())
    assert r["n_after_first"] == int(after.sum()) and r["n_after_first_ce"] == int(after[:, :-1].sum())
    assert r["n_firing"] < r["n_after_first"] < r["n_tokens_kl"]  # three different position sets
    for suffix, where in (("", fires), ("_after_first", after), ("_all_positions", m)):
        assert r["ce_increase" + suffix] == pytest.approx(d_ce_pos[where[:, :-1]].mean().item(), rel=1e-4, abs=1e-6)
        assert r["kl" + suffix] == pytest.approx(kl_pos[where].mean().item(), rel=1e-4, abs=1e-7)
        lo, hi = r["intervals"]["kl" + suffix]
        assert lo < r["kl" + suffix] < hi


def planted(first: list[int], length: int = 10, c: float = 0.5) -> tuple[torch.Tensor, ...]:
    """Per-position effects of one latent over contexts of `length` positions: it fires at `first[k]` and the
    two positions after it in context k; the ablation changes CE and KL by exactly c where it fires, 0 elsewhere."""
    fires = torch.zeros(len(first), length, dtype=torch.bool)
    for k, t in enumerate(first):
        fires[k, t : t + 3] = True
    kl = c * fires.double()
    return kl[:, :-1], kl, fires, torch.ones_like(fires)


@pytest.mark.parametrize("first", [[0, 1, 0], [6, 7, 5], [2, 7]])
def test_per_firing_mean_is_the_effect_where_it_fires_wherever_that_is(first):
    d_ce, kl, fires, counted = planted(first)
    r = latent_effect(position_sums(d_ce, kl, fires, counted))
    assert r["n_contexts"] == len(first) and r["n_firing"] == 3 * len(first)
    assert r["ce_increase"] == pytest.approx(0.5) and r["kl"] == pytest.approx(0.5)  # c, early or late
    # Diluted means depend on where it fires: all positions, 3c / 10 per context (CE: 9 positions, and a firing
    # at the last position has no next token); after the first firing, 3c / (10 - first).
    assert r["kl_all_positions"] == pytest.approx(0.5 * 3 / 10)
    assert r["n_tokens"] == 9 * len(first) and r["n_tokens_kl"] == 10 * len(first)
    assert r["kl_after_first"] == pytest.approx(0.5 * 3 * len(first) / sum(10 - t for t in first))
    assert r["intervals"]["kl"] == pytest.approx([0.5, 0.5])  # every context's mean is c: no spread


def test_per_firing_mean_ignores_special_positions_and_clusters_its_interval_by_context():
    d_ce, kl, fires, counted = planted([0, 3, 5, 1])
    counted[0, 1] = False  # a special token at a firing position: not counted anywhere
    kl[0, 1] = 99.0
    kl[1] *= 3  # context 1's effect is 1.5 where it fires: the contexts disagree
    r = latent_effect(position_sums(d_ce, kl, fires, counted))
    assert r["n_firing"] == 11 and r["n_tokens_kl"] == 39
    assert r["kl"] == pytest.approx((8 * 0.5 + 3 * 1.5) / 11)
    # At or after the first firing: 9 + 7 + 5 + 9 counted positions (context 0 loses its special one).
    assert r["n_after_first"] == 30 and r["kl_after_first"] == pytest.approx((2 * 0.5 + 3 * 1.5 + 3 * 0.5 * 2) / 30)
    per_context = torch.tensor([0.5 * 2, 1.5 * 3, 0.5 * 3, 0.5 * 3], dtype=torch.float64)
    counts = torch.tensor([2.0, 3.0, 3.0, 3.0], dtype=torch.float64)
    resid = per_context - r["kl"] * counts
    se = (4 / 3 * resid.square().sum()).sqrt().item() / 11
    lo, hi = r["intervals"]["kl"]
    assert (hi - lo) / 2 == pytest.approx(1.959964 * se, rel=1e-5) and (lo + hi) / 2 == pytest.approx(r["kl"])
    one = latent_effect(position_sums(*planted([2])))
    assert one["kl"] == pytest.approx(0.5) and "kl" not in one["intervals"]  # one context: no clustered SE
    assert latent_effect(torch.zeros(0, 12)) == {"n_contexts": 0}
