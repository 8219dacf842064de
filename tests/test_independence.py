"""evals.independence: planted correlated latents are found, independent ones are not, duplicated decoder rows
give max |cos| 1, sampled pairs estimate the all-pairs answer, and the sparse and dense co-moment paths agree."""

import pytest
import torch

from evals import independence
from evals.independence import independence_stats


def sparse_latents(n_tok: int, n_lat: int, p: float, seed: int) -> torch.Tensor:
    """Independent latents: each fires with probability p, with an exponential magnitude."""
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n_tok, n_lat, generator=g) < p
    return on * torch.empty(n_tok, n_lat).exponential_(generator=g)


def random_decoder(d_sae: int, d_in: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(d_sae, d_in, generator=torch.Generator().manual_seed(seed))


def test_planted_correlated_latents_are_detected():
    g = torch.Generator().manual_seed(1)
    base = sparse_latents(4000, 1, 0.1, seed=0)
    # Six noisy copies of one latent: they fire together, with magnitudes perturbed by 10%.
    copies = (base * (1 + 0.1 * torch.randn(4000, 6, generator=g))).relu()
    r = independence_stats(copies, random_decoder(6))
    assert r["n_pairs"] == 15 and not r["sampled"] and r["n_alive"] == 6
    assert r["mean_abs_rho"] > 0.9
    assert r["frac_abs_rho_above"] == 1.0
    assert r["cofiring_jaccard"] > 0.95

    # Mixed into 40 independent latents, the planted block still shows (15 of 1035 pairs are correlated).
    z = torch.cat([copies, sparse_latents(4000, 40, 0.1, seed=2)], dim=1)
    r = independence_stats(z, random_decoder(46))
    assert r["frac_abs_rho_above"] == pytest.approx(15 / 1035, abs=1e-9)


def test_independent_latents_are_uncorrelated():
    z = sparse_latents(5000, 50, 0.05, seed=3)
    z[:, 7] = 0  # dead: left out of every statistic
    r = independence_stats(z, random_decoder(50), top_k=10)
    assert r["n_alive"] == 49 and r["n_pairs"] == 49 * 48 // 2
    assert r["mean_abs_rho"] < 0.03  # ~ E|N(0, 1/5000)| = 0.011
    assert r["frac_abs_rho_above"] == 0.0
    assert r["cofiring_jaccard"] < 0.05  # independent p = 0.05: Jaccard ~ p^2 / (2p - p^2) = 0.026
    assert len(r["top_k_latents"]) == 10 and 7 not in r["top_k_latents"]


def test_duplicated_decoder_rows_give_max_cos_one():
    W_dec = random_decoder(20)
    z = sparse_latents(500, 20, 0.2, seed=4)
    r = independence_stats(z, W_dec)
    assert r["mean_max_decoder_cos"] < 0.7  # random 64-d directions
    W_dup = torch.cat([W_dec[:10], -3.0 * W_dec[:10]])  # each row has an (anti-parallel, rescaled) twin
    assert independence_stats(z, W_dup)["mean_max_decoder_cos"] == pytest.approx(1.0, abs=1e-6)


def test_sampled_pairs_estimate_all_pairs():
    z = sparse_latents(3000, 80, 0.05, seed=5)
    z[:, 40:] = (z[:, :40] * 0.5 + z[:, 40:]).relu()  # 40 planted correlated pairs (i, i + 40)
    W_dec = random_decoder(80)
    full = independence_stats(z, W_dec)
    sampled = independence_stats(z, W_dec, max_pairs=1000, seed=7)
    assert not full["sampled"] and sampled["sampled"]
    assert sampled["n_pairs"] == 1000
    assert sampled["mean_abs_rho"] == pytest.approx(full["mean_abs_rho"], rel=0.15)
    assert independence_stats(z, W_dec, max_pairs=1000, seed=7) == sampled  # seeded


@pytest.mark.parametrize("block_entries", [1 << 25, 64 * 10])  # one block; blocks of 10 latents
def test_sparse_and_dense_co_moments_agree(monkeypatch, block_entries):
    monkeypatch.setattr(independence, "_BLOCK_ENTRIES", block_entries)
    sparse = sparse_latents(300, 64, 0.05, seed=6)  # few nonzeros per row: the scatter path
    sparse[5] = 0.0  # a row with no nonzeros at all
    dense = torch.randn(300, 64, generator=torch.Generator().manual_seed(6)).relu()  # many: the matmul path
    i, j = torch.triu_indices(64, 64, offset=1)
    for z, is_sparse in ((sparse, True), (dense, False)):
        acts = independence._Activations(z)
        assert acts.sparse == is_sparse
        z64 = z.double()
        torch.testing.assert_close(acts.co_moments(i, j), (z64.T @ z64)[i, j])
        torch.testing.assert_close(acts.sums, z64.sum(0))
        torch.testing.assert_close(acts.sq_sums, z64.square().sum(0))
        assert acts.counts.tolist() == (z != 0).sum(0).tolist()


def test_constant_latent_is_left_out():
    z = sparse_latents(1000, 5, 0.3, seed=8)
    z[:, 2] = 1.5  # fires everywhere with one value: alive, but rho is undefined
    r = independence_stats(z, random_decoder(5))
    assert r["n_alive"] == 5 and r["n_constant"] == 1 and r["n_pairs"] == 6
