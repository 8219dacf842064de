"""Dashboards: the one-pass gathering against brute force, the weight-derived quantities, escaping, the pages and
the compare page, on tiny caches built in code."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from activations.cache import MANIFEST, open_shards, read_manifest, write_array_cache, write_json_atomic
from activations.loader import ActivationLoader
from dashboards.build import DashboardConfig, DashboardError, build_dashboard, gather, parse_features
from dashboards.compare import CompareConfig, compare_runs
from dashboards.gather import GatherConfig, Gatherer, quantile_bands, select_firings
from dashboards.html import display_token, esc, script_json
from dashboards.weights import best_matches, decoder_neighbours, logit_effects
from tests.test_harvest import HOOK
from tests.test_harvest import run as harvest
from vsae.checkpoint import SAEWeights, write_sae

# Model text that must render as text: markup, an entity, quotes, C0/C1 controls, a bidi override, a line separator.
HOSTILE = ("Tom said \"hi\" & left <script>alert(1)</script> it's <b>bold</b> &amp; "
           "\x07bell \x1b[31mred\x7f\rcr\n\ttab \u202eevil\u202c \u2028end. ")  # (CRLF is normalised)
HOSTILE_RUN_NAME = "run<&\"'>"


def random_sae(d_in: int, d_sae: int, k: int, seed: int = 0, dead: tuple[int, ...] = ()) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    b_enc = torch.zeros(d_sae)
    b_enc[list(dead)] = -1e6  # these latents never fire
    return SAEWeights(W_enc=W_dec.T.contiguous(), b_enc=b_enc, W_dec=W_dec, b_dec=torch.zeros(d_in), k=k,
                      apply_b_dec_to_input=True)


def save_run(path: Path, sae: SAEWeights, hook: str, model: str = "tiny") -> Path:
    path.mkdir(parents=True)
    write_sae(path, sae, {"model_name": model, "hook_name": hook, "context_size": 32, "dataset_path": "x"})
    return path


def synthetic(tmp: Path, n_seq: int = 24, ctx: int = 13, d_in: int = 8, seed: int = 0) -> Path:
    """A cache whose rows grow in scale along the cache, so histogram ranges must double mid-pass."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n_seq * (ctx - 1), d_in)).astype(np.float32)
    rows *= np.linspace(0.2, 3.0, rows.shape[0], dtype=np.float32)[:, None]
    write_array_cache(tmp, rows, ctx, {"kind": "synthetic", "name": "test"}, shard_tokens=5 * (ctx - 1))
    return tmp


def dense_codes(sae: SAEWeights, cache: Path, batch_rows: int) -> np.ndarray:
    """Brute force: `sae.encode` of every cache row, batch by batch as the pass reads them ([n_rows, d_sae])."""
    _, acts, _ = open_shards(cache)
    x = torch.from_numpy(np.concatenate(acts)).float()
    return torch.cat([sae.encode(x[i : i + batch_rows]) for i in range(0, x.shape[0], batch_rows)]).numpy()


# ---- gathering ------------------------------------------------------------------------------------------------


