"""`vsae synth`: SynthSAEBench rows from sae_lens.synthetic written as an ordinary cache, with their ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from activations.cache import read_manifest
from activations.loader import ActivationLoader
from activations.synthetic import (
    CHUNK_ROWS,
    GROUND_TRUTH_JSON,
    PRESETS,
    GroundTruthError,
    SynthConfig,
    TrueCodes,
    build_model,
    draw_rows,
    ground_truth_tensors,
    gt_codes_file,
    true_codes,
)
from cli import main

SEED = 3
ROWS = 2 * CHUNK_ROWS + 300  # crosses chunk boundaries, ends inside one


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny", SEED)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """The same preset and seed written twice: float32 with small shards, float16 with the default shards."""
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for dtype, shard in (("float32", "1000"), ("float16", str(1 << 17))):
        out[dtype] = root / dtype
        assert main(["synth", "--preset", "tiny", "--out", str(out[dtype]), "--seed", str(SEED), "--tokens",
                     str(ROWS), "--dtype", dtype, "--shard-tokens", shard, "--no-progress", "--device", "cpu"]) == 0
    return out


def _all_rows(cache) -> np.ndarray:
    with ActivationLoader(cache, 4096, split="all", shuffle=False) as loader:
        return torch.cat(list(loader)).numpy()


def test_rows_round_trip_through_the_loader(caches, tiny_model):
    manifest = read_manifest(caches["float32"])
    n = manifest["total_tokens"]
    assert n == -(-ROWS // 127) * 127 and manifest["settings"]["model"]["kind"] == "synthetic"
    assert len(manifest["shards"]) > 1
    x, codes = draw_rows(tiny_model, SEED, 0, n)
    assert not np.array_equal(x[:CHUNK_ROWS], x[CHUNK_ROWS : 2 * CHUNK_ROWS])  # chunks are independent draws
    # float32 caches store the draws exactly; float16 ones their float16 rounding
    np.testing.assert_array_equal(_all_rows(caches["float32"]), x)
    np.testing.assert_array_equal(_all_rows(caches["float16"]), x.astype(np.float16).astype(np.float32))
    stored = true_codes(caches["float16"], np.arange(n))
    for name in ("indptr", "features", "values"):
        np.testing.assert_array_equal(getattr(stored, name), getattr(codes, name))
    # the rows are the true codes through the true dictionary (plus its bias): the codes belong to these rows
    truth = ground_truth_tensors(caches["float32"])
    rebuilt = codes.dense() @ truth["feature_vectors"] + truth["bias"]
    np.testing.assert_allclose(rebuilt.numpy(), x, atol=1e-4)


def test_any_range_and_any_row_order_reads_back(caches, tiny_model):
    x, codes = draw_rows(tiny_model, SEED, CHUNK_ROWS - 5, CHUNK_ROWS + 7)  # straddles a chunk boundary
    np.testing.assert_array_equal(x, _all_rows(caches["float32"])[CHUNK_ROWS - 5 : CHUNK_ROWS + 7])
    rows = np.array([CHUNK_ROWS + 6, CHUNK_ROWS - 5, CHUNK_ROWS])
    got = true_codes(caches["float32"], rows)
    want = codes.take(rows - (CHUNK_ROWS - 5))
    np.testing.assert_array_equal(got.dense().numpy(), want.dense().numpy())
    assert got.dense().shape == (3, 256) and got.indptr[-1] > 0


def test_another_seed_draws_other_rows_and_another_dictionary(tiny_model):
    other = build_model("tiny", SEED + 1)
    assert not torch.equal(other.feature_dict.feature_vectors, tiny_model.feature_dict.feature_vectors)
    assert not np.array_equal(draw_rows(other, SEED + 1, 0, 50)[0], draw_rows(tiny_model, SEED, 0, 50)[0])
    assert not np.array_equal(draw_rows(tiny_model, SEED + 1, 0, 50)[0], draw_rows(tiny_model, SEED, 0, 50)[0])


def test_ground_truth_files(caches, tiny_model):
    doc = json.loads((caches["float16"] / GROUND_TRUTH_JSON).read_text())
    assert doc["preset"] == "tiny" and doc["seed"] == SEED and doc["rows"]["stored_dtype"] == "float16"
    assert doc["synthetic_model_config"]["num_features"] == 256 and doc["versions"]["sae_lens"]
    assert doc["hierarchy"]["roots"] and doc["synthetic_model_config"]["correlation"]["rank"] == 8
    tensors = ground_truth_tensors(caches["float16"])
    assert tensors["feature_vectors"].shape == (256, 128)
    torch.testing.assert_close(tensors["feature_vectors"], tiny_model.feature_dict.feature_vectors)
    torch.testing.assert_close(tensors["firing_probabilities"], tiny_model.activation_generator.firing_probabilities)
    assert 2 < doc["true_l0"] < 12  # correlated, hierarchical firing at the preset's rates


def test_the_model_is_sae_lens_own_for_the_preset(tiny_model):
    from sae_lens.synthetic import SyntheticModel

    theirs = SyntheticModel(PRESETS["tiny"].model_config(SEED))  # built by SAELens itself from the same config
    torch.testing.assert_close(theirs.feature_dict.feature_vectors, tiny_model.feature_dict.feature_vectors)
    torch.testing.assert_close(theirs.activation_generator.firing_probabilities,
                               tiny_model.activation_generator.firing_probabilities)
    assert theirs.hierarchy.to_dict() == tiny_model.hierarchy.to_dict()


def test_synth_flags_come_from_the_config():
    import argparse
    import dataclasses

    from cli import build_parser, field_help

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["synth"]
    by_dest = {a.dest: a for a in sub._actions if a.option_strings}
    for f in dataclasses.fields(SynthConfig):
        assert field_help(SynthConfig, f) in by_dest[f.name].help


def test_corrupt_true_codes_are_refused(caches, tmp_path):
    import shutil

    cache = tmp_path / "c"
    shutil.copytree(caches["float32"], cache)
    path = cache / gt_codes_file(0)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(GroundTruthError, match="fails its sha256 check"):
        true_codes(cache, np.arange(3))


def test_out_directory_rules(caches, tmp_path, capsys):
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "a.txt").write_text("mine")
    args = ["synth", "--preset", "tiny", "--tokens", "200", "--no-progress", "--device", "cpu"]
    assert main([*args, "--out", str(stranger)]) == 2
    assert "holds files but no cache" in capsys.readouterr().err and (stranger / "a.txt").exists()
    cache = tmp_path / "c"
    assert main([*args, "--out", str(cache)]) == 0
    assert main([*args, "--out", str(cache), "--seed", "1"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(cache), "--seed", "1", "--overwrite"]) == 0
    assert json.loads((cache / GROUND_TRUTH_JSON).read_text())["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or replaced dir left behind


def test_config_checks():
    with pytest.raises(ValueError, match="--preset 'huge' is not a preset"):
        SynthConfig(out="x", preset="huge", device="cpu")
    with pytest.raises(ValueError, match="--tokens must be a positive"):
        SynthConfig(out="x", tokens=0, device="cpu")
    assert SynthConfig(out="x", tokens=1, device="cpu").n_rows == 127
    assert set(PRESETS) == {"tiny", "small", "synthsaebench-16k"}
    big = PRESETS["synthsaebench-16k"]
    assert (big.n_features, big.d_in, big.hierarchy, big.correlation) == (16384, 768, (128, 4, 3), (25, 0.1))


def test_true_codes_csr_helpers():
    dense = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    codes = TrueCodes.from_dense(dense)
    assert codes.indptr.tolist() == [0, 1, 1, 3] and codes.features.tolist() == [1, 0, 2]
    torch.testing.assert_close(codes.dense(), dense)
    torch.testing.assert_close(codes.take(np.array([2, 0, 2])).dense(), dense[[2, 0, 2]])
    torch.testing.assert_close(TrueCodes.concat([codes, codes.take(np.array([1]))]).dense(), dense[[0, 1, 2, 1]])
    torch.testing.assert_close(codes.dense(1, 3), dense[1:3])


def test_train_eval_and_dashboard_run_unchanged_on_a_synthetic_cache(caches, tmp_path, capsys):
    cache = str(caches["float16"])
    run = tmp_path / "run"
    assert main(["train", "--cache", cache, "--out", str(run), "--steps", "10", "--batch-size", "256",
                 "--d-sae", "256", "--k", "8", "--no-progress", "--device", "cpu"]) == 0
    assert main(["eval", str(run), "--cache", cache, "--metrics", "core,density", "--no-progress",
                 "--device", "cpu"]) == 0
    metrics = json.loads((run / "eval.json").read_text())["metrics"]
    assert metrics["core"]["n_tokens"] > 0 and metrics["core"]["ce_score"] is None
    assert 0 <= metrics["density"]["dead_fraction"] <= 1
    assert main(["dashboard", str(run), "--cache", cache, "--out", str(tmp_path / "dash"), "--features", "4",
                 "--no-progress", "--device", "cpu"]) == 0
    assert (tmp_path / "dash" / "index.html").is_file()
