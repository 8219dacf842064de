import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vsae.config import SAEConfig
from vsae.variants import VariationalTopKSAE, build_sae, gaussian_kl, geometric_median


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(32, 20, generator=g, dtype=torch.float64) * 3
    logvar = torch.empty(32, 20, dtype=torch.float64).uniform_(-6, 2, generator=g)
    want = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1).mean()
    torch.testing.assert_close(gaussian_kl(mu, logvar), want)


def test_fixed_variance_kl_is_half_squared_norm():
    mu = torch.randn(16, 10).relu() * 4
    torch.testing.assert_close(gaussian_kl(mu, None), 0.5 * mu.clamp(max=10).pow(2).sum(-1).mean())
    torch.testing.assert_close(gaussian_kl(mu, torch.zeros_like(mu)), gaussian_kl(mu, None))


def test_sampling_is_random_in_training_and_deterministic_at_eval():
    cfg = SAEConfig(variant="vsae", d_sae=64, k=8, sample=True, variance="learned")
    sae = build_sae(cfg, 16, torch.Generator().manual_seed(0))
    x = torch.randn(10, 16)
    g = torch.Generator().manual_seed(1)
    a = sae.training_latents(sae.encoder_input(x), 0.5, g)
    b = sae.training_latents(sae.encoder_input(x), 0.5, g)
    assert not torch.equal(a.vals, b.vals)
    e1, e2 = sae.encode(x), sae.encode(x)
    assert torch.equal(e1.vals, e2.vals) and torch.equal(e1.idx, e2.idx)


def test_vsae_without_sampling_selects_like_topk():
    torch.manual_seed(0)
    vs = build_sae(SAEConfig(variant="vsae", d_sae=64, k=8), 16)
    x = torch.randn(10, 16)
    latents = vs.training_latents(vs.encoder_input(x), 1.0, None)
    code = vs.encode(x)
    torch.testing.assert_close(latents.vals.detach().sort(1).values, code.vals.sort(1).values)
    torch.testing.assert_close(latents.idx.sort(1).values, code.idx.sort(1).values)
    torch.testing.assert_close(latents.terms["kl"],
                               0.5 * vs.pre_activations(vs.encoder_input(x)).relu().pow(2).sum(-1).mean())


def test_kl_warmup_is_linear():
    vs = build_sae(SAEConfig(variant="vsae", d_sae=32, k=4, kl_warmup=0.1, kl_coef=2.0), 8)
    x = torch.randn(5, 8)
    full = vs.loss_terms(x, 1.0, None).terms["kl"]
    half = vs.loss_terms(x, 0.05, None).terms["kl"]
    torch.testing.assert_close(half, 0.5 * full)


@pytest.mark.parametrize("variant,pre_bias", [("topk", True), ("topk", False), ("vsae", True)])
def test_sparse_and_dense_paths_agree(variant, pre_bias):
    cfg = SAEConfig(variant=variant, d_sae=128, k=8, pre_bias=pre_bias, aux_k_coef=1 / 32)
    a = build_sae(cfg, 24, torch.Generator().manual_seed(0)).double()
    b = build_sae(cfg, 24, torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        a.b_dec.normal_()
        b.b_dec.copy_(a.b_dec)
    b.sparse = False
    x = torch.randn(40, 24, dtype=torch.float64)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[64:] = True
    for sae in (a, b):
        terms = sae.loss_terms(x, 0.5, dead).terms
        assert set(terms) >= {"mse", "auxk"}
        sum(terms.values()).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


@pytest.mark.parametrize("pre_bias", [True, False])
def test_export_folds_the_normalisation_scale(pre_bias):
    sae = build_sae(SAEConfig(d_sae=64, k=6, pre_bias=pre_bias), 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    scale = 7.5
    raw = torch.randn(20, 16) * scale
    w = sae.export(scale)
    torch.testing.assert_close(w.decode(w.encode(raw)), sae.reconstruct(raw / scale) * scale, rtol=1e-5, atol=1e-5)


def test_decoder_parallel_gradient_removed_and_rows_renormalised():
    sae = build_sae(SAEConfig(d_sae=32, k=4), 8)
    sae.W_dec.grad = torch.randn(32, 8)
    sae.before_step()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.after_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_free_decoder_starts_at_norm_point_one_and_is_left_alone():
    sae = build_sae(SAEConfig(variant="vsae", d_sae=32, k=4, decoder="free"), 8)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((32,), 0.1))
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.after_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((32,), 0.3))


def test_learned_variance_head_init():
    sae = build_sae(SAEConfig(variant="vsae", d_sae=32, k=4, variance="learned"), 8)
    assert isinstance(sae, VariationalTopKSAE)
    torch.testing.assert_close(sae.b_var, torch.full((32,), -2.0))
    lv = sae.log_variance(torch.randn(4, 8) * 100)
    assert lv.min() >= -6 and lv.max() <= 2


def test_geometric_median_resists_outliers():
    pts = torch.cat([torch.randn(200, 3) * 0.01 + 1.0, torch.full((20, 3), 1000.0)])
    assert (geometric_median(pts) - 1.0).abs().max() < 0.05
    assert pts.mean(0).min() > 50


@pytest.mark.parametrize("bad,match", [(dict(k=0), "k must be"), (dict(k=65), "k must be"),
                                       (dict(variant="nope"), "unknown variant"), (dict(decoder="x"), "decoder")])
def test_bad_sae_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        build_sae(SAEConfig(d_sae=64, **bad), 8)