def test_gather_matches_brute_force(tmp_path):
    cache = synthetic(tmp_path / "c")
    R, d_sae = 12, 20
    sae = random_sae(8, d_sae, 3, dead=(7,))
    cfg = DashboardConfig(cache=str(cache), out="", contexts=4, batch_size=3 * R, progress=False)
    stats, n_rows = gather(sae, str(cache), R, torch.arange(d_sae), cfg)
    z = dense_codes(sae, cache, 3 * R)
    assert n_rows == z.shape[0] == stats.n_tokens == 24 * R
    W = stats.window
    assert W == min(24 + 1 + 8, R)
    for j in range(d_sae):
        col = z[:, j]
        fired = col[col > 0]
        assert stats.count[j] == fired.size
        assert stats.act_sum[j] == pytest.approx(fired.sum(dtype=np.float64), rel=1e-6)
        assert stats.act_max[j] == pytest.approx(fired.max() if fired.size else 0.0)
        # top contexts: the 4 sequences with the highest max, each at its argmax, window = a slice of the column
        seq_max = col.reshape(-1, R).max(1)
        want = np.argsort(-seq_max, kind="stable")[:4]
        want = want[seq_max[want] > 0]
        got_rows = stats.top_row[j][stats.top_row[j] >= 0].numpy()
        assert list(got_rows // R) == list(want)
        assert list(got_rows) == [s * R + int(np.argmax(col[s * R : (s + 1) * R])) for s in want]
        np.testing.assert_allclose(stats.top_value[j][: len(want)].numpy(), seq_max[want], rtol=1e-6)
        for row, start, win in zip(got_rows, stats.top_start[j].numpy(), stats.top_window[j].numpy(), strict=False):
            s0 = row - row % R
            assert start == s0 + min(max(row - s0 - 24, 0), R - W)
            np.testing.assert_allclose(win, col[start : start + W], rtol=1e-6)
        # uniform sample: genuine, distinct firings; every firing when there are fewer than the reservoir
        kept = stats.sample_row[j] >= 0
        rows = stats.sample_row[j][kept].numpy()
        assert len(rows) == min(fired.size, stats.sample_row.shape[1]) and len(set(rows)) == len(rows)
        np.testing.assert_allclose(stats.sample_value[j][kept].numpy(), col[rows], rtol=1e-6)
        for row, start, win in zip(rows, stats.sample_start[j][kept].numpy(), stats.sample_window[j][kept].numpy(),
                                   strict=True):
            assert start <= row < start + W
            np.testing.assert_allclose(win, col[start : start + W], rtol=1e-6)
        # histogram: exact counts over [0, 2^e) with max < 2^e <= 2 max
        if fired.size:
            top = float(stats.hist_top[j])
            assert top / 2 <= fired.max() < top and np.log2(top) == round(np.log2(top))
            counts, _ = np.histogram(fired, bins=np.linspace(0, top, stats.hist_counts.shape[1] + 1))
            np.testing.assert_array_equal(stats.hist_counts[j].numpy(), counts)
        else:
            assert stats.hist_top[j] == 0 and stats.hist_counts[j].sum() == 0
    assert bool(stats.dead[7]) and stats.dead.sum() == 1


def test_subset_gathers_the_same_numbers(tmp_path):
    cache = synthetic(tmp_path / "c")
    sae = random_sae(8, 20, 3)
    cfg = DashboardConfig(cache=str(cache), out="", contexts=3, batch_size=24, progress=False)
    full, _ = gather(sae, str(cache), 12, torch.arange(20), cfg)
    part, _ = gather(sae, str(cache), 12, torch.tensor([2, 5, 19]), cfg)
    sub = full.take(torch.tensor([2, 5, 19]))
    for name in ("count", "act_max", "hist_counts", "hist_top", "top_row", "top_window", "sample_row"):
        torch.testing.assert_close(getattr(part, name), getattr(sub, name))


def test_uniform_sample_keeps_replacing_and_is_seeded():
    """A latent firing on every row: the kept sample spans the whole pass, not the first batches."""
    R, n_batches = 10, 50
    g = Gatherer(torch.arange(1), R, GatherConfig(n_reservoir=40, seed=3))
    for b in range(n_batches):
        rows = torch.arange(4 * R)
        g.update(rows, torch.zeros_like(rows), torch.rand(4 * R) + 0.1, 4 * R, b * 4 * R)
    got = g.result().sample_row[0].numpy()
    assert len(set(got)) == 40 and got.min() >= 0
    n = n_batches * 4 * R
    assert got.max() > 0.8 * n and got.min() < 0.2 * n and 0.3 * n < got.mean() < 0.7 * n
    assert sorted(got) == sorted(_resample(R, n_batches, seed=3))


def _resample(R, n_batches, seed):
    torch.manual_seed(0)  # values differ from the first run; the seeded priorities alone choose the rows
    g = Gatherer(torch.arange(1), R, GatherConfig(n_reservoir=40, seed=seed))
    for b in range(n_batches):
        rows = torch.arange(4 * R)
        g.update(rows, torch.zeros_like(rows), torch.rand(4 * R) + 0.1, 4 * R, b * 4 * R)
    return g.result().sample_row[0].numpy()


def test_batches_must_hold_whole_sequences():
    g = Gatherer(torch.arange(2), 10)
    with pytest.raises(ValueError, match="whole sequences"):
        g.update(torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]), 15, 0)


