"""evals.independence: the noise floor of |rho| is subtracted (independent latents give an excess within 3 SE of 0
at two sample sizes while the raw mean |rho| shrinks like 1/sqrt(N)), planted correlated latents give a positive
excess whose interval excludes 0 and top the per-latent tail, co-firing lift finds planted co-firing, the
permutation null keeps each latent's values, every number agrees with a dense reference, and n_tokens is honoured."""

import math

import numpy as np
import pytest
import torch

from evals import independence
from evals.independence import DEFINITIONS, independence_stats


def sparse_latents(n_tok: int, n_lat: int, p: float, seed: int) -> torch.Tensor:
    """Independent latents: each fires with probability p, with an exponential magnitude."""
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n_tok, n_lat, generator=g) < p
    return on * torch.empty(n_tok, n_lat).exponential_(generator=g)


def random_decoder(d_sae: int, d_in: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(d_sae, d_in, generator=torch.Generator().manual_seed(seed))


def stats(z: torch.Tensor, **kw) -> dict:
    kw.setdefault("n_boot", 0)
    return independence_stats(z, random_decoder(z.shape[1]), **kw)


def dense_rho(z: torch.Tensor) -> np.ndarray:
    """Pearson rho of every pair of columns (population moments; np.corrcoef's normalisation cancels)."""
    return np.corrcoef(z.double().numpy(), rowvar=False)


@pytest.mark.parametrize("n_tok", [5_000, 40_000])
def test_independent_latents_excess_is_zero_while_raw_floor_is_not(n_tok):
    # 30 independent latents: 435 pairs whose true rho is 0; the raw mean |rho| is the noise floor E|N(0, 1/N)|.
    z = sparse_latents(40_000, 30, 0.1, seed=11)
    r = stats(z, n_tokens=n_tok, n_boot=200, seed=3)
    floor = math.sqrt(2 / math.pi) / math.sqrt(n_tok)
    assert r["n_tokens"] == n_tok and r["n_pairs"] == 435 and not r["sampled"]
    assert r["mean_abs_rho"] == pytest.approx(floor, rel=0.15)
    assert r["null_mean_abs_rho"] == pytest.approx(floor, rel=0.15)
    se = r["mean_abs_rho_excess_se"]
    assert 0 < se < 0.2 * floor
    assert abs(r["mean_abs_rho_excess"]) < 3 * se  # fails if the null is not subtracted: raw is > 5 SE
    assert r["mean_abs_rho"] > 5 * se
    lo, hi = r["intervals"]["mean_abs_rho_excess"]
    assert lo < 0 < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_raw_mean_abs_rho_shrinks_like_one_over_sqrt_n():
    z = sparse_latents(40_000, 30, 0.1, seed=12)
    small, large = (stats(z, n_tokens=n)["mean_abs_rho"] for n in (5_000, 40_000))
    assert small / large == pytest.approx(math.sqrt(8), rel=0.15)


def test_planted_correlated_pair_gives_excess_and_tops_the_tail():
    g = torch.Generator().manual_seed(5)
    z = sparse_latents(5_000, 20, 0.1, seed=13)
    z[:, 1] = (z[:, 0] * (1 + 0.2 * torch.randn(5_000, generator=g))).relu()  # fires with latent 0, noisy value
    r = stats(z, n_boot=200, seed=4)
    assert r["mean_abs_rho"] > r["null_mean_abs_rho"]
    lo, hi = r["intervals"]["mean_abs_rho_excess"]
    assert 0 < lo <= r["mean_abs_rho_excess"] <= hi
    # One pair of 190 with rho ~ 0.9 carries the excess: ~0.9 / 190 (minus its share of the noise floor).
    assert r["mean_abs_rho_excess"] == pytest.approx(dense_rho(z)[0, 1] / 190, rel=0.2)
    assert {tuple(t[:2]) for t in r["tail_top"][:2]} == {(0, 1), (1, 0)}
    assert r["tail_top"][0][2] == pytest.approx(dense_rho(z)[0, 1], abs=1e-5)
    assert r["max_abs_rho_p95"] > 0.5 > r["null_max_abs_rho_p95"]
    assert r["frac_latents_above_null_p95"] >= 2 / 20
    assert r["frac_abs_rho_above"] == pytest.approx(1 / 190) and r["null_frac_abs_rho_above"] == 0.0


def test_tail_and_pair_rho_match_a_dense_reference(monkeypatch):
    monkeypatch.setattr(independence, "_BLOCK_ENTRIES", 7 * 25)  # blocks of 7 latents: several blocks
    z = sparse_latents(2_000, 25, 0.2, seed=14)
    z[:, 3] = (z[:, 3] + 0.7 * z[:, 9]).relu()
    rho = dense_rho(z)
    np.fill_diagonal(rho, 0.0)
    codes = independence._Codes.of(independence._to_csr(z))
    best, partner, signed = independence._max_abs_rho(codes)
    np.testing.assert_allclose(best, np.abs(rho).max(axis=1), atol=1e-9)
    assert partner.tolist() == np.abs(rho).argmax(axis=1).tolist()
    np.testing.assert_allclose(signed, rho[np.arange(25), partner], atol=1e-9)

    i, j = torch.triu_indices(25, 25, offset=1)
    arm = independence._PairMoments.of(codes, i, j)
    np.testing.assert_allclose(arm.rho(np.ones((1, 2_000)))[:, 0].numpy(), rho[i, j], atol=1e-5)
    # Integer row weights are the same as repeating rows: the bootstrap's rho is the rho of the resampled data.
    w = np.random.default_rng(0).multinomial(2_000, np.full(2_000, 1 / 2_000), size=3).astype(np.float64)
    for b in range(3):
        resampled = dense_rho(z[torch.from_numpy(np.repeat(np.arange(2_000), w[b].astype(int)))])
        np.testing.assert_allclose(arm.rho(w)[:, b].numpy(), resampled[i, j], atol=1e-5)


def test_lift_counts_planted_co_firing_and_matches_a_dense_reference():
    z = sparse_latents(4_000, 12, 0.15, seed=15)
    z[:, 1] = torch.where(z[:, 0] > 0, z[:, 0] + 1.0, torch.zeros(()))  # 1 fires exactly where 0 fires
    z[:, 2] = torch.where(z[:, 0] > 0, torch.zeros(()), z[:, 2])  # 2 never fires with 0
    r = stats(z, min_support=20.0)
    fires = (z != 0).double().numpy()
    p = fires.mean(axis=0)
    observed, expected = fires.T @ fires, 4_000 * np.outer(p, p)
    i, j = np.triu_indices(12, k=1)
    keep = expected[i, j] >= 20.0
    o, e = observed[i, j][keep], expected[i, j][keep]
    assert r["n_supported_pairs"] == keep.sum() > 0
    assert r["mean_log2_lift"] == pytest.approx(np.log2((o + 0.5) / (e + 0.5)).mean())
    assert r["frac_lift_above_2"] == pytest.approx((o > 2 * e).mean())
    assert r["frac_lift_below_half"] == pytest.approx((o < 0.5 * e).mean())
    assert r["frac_lift_above_2"] >= 1 / keep.sum()  # the pair (0, 1): lift 1 / p_0 ~ 6.7
    assert r["frac_lift_below_half"] >= 1 / keep.sum()  # the pair (0, 2): lift 0
    assert r["null_frac_lift_above_2"] == 0.0 and r["null_frac_lift_below_half"] == 0.0
    assert abs(r["null_mean_log2_lift"]) < 0.05


def test_permutation_null_keeps_each_latents_values_and_breaks_dependence():
    z = sparse_latents(3_000, 6, 0.3, seed=16)
    z[:, 5] = z[:, 4]  # identical columns: rho 1
    csr = independence._to_csr(z)
    null = independence._permute_columns(csr, seed=1)
    dense_null = torch.from_numpy(null.toarray())
    for c in range(6):
        assert torch.equal(dense_null[:, c].sort().values, z[:, c].double().sort().values)
    assert abs(dense_rho(dense_null)[4, 5]) < 0.1
    assert (independence._permute_columns(csr, seed=1) != null).nnz == 0  # seeded
    assert (independence._permute_columns(csr, seed=2) != null).nnz > 0


def test_planted_block_and_decoder_and_jaccard_as_before():
    g = torch.Generator().manual_seed(1)
    base = sparse_latents(4_000, 1, 0.1, seed=0)
    copies = (base * (1 + 0.1 * torch.randn(4_000, 6, generator=g))).relu()  # six noisy copies of one latent
    r = stats(copies)
    assert r["n_pairs"] == 15 and not r["sampled"] and r["n_alive"] == 6
    assert r["mean_abs_rho"] > 0.9 and r["frac_abs_rho_above"] == 1.0 and r["cofiring_jaccard"] > 0.95
    z = torch.cat([copies, sparse_latents(4_000, 40, 0.1, seed=2)], dim=1)
    assert stats(z)["frac_abs_rho_above"] == pytest.approx(15 / 1035, abs=1e-9)

    W_dec = random_decoder(20)
    z = sparse_latents(500, 20, 0.2, seed=4)
    assert independence_stats(z, W_dec, n_boot=0)["mean_max_decoder_cos"] < 0.7  # random 64-d directions
    W_dup = torch.cat([W_dec[:10], -3.0 * W_dec[:10]])  # each row has an (anti-parallel, rescaled) twin
    assert independence_stats(z, W_dup, n_boot=0)["mean_max_decoder_cos"] == pytest.approx(1.0, abs=1e-6)


def test_dead_and_constant_latents_are_left_out():
    z = sparse_latents(5_000, 50, 0.05, seed=3)
    z[:, 7] = 0  # dead
    z[:, 8] = 1.5  # fires everywhere with one value: alive, but rho is undefined
    r = stats(z, top_k=10)
    assert r["n_alive"] == 49 and r["n_constant"] == 1 and r["n_pairs"] == 48 * 47 // 2
    assert r["tail_partners"] == 47 and r["frac_abs_rho_above"] == 0.0
    assert all(7 not in t[:2] and 8 not in t[:2] for t in r["tail_top"])
    assert len(r["top_k_latents"]) == 10 and 7 not in r["top_k_latents"]


def test_sampled_pairs_estimate_all_pairs_and_are_seeded():
    z = sparse_latents(3_000, 80, 0.05, seed=5)
    z[:, 40:] = (z[:, :40] * 0.5 + z[:, 40:]).relu()  # 40 planted correlated pairs (i, i + 40)
    full = stats(z)
    sampled = stats(z, max_pairs=1000, seed=7, n_boot=100)
    assert not full["sampled"] and sampled["sampled"] and sampled["n_pairs"] == 1000
    assert sampled["mean_abs_rho"] == pytest.approx(full["mean_abs_rho"], rel=0.15)
    lo, hi = sampled["intervals"]["mean_abs_rho_excess"]
    assert lo < full["mean_abs_rho_excess"] < hi  # the two-way bootstrap covers the all-pairs value
    assert stats(z, max_pairs=1000, seed=7, n_boot=100) == sampled


def test_n_tokens_takes_the_first_rows_and_refuses_too_few():
    z = sparse_latents(1_000, 10, 0.2, seed=6)
    assert stats(z, n_tokens=600) == stats(z[:600])
    with pytest.raises(ValueError, match=r"n_tokens=2000.*z has 1000"):
        stats(z, n_tokens=2_000)


def test_every_key_is_defined():
    r = stats(sparse_latents(1_000, 10, 0.2, seed=8), n_boot=20)
    assert set(r) <= set(DEFINITIONS), set(r) - set(DEFINITIONS)
    assert set(r["intervals"]) == {"mean_abs_rho_excess"}
    assert stats(sparse_latents(1_000, 10, 0.2, seed=8))["intervals"] == {}  # n_boot=0: no interval


def test_bootstrap_is_paired_trained_minus_null():
    # The same arm as trained and null: every replicate's difference is exactly 0, so a bootstrap that dropped
    # the null arm, added it, or resampled the two arms differently would show a spread here.
    z = sparse_latents(2_000, 15, 0.2, seed=17)
    codes = independence._Codes.of(independence._to_csr(z))
    i, j = torch.triu_indices(15, 15, offset=1)
    arm = independence._PairMoments.of(codes, i, j)
    for sampled in (False, True):
        r = independence._bootstrap_excess([arm, arm], 0.0, sampled, n_boot=50, seed=0)
        assert r["mean_abs_rho_excess_se"] == 0.0 and r["intervals"]["mean_abs_rho_excess"] == [0.0, 0.0]
    other = independence._PairMoments.of(independence._Codes.of(independence._permute_columns(codes.z, 0)), i, j)
    assert independence._bootstrap_excess([arm, other], 0.0, True, n_boot=50, seed=0)["mean_abs_rho_excess_se"] > 0
