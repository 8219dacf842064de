"""t-SNE maps on planted latents: shapes, the density filter, seeding, separation, figures, joint maps, small n."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evals.figures import write_figure
from evals.tsne import activation_tsne, decoder_tsne, joint_decoder_tsne, perplexity_for

N_TOKENS = 1000


def planted_codes(seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(z [1000, 60], qualifying ids, their mean activations): latents 0-29 fire on 5% of tokens (qualify),
    30-39 on exactly 1% (not > 1%), 40-49 on 0.5%, 50-59 never."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(N_TOKENS, 60)
    for i, n_fire in [(i, 50) for i in range(30)] + [(i, 10) for i in range(30, 40)] + [(i, 5) for i in range(40, 50)]:
        rows = torch.randperm(N_TOKENS, generator=g)[:n_fire]
        z[rows, i] = 1.0 + torch.rand(n_fire, generator=g) * (i % 3)
    qualifying = np.arange(30)
    mean_act = (z[:, :30].sum(0) / 50).double().numpy()
    return z, qualifying, mean_act


def two_groups(n_per: int = 50, d_in: int = 32, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Decoder rows [2 n_per, d_in] scattered (noise 0.3) around two orthogonal directions; group label per row."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(d_in)[:2] * 3.0
    w = torch.cat([centres[k] + 0.3 * torch.randn(n_per, d_in, generator=g) for k in range(2)])
    return w, np.repeat([0, 1], n_per)


@pytest.fixture(scope="module")
def activation_map():
    z, qualifying, mean_act = planted_codes()
    return activation_tsne(z), qualifying, mean_act


@pytest.fixture(scope="module")
def decoder_map():
    w, groups = two_groups()
    density = torch.full((w.shape[0],), 0.01)
    return decoder_tsne(w, torch.ones(w.shape[0], dtype=torch.bool), density), groups


def test_activation_map_filter_shapes_and_colours(activation_map):
    m, qualifying, mean_act = activation_map
    np.testing.assert_array_equal(m.latent_ids, qualifying)  # 1% exactly is not "> 1%"
    assert m.coords.shape == (30, 2) and m.coords.dtype == np.float32 and m.n == 30
    assert set(m.colors) == {"cluster", "usage_rate", "mean_activation"}
    np.testing.assert_allclose(m.colors["usage_rate"], 0.05)
    np.testing.assert_allclose(m.colors["mean_activation"], mean_act, rtol=1e-5)
    assert m.settings["n_clusters"] == 3 and set(m.colors["cluster"]) == {0, 1, 2}  # min(10, max(2, 30 // 10))
    assert m.settings["perplexity"] == perplexity_for(30) == 9 and m.settings["metric"] == "euclidean"
    assert m.settings["pca_dims"] is None  # 30 latents < 50 dims: nothing to reduce
    saved = json.loads(json.dumps(m.to_json()))
    assert len(saved["coords"]) == 30 and saved["settings"]["seed"] == 42


def test_activation_map_pca_reduces_long_profiles():
    g = torch.Generator().manual_seed(1)
    z = torch.relu(torch.randn(400, 80, generator=g) - 1.5)  # 80 latents x 400-token profiles > 50 dims
    m = activation_tsne(z, pca_dims=50)
    assert m.n == 80 and m.settings["pca_dims"] == 50


def test_decoder_map_seeded_and_separates_planted_groups(decoder_map):
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    m, groups = decoder_map
    assert m.coords.shape == (100, 2) and m.settings["metric"] == "cosine"
    np.testing.assert_allclose(m.colors["log10_density"], -2.0)
    # Every point's nearest map neighbour is from its own planted group, and 2-means recovers the groups.
    d = np.linalg.norm(m.coords[:, None] - m.coords[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (groups[d.argmin(1)] == groups).all()
    labels = KMeans(2, random_state=0, n_init=10).fit_predict(m.coords)
    assert adjusted_rand_score(groups, labels) == 1.0

    w, _ = two_groups()
    again = decoder_tsne(w, torch.ones(100, dtype=torch.bool), torch.full((100,), 0.01), seed=42)
    np.testing.assert_array_equal(again.coords, m.coords)


def test_figures_hover_text(activation_map, decoder_map, tmp_path):
    m, _, _ = activation_map
    html = write_figure(m.figure("activation map"), tmp_path / "act.html").read_text()
    for text in ("activation map", "latent %{customdata[0]}", "usage_rate %{customdata", "mean_activation",
                 "cluster %{customdata"):
        assert text in html
    html = write_figure(decoder_map[0].figure("decoder map"), tmp_path / "dec.html").read_text()
    assert "log10_density %{customdata[1]:.4g}" in html and "latent %{customdata[0]}" in html


def test_joint_map_labels_points_by_run(tmp_path):
    w, _ = two_groups()
    alive_b = torch.arange(100) % 2 == 0
    m = joint_decoder_tsne({"topk": (w, torch.ones(100, dtype=torch.bool)), "vsae": (w.flip(1), alive_b)})
    assert m.n == 150 and m.coords.shape == (150, 2)
    assert list(m.runs) == ["topk"] * 100 + ["vsae"] * 50
    np.testing.assert_array_equal(m.latent_ids[100:], np.arange(0, 100, 2))
    html = write_figure(m.figure("joint"), tmp_path / "joint.html").read_text()
    assert "run %{customdata[1]}" in html and "run vsae" in html
    assert json.loads(json.dumps(m.to_json()))["runs"][-1] == "vsae"

    with pytest.raises(ValueError, match="100.*64|64.*100"):
        joint_decoder_tsne({"a": (w, torch.ones(100, dtype=bool)), "b": (w[:64], torch.ones(64, dtype=bool))})


def test_too_few_latents(tmp_path):
    z, _, _ = planted_codes()
    m = activation_tsne(z[:, 26:60])  # only 4 latents qualify
    assert m.n == 0 and m.coords.shape == (0, 2) and m.latent_ids.shape == (0,)
    assert "too few latents" in write_figure(m.figure(), tmp_path / "empty.html").read_text()
    assert json.loads(json.dumps(m.to_json()))["coords"] == []

    small = activation_tsne(z[:, 25:60])  # 5 latents: perplexity lowered to (5 - 1) // 3 = 1
    assert small.n == 5 and small.settings["perplexity"] == 1