def test_select_firings_maps_latents_to_positions():
    vals = torch.tensor([[2.0, 0.0, 1.0], [3.0, 4.0, 0.5]])
    idx = torch.tensor([[5, 1, 2], [2, 5, 0]])
    position = torch.full((6,), -1)
    position[torch.tensor([2, 5])] = torch.tensor([0, 1])
    rows, lat, v = select_firings(vals, idx, position)
    assert rows.tolist() == [0, 0, 1, 1] and lat.tolist() == [1, 0, 0, 1] and v.tolist() == [2.0, 1.0, 3.0, 4.0]


def test_quantile_bands_split_the_sample_by_value():
    values = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0, 8.0, 6.0, 0.5])
    bands = quantile_bands(values, 5)
    assert [sorted(values[b].tolist()) for b in bands] == [[0.5, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]
    assert all(list(b) == sorted(b) for b in bands)  # each band in the sample's (random) order
    assert [len(b) for b in quantile_bands(values[:3], 5)] == [1, 1, 1, 0, 0]


# ---- weights ----------------------------------------------------------------------------------------------------


def test_logit_effects_against_brute_force():
    g = torch.Generator().manual_seed(1)
    W_dec, W_U, ln = torch.randn(7, 6, generator=g), torch.randn(6, 30, generator=g), torch.rand(6, generator=g) + 0.5
    top_v, top_i, bot_v, bot_i = logit_effects(W_dec, W_U, ln, n=4, chunk=3)
    full = (W_dec * ln) @ W_U
    for i in range(7):
        order = torch.argsort(full[i], descending=True)
        assert top_i[i].tolist() == order[:4].tolist() and bot_i[i].tolist() == order.flip(0)[:4].tolist()
        torch.testing.assert_close(top_v[i], full[i][order[:4]])
        torch.testing.assert_close(bot_v[i], full[i][order.flip(0)[:4]])
    torch.testing.assert_close(logit_effects(W_dec, W_U, None, n=2)[0], (W_dec @ W_U).topk(2).values)


def test_decoder_neighbours_and_best_matches_against_brute_force():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(12, 5, generator=g) * torch.rand(12, 1, generator=g)  # unequal norms: cosine, not dot
    cos, ids = decoder_neighbours(W, torch.tensor([0, 4, 11]), n=3, chunk=2)
    unit = W / W.norm(dim=1, keepdim=True)
    full = unit @ unit.T
    for p, i in enumerate([0, 4, 11]):
        others = [j for j in torch.argsort(full[i], descending=True).tolist() if j != i]
        assert ids[p].tolist() == others[:3]
        torch.testing.assert_close(cos[p], full[i, others[:3]])
    B = torch.randn(9, 5, generator=g)
    best, which = best_matches(W, B, chunk=5)
    ub = B / B.norm(dim=1, keepdim=True)
    torch.testing.assert_close(best, (unit @ ub.T).max(1).values)
    assert which.tolist() == (unit @ ub.T).argmax(1).tolist()


# ---- escaping ---------------------------------------------------------------------------------------------------


def test_display_token_and_script_json():
    assert display_token("a\nb\tc\rd\x00\x07\x1b\x7f\x85") == "a\u21b5b\u21e5c\u240dd\u2400\u2407\u241b\u2421\\x85"
    assert display_token("x\u202ey\u200bz") == "x\\u202ey\\u200bz"
    assert display_token("<b>&\"'") == "<b>&\"'"  # markup stays as it is: the page inserts it as text
    s = script_json({"t": "</script><script>alert(1)</script>&\u2028", "n": float("nan")})
    assert "<" not in s and ">" not in s and "&" not in s and "\u2028" not in s
    assert json.loads(s) == {"t": "</script><script>alert(1)</script>&\u2028", "n": None}
    assert esc(HOSTILE_RUN_NAME) == "run&lt;&amp;&quot;&#x27;&gt;"


def test_parse_features():
    assert parse_features("all", 10)[0].tolist() == list(range(10))
    assert parse_features("3", 10)[0].tolist() == [0, 1, 2]
    assert parse_features("7, 2,7", 10)[0].tolist() == [2, 7]
    ids, top = parse_features("top-density:4", 10)
    assert ids.numel() == 10 and top == 4
    assert parse_features("11", 10)[0].numel() == 10
    for bad in ("0", "1,x", "top-density:0", "0,10", "", "-1"):
        with pytest.raises(ValueError):
            parse_features(bad, 10)


# ---- pages from a harvested cache of hostile text ----------------------------------------------------------------


def hostile_cache(tmp: Path, checkpoint: Path) -> Path:
    corpus = tmp / "hostile"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"Document {i}: " + HOSTILE * 6)
    harvest(tmp / "cache", checkpoint, corpus, tokens=1200)
    return tmp / "cache"


