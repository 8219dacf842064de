"""evals.ablation on the tiny GPT-NeoX (readout refitted, see tests/test_splice.py): zero and tiny decoder rows,
dead latents, a hand-computed reference, and independence from batching."""

import dataclasses

import pytest
import torch

from evals.ablation import latent_ablation_effects
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
    assert r["ce_increase"] == 0.0
    assert r["kl"] == 0.0


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
    assert abs(r[big]["ce_increase"]) > 10 * abs(r[small]["ce_increase"])


def test_dead_latent_reports_no_contexts(model, tokens):
    sae = fitted_sae(model, tokens)
    b_enc = sae.b_enc.clone()
    b_enc[5] = -1e4  # its pre-activation is never positive
    r = effects(model, dataclasses.replace(sae, b_enc=b_enc), tokens, [5, 0])
    assert r[5] == {"n_contexts": 0}
    with pytest.raises(ValueError, match="out of range"):
        effects(model, sae, tokens, [sae.d_sae])


def test_matches_hand_computation_and_ignores_batching(model, tokens):
    sae = fitted_sae(model, tokens)
    latent = int(firing_counts(model, sae, tokens)[:64].argmax())
    got = effects(model, sae, tokens, [latent, 70, 3], max_contexts=3, batch_size=2)
    other = effects(model, sae, tokens, [latent, 70, 3], max_contexts=3, batch_size=16)
    assert got.keys() == other.keys()
    for i in got:
        assert got[i] == pytest.approx(other[i], rel=1e-5, abs=1e-8)

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
    ce = lambda lp: -lp[:, :-1].gather(-1, tok[:, 1:, None])[..., 0]  # noqa: E731
    d_ce = (ce(abl) - ce(base))[m[:, :-1]].mean().item()
    kl = (base.exp() * (base - abl)).sum(-1)[m].mean().item()
    r = got[latent]
    assert r["n_contexts"] == 3 and r["n_tokens"] == int(m[:, :-1].sum())
    assert r["ce_increase"] == pytest.approx(d_ce, rel=1e-4, abs=1e-6)
    assert r["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