def test_lr_schedule():
    from vsae.config import lr_at

    lrs = [lr_at(s, 1000, 1.0, 50, 0.8) for s in range(1000)]
    assert lrs[0] == pytest.approx(1 / 50) and lrs[49] == 1.0 and lrs[500] == 1.0
    assert lrs[900] == pytest.approx(0.5) and lrs[-1] == pytest.approx(1 / 200)
    assert all(math.isfinite(v) for v in lrs)
    # no warm-up asked for, or a run too short for one (vsae demo --train-steps 4): full lr from step 0
    assert [lr_at(s, 4, 1.0, 0, 0.8) for s in range(3)] == [1.0, 1.0, 1.0]
    assert lr_at(0, 1000, 1.0, 0, 0.8) == 1.0 and lr_at(0, 5, 1.0, 50, 0.8) == 1.0


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_auxk_over_a_candidate_superset_equals_auxk_over_the_dead(sparse):
    """The trainer passes every latent that may die before the next log step; the live ones among them must
    change neither the AuxK term nor its gradients (here 5 dead < k_aux 8, so live candidates get picked too)."""
    cfg = SAEConfig(d_sae=64, k=4, aux_k_coef=1 / 32, k_aux=8)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 9, 17, 40, 63]] = True
    grads = []
    for candidates in (None, dead.nonzero().squeeze(1), torch.arange(64), torch.arange(0, 64, 1).flip(0)):
        sae = build_sae(cfg, 16, torch.Generator().manual_seed(0)).double()
        sae.sparse = sparse
        terms = sae.loss_terms(x.double(), 0.5, dead, None, candidates).terms
        terms["auxk"].backward()
        grads.append((terms["auxk"].detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}))
    for value, g in grads[1:]:
        torch.testing.assert_close(value, grads[0][0])
        for n in g:
            torch.testing.assert_close(g[n], grads[0][1][n], msg=n)
    assert grads[0][0] > 0
    sae = build_sae(cfg, 16, torch.Generator().manual_seed(0))
    none_dead = sae.loss_terms(x, 0.5, torch.zeros(64, dtype=torch.bool), None, torch.arange(64)).terms
    assert none_dead["auxk"].item() == 0.0


def _auxk_reference(sae, x: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """AuxK written out densely (Gao et al. 2024, as SAELens's TopK SAE computes it, without its bias in the
    decode): the top k_aux dead pre-activations of each row, ReLU, decode, squared error to the residual over
    the residual's variance."""
    x_in = x - sae.b_dec
    pre = x_in @ sae.W_enc + sae.b_enc
    z = torch.zeros_like(pre).scatter(1, pre.detach().topk(sae.k, dim=1).indices, 1.0) * pre.relu()
    residual = (x - (z @ sae.W_dec + sae.b_dec)).detach()
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.detach().topk(k_aux, dim=1).indices
    aux = torch.zeros_like(pre).scatter(1, top, 1.0) * pre.relu() * dead  # where < k_aux are dead, only those
    variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    return (aux @ sae.W_dec - residual).pow(2).sum(-1).mean() / variance


@pytest.mark.parametrize("n_dead", [10, 4], ids=["more-dead-than-k_aux", "fewer"])
@pytest.mark.parametrize("sparse,n_cand", [(True, 12), (True, 64), (False, 12), (False, 64)],
                         ids=["sparse-candidates", "sparse-kernels", "dense-candidates", "dense-all"])
def test_auxk_and_its_gradients_equal_a_dense_reference(sparse, n_cand, n_dead, monkeypatch):
    """Both AuxK paths (dense products over the candidate columns; the sparse kernels once candidates are many)
    against the loss written out densely, and its gradients to every parameter."""
    import vsae.variants as variants

    monkeypatch.setattr(variants, "AUX_DENSE_MAX", 2)  # k_aux 6: 12 candidates -> dense, 64 -> sparse kernels
    cfg = SAEConfig(d_sae=64, k=4, aux_k_coef=1.0, k_aux=6)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 16, generator=g, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[2, 5, 11, 20, 33, 41, 47, 50, 58, 63][:n_dead]] = True
    live = (~dead).nonzero().squeeze(1)
    # 12 candidates: the dead and some live ones (the trainer's superset), in no particular order
    candidates = torch.cat([live[:12 - n_dead], dead.nonzero().squeeze(1)]).flip(0) if n_cand == 12 \
        else torch.arange(64)
    got, want = (build_sae(cfg, 16, torch.Generator().manual_seed(0)).double() for _ in range(2))
    with torch.no_grad():
        for sae in (got, want):
            sae.b_dec.copy_(torch.randn(16, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    got.sparse = sparse
    term = got.loss_terms(x, 0.5, dead, None, candidates).terms["auxk"]
    term.backward()
    ref = _auxk_reference(want, x, dead, 6)
    ref.backward()
    torch.testing.assert_close(term, ref)
    assert ref > 0.1
    for (name, a), b in zip(got.named_parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_selection_pre_equals_the_pre_activations_in_memory_shared_by_every_sae():
    """The TopK selection's pre-activations go into kept memory (no page faults per step), one block for all the
    SAEs of a pass, so a sweep's peak memory stays one selection's."""
    a, b = (build_sae(SAEConfig(d_sae=d, k=4), 16, torch.Generator().manual_seed(d)) for d in (96, 64))
    x = torch.randn(20, 16)
    pa = a.selection_pre(x)
    torch.testing.assert_close(pa, a.pre_activations(x), rtol=0, atol=0)
    pb = b.selection_pre(x)
    torch.testing.assert_close(pb, b.pre_activations(x), rtol=0, atol=0)
    assert pa.data_ptr() == pb.data_ptr() and not pa.requires_grad