def fake_eval(run: Path, d_sae: int) -> None:
    """An eval.json in `vsae eval`'s layout, with a t-SNE coordinates file."""
    (run / "figures").mkdir()
    ids = list(range(0, d_sae, 2))
    tsne = {"coords": [[float(i), float(i % 5)] for i in ids], "latent_ids": ids,
            "colors": {"log10_density": [-2.0] * len(ids)}, "settings": {"kind": "decoder"}}
    (run / "figures" / "tsne_decoder.json").write_text(json.dumps(tsne))
    (run / "figures" / "tsne_decoder.html").write_text("<html></html>")
    doc = {"cache_hash": "x", "metrics": {
        "core": {"l0": 4.0, "explained_variance": 0.5, "ce_score": float("nan")},
        "density": {"dead_fraction": 0.25, "n_tokens": 1000,
                    "log10_density_histogram": {"edges": [-3.0, -2.0, -1.0, 0.0], "counts": [1, 2, 3], "n_dead": 2}},
        "ablation": {"latents": {"1": {"ce_increase": 0.125, "kl": 0.5, "n_contexts": 3}}},
        "scr": {"metrics": {"scr_metric_threshold_2": 0.1, "scr_metric_threshold_5": 0.2}, "scr_metric_mean": 0.15,
                "n_values": [2, 5], "accuracy": {"target": 0.9}, "n_selected": {"target": {"2": 2}}},
        "tsne": {"decoder": {"n_points": len(ids), "figure": "figures/tsne_decoder.html",
                             "coordinates": "figures/tsne_decoder.json"}}}}
    (run / "eval.json").write_text(json.dumps(doc))


def load_data(path: Path) -> dict:
    text = path.read_text()
    m = re.fullmatch(r"VSAE\.\w+\((.*)\);\n", text, re.S)
    assert m, path
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, tiny_checkpoint):
    """A dashboard of a random SAE (latent 3 dead) on a harvested cache of hostile text, with an eval.json."""
    tmp = tmp_path_factory.mktemp("dash")
    cache = hostile_cache(tmp, tiny_checkpoint)
    run = save_run(tmp / "runs" / HOSTILE_RUN_NAME, random_sae(32, 24, 4, dead=(3,)), HOOK, model=tiny_checkpoint.name)
    fake_eval(run, 24)
    out = tmp / "dash"
    summary = build_dashboard(run, DashboardConfig(cache=str(cache), out=str(out), contexts=5, progress=False))
    return {"out": out, "run": run, "cache": cache, "summary": summary, "model": tiny_checkpoint.name}


def test_dashboard_files_and_escaping(dashboard):
    out = dashboard["out"]
    assert dashboard["summary"]["latents"] == 24 and dashboard["summary"]["dead"] == 1
    assert (out / "assets" / "plotly.min.js").stat().st_size > 1_000_000
    assert sorted(p.name for p in (out / "data" / "latents").iterdir()) == sorted(f"{i}.js" for i in range(24))
    for path in out.rglob("*"):
        if path.suffix in (".html", ".js") and path.name != "plotly.min.js":
            text = path.read_text()
            assert "alert(1)</script>" not in text and "<b>bold" not in text, path
            assert HOSTILE_RUN_NAME not in text, path  # only escaped forms of the run name
    index_html = (out / "index.html").read_text()
    assert "run&lt;&amp;&quot;&#x27;&gt;" in index_html
    assert not re.search(r"https?://", index_html + (out / "latent.html").read_text())  # nothing from the network
    # the model text arrives intact as data, to be inserted as text; controls made visible
    texts = []
    for i in range(24):
        doc = load_data(out / "data" / "latents" / f"{i}.js")
        texts += ["".join(c["t"]) for c in doc["top"] + [s for b in doc["bands"] for s in b["samples"]]]
    joined = "\n".join(texts)
    assert "<script>alert(1)</script>" in joined and "&amp;" in joined and "\"hi\"" in joined
    for shown in ("\u2407bell", "\u241b[31mred\u2421\u240dcr", "\u21b5", "\u21e5tab"):
        assert shown in joined, shown
    # multi-byte characters split into byte tokens show their bytes; no raw bidi override or line separator
    assert "\\xe2\\x80\\xaeevil" in joined and "\\xe2\\x80\\xa8end" in joined
    assert not {"\u202e", "\u2028", "\ufffd", "\x07", "\x1b", "\r", "\n"} & set(joined.replace("\n", ""))


def test_dashboard_latent_documents(dashboard):
    out = dashboard["out"]
    dead = load_data(out / "data" / "latents" / "3.js")
    assert dead["dead"] and dead["count"] == 0 and dead["top"] == [] and dead["bands"] == []
    doc = load_data(out / "data" / "latents" / "1.js")
    assert not doc["dead"] and 0 < len(doc["top"]) <= 5 and doc["prev"] == 0 and doc["next"] == 2
    assert doc["ablation"] == {"ce_increase": 0.125, "kl": 0.5, "n_contexts": 3}
    assert doc["tsne"] is None and load_data(out / "data" / "latents" / "2.js")["tsne"] == {"decoder": [2.0, 2.0]}
    top = doc["top"][0]
    assert top["v"] == pytest.approx(doc["max"], rel=1e-4) and top["a"][top["m"]] == pytest.approx(top["v"], rel=1e-3)
    assert len(top["t"]) == len(top["a"]) == 31  # the whole context (shorter than the window)
    assert [b["label"] for b in doc["bands"]] == ["0-20%", "20-40%", "40-60%", "60-80%", "80-100%"]
    assert all(b["lo"] <= b["hi"] for b in doc["bands"]) and doc["sample_size"] >= 5
    assert doc["logits"] and len(doc["logits"]["pos"]) == 10 and "ln_final.w" in doc["logits"]["definition"]
    assert [n[0] for n in doc["neighbours"]] != [] and all(n[2] for n in doc["neighbours"])
    assert sum(doc["hist"]["counts"]) == doc["count"]
    index = load_data(out / "data" / "index.js")
    rows = {r[0]: r for r in index["rows"]}
    assert len(rows) == 24 and rows[3][-1] is True and rows[1][-1] is False and rows[1][6] == 0.125
    assert [f[0] for f in index["figures"]][:2] == ["fig-density", "fig-eval-density"]
    assert load_data(out / "data" / "tsne.js")["decoder"]["ids"][:3] == [0, 2, 4]
    meta = json.loads((out / "dashboard.json").read_text())
    assert meta["run"] == str(dashboard["run"].resolve()) and meta["latents"] == list(range(24))


def test_dashboard_top_density_subset_and_wrong_cache(dashboard, tmp_path):
    run, cache = dashboard["run"], dashboard["cache"]
    out = tmp_path / "d"
    build_dashboard(run, DashboardConfig(cache=str(cache), out=str(out), features="top-density:3", contexts=2,
                                         progress=False))
    full = {r[0]: r[1] for r in load_data(dashboard["out"] / "data" / "index.js")["rows"]}
    rows = load_data(out / "data" / "index.js")["rows"]
    assert [r[1] for r in rows] == [full[r[0]] for r in rows] and len(rows) == 3
    assert sorted(r[1] for r in rows) == sorted(full.values())[-3:]
    other = save_run(tmp_path / "other", random_sae(32, 8, 2), "blocks.0.hook_resid_post")
    with pytest.raises(DashboardError, match="reads hook blocks.0"):
        build_dashboard(other, DashboardConfig(cache=str(cache), out=str(tmp_path / "x"), progress=False))


def special_token_cache(tmp: Path) -> Path:
    """A synthetic cache whose first row of every sequence has the special token 7; latent 0 of an identity SAE
    fires on those rows and nowhere else."""
    ctx, n_seq, d_in = 9, 100, 4
    n = n_seq * (ctx - 1)
    acts = np.random.default_rng(0).random((n, d_in), dtype=np.float32) + 0.1
    acts[:, 0] = -1.0
    acts[:: ctx - 1, 0] = 5.0
    write_array_cache(tmp, acts, ctx, {"kind": "synthetic", "name": "special"})
    manifest = read_manifest(tmp)
    for entry in manifest["shards"]:
        toks = np.load(tmp / entry["tokens_file"], mmap_mode="r+")
        toks[:, 0] = np.where(toks[:, 2] == 1, 7, 3)  # position 1 is each sequence's first row
        toks.flush()
        del toks
        entry["tokens_sha256"] = hashlib.sha256((tmp / entry["tokens_file"]).read_bytes()).hexdigest()
    manifest["special_token_ids"] = [7]
    write_json_atomic(tmp / MANIFEST, manifest)
    return tmp


def test_compare_and_eval_agree_on_special_rows(tmp_path):
    """A latent that fires only on special-token rows is dead for `vsae eval` and for the compare page alike."""
    from dashboards.compare import measure_densities
    from evals.driver import EvalConfig, evaluate
    from tests.provenance_helpers import mark_trained_on

    cache = special_token_cache(tmp_path / "cache")
    sae = SAEWeights(W_enc=torch.eye(4), b_enc=torch.zeros(4), W_dec=torch.eye(4), b_dec=torch.zeros(4), k=3,
                     apply_b_dec_to_input=False)
    run = save_run(tmp_path / "run", sae, "synthetic", model="special")
    mark_trained_on(run, cache)
    doc = evaluate([run], EvalConfig(cache=str(cache), metrics=["density"], progress=False))[str(run)]
    density = doc["metrics"]["density"]
    [measured], n = measure_densities([sae], str(cache), 0.05, CompareConfig(cache=str(cache), progress=False))
    assert n == density["n_tokens"] == 5 * 7  # 5 held-out sequences of 8 rows, less their special row
    assert density["per_latent"][0] == 0.0 and measured[0] == 0.0
    np.testing.assert_array_equal(measured, np.array(density["per_latent"]))
    assert density["dead_fraction"] == 0.25
    # the special rows are there to be dropped: counted, latent 0 would fire on one row in eight
    loader = ActivationLoader(cache, 1000, split="eval", eval_fraction=0.05, shuffle=False)
    x = next(iter(loader))
    assert (sae.encode_topk(x).to_dense(4)[:, 0] > 0).float().mean() == 1 / 8


def test_dashboard_counts_no_firing_on_special_rows(tmp_path):
    """The dashboard's densities count rows as `vsae eval` does: latent 0, firing only on special-token rows, is
    dead there too, and the other latents' densities are over the non-special rows."""
    cache = special_token_cache(tmp_path / "cache")
    sae = SAEWeights(W_enc=torch.eye(4), b_enc=torch.zeros(4), W_dec=torch.eye(4), b_dec=torch.zeros(4), k=3,
                     apply_b_dec_to_input=False)
    run = save_run(tmp_path / "run", sae, "synthetic", model="special")
    r = build_dashboard(run, DashboardConfig(cache=str(cache), out=str(tmp_path / "dash"), contexts=2,
                                             progress=False))
    assert r["dead"] == 1 and r["tokens"] == 100 * 8
    stats, _ = gather(sae, str(cache), 8, torch.arange(4), DashboardConfig(cache=str(cache), out="x",
                                                                           progress=False))
    assert stats.n_tokens == 100 * 7 and int(stats.count[0]) == 0 and float(stats.density[1]) == 1.0


def test_compare_page(dashboard, tmp_path):
    from tests.test_trainer import tcfg
    from vsae.config import SAEConfig
    from vsae.trainer import train

    cache = dashboard["cache"]
    runs = train(tcfg(cache, tmp_path / "runs", steps=10, batch_size=128, log_every=2, checkpoint_every=100),
                 [SAEConfig(d_sae=24, k=4), SAEConfig(variant="vsae", d_sae=32, k=4, sample=True)],
                 names=["topk", "vsae"])
    other = save_run(tmp_path / "other-hook", random_sae(32, 16, 2), "blocks.0.hook_resid_post",
                     model=dashboard["model"])
    fake_eval(other, 16)
    dash_a = tmp_path / "dash-a"
    build_dashboard(runs[0], DashboardConfig(cache=str(cache), out=str(dash_a), contexts=2, progress=False))
    out = tmp_path / "cmp" / "compare.html"
    from cli import main

    argv = ["compare", *map(str, runs), str(other), str(dashboard["run"]), "--cache", str(cache), "--out", str(out),
            "--dashboards", str(dash_a), "--tokens", "500", "--matches", "10", "--no-progress"]
    assert main(argv) == 0
    text = out.read_text()
    assert not re.search(r"<script[^>]*src=", text)  # plotly.js, the page script, the data: all inline
    assert "These runs read different activations" in text and "blocks.0.hook_resid_post" in text
    assert "Not measured on the cache" in text and "other-hook" in text
    assert "Configuration differences" in text and "sae.variant" in text
    assert "scr.scr_metric_threshold_5" in text and "scr.scr_metric_mean" in text and "scr.accuracy" not in text
    assert "run&lt;&amp;&quot;&#x27;&gt;" in text and HOSTILE_RUN_NAME not in text
    assert "Latents matched across runs" in text and "mutual best matches" in text
    assert re.search(r'href="\.\./dash-a/latent\.html#\d+"', text)  # links into run A's dashboard
    figures = json.loads(re.search(r"VSAE\.figures\((.*)\);</script>", text).group(1))
    ids = [f[0] for f in figures]
    assert "fig-curves" in ids and any(i.startswith("fig-match") for i in ids)
    assert sum(i.startswith("fig-density") for i in ids) == 2  # one per group of comparable runs
    assert any(i.startswith("fig-tsne") for i in ids)  # the fake eval's decoder map
    with pytest.raises(ValueError, match="at least two"):
        compare_runs([runs[0]], CompareConfig(cache=str(cache), out=str(out)))


def test_cli_dashboard(dashboard, tmp_path, capsys):
    from cli import main

    base = ["dashboard", str(dashboard["run"]), "--cache", str(dashboard["cache"]), "--out", str(tmp_path / "d"),
            "--contexts", "3", "--no-progress"]
    assert main([*base, "--features", "0,1,2"]) == 0
    assert "dashboard of 3 latents (0 dead)" in capsys.readouterr().out
    assert main([*base, "--features", "99"]) == 0  # N larger than d_sae: all of them
    assert "dashboard of 24 latents (1 dead)" in capsys.readouterr().out
    assert main([*base, "--features", "0,99"]) == 2
    assert "latent ids must be in 0..23" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["dashboard", "compare"])
def test_cli_help(command, capsys):
    from cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: vsae " + command in capsys.readouterr().out
