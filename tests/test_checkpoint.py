"""vsae.checkpoint against the installed SAELens: what vsae writes SAELens loads, and the other way round."""

import json
import os

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from safetensors.torch import load_file, save_file

from vsae.checkpoint import (
    CFG_FILENAME,
    SPARSITY_FILENAME,
    WEIGHTS_FILENAME,
    CheckpointError,
    SAEWeights,
    read_log_feature_sparsity,
    read_sae,
    write_sae,
)

D_IN, D_SAE, K = 16, 64, 4
META = {"model_name": "tiny-neox", "hook_name": "blocks.2.hook_resid_post", "context_size": 32, "dataset_path": "c"}


def random_weights(apply_b_dec_to_input: bool = True, seed: int = 0) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    # Decoder rows with norms spread over 0.1..3: the export must keep them, not renormalise.
    W_dec = torch.nn.functional.normalize(torch.randn(D_SAE, D_IN, generator=g), dim=-1)
    W_dec = W_dec * (0.1 + 2.9 * torch.rand(D_SAE, 1, generator=g))
    return SAEWeights(
        W_enc=torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5,
        b_enc=0.1 * torch.randn(D_SAE, generator=g),
        W_dec=W_dec,
        b_dec=torch.randn(D_IN, generator=g),
        k=K,
        apply_b_dec_to_input=apply_b_dec_to_input,
    )


def inputs(seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(32, D_IN, generator=torch.Generator().manual_seed(seed))


def assert_same_function(ours: SAEWeights, theirs: SAE, atol: float = 1e-6) -> None:
    x = inputs()
    with torch.no_grad():
        z = ours.encode(x)
        torch.testing.assert_close(theirs.encode(x), z, atol=atol, rtol=0)
        torch.testing.assert_close(theirs.decode(z), ours.decode(z), atol=atol, rtol=0)


@pytest.fixture
def written(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    weights = random_weights()
    write_sae(directory, weights, META)
    return directory, weights


# --- vsae -> SAELens ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_sae_lens_loads_what_we_write(tmp_path, apply_b_dec_to_input):
    weights = random_weights(apply_b_dec_to_input)
    assert not torch.allclose(weights.W_dec.norm(dim=-1), torch.ones(D_SAE))
    write_sae(tmp_path, weights, META)

    sae = SAE.load_from_disk(tmp_path)
    assert isinstance(sae, TopKSAE)
    assert sae.cfg.k == K and sae.cfg.apply_b_dec_to_input is apply_b_dec_to_input
    assert sae.cfg.rescale_acts_by_decoder_norm is False
    assert sae.cfg.metadata.hook_name == META["hook_name"] and sae.cfg.metadata.model_name == META["model_name"]
    assert torch.equal(sae.W_dec.data, weights.W_dec)  # free decoder norms survive as they are
    assert_same_function(weights, sae)
    z = weights.encode(inputs())
    assert int((z != 0).sum(-1).max()) <= K


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_read_sae_round_trips_exactly(tmp_path, apply_b_dec_to_input):
    weights = random_weights(apply_b_dec_to_input)
    write_sae(tmp_path, weights, META)
    back, cfg = read_sae(tmp_path)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(weights, name)), name
    assert (back.k, back.apply_b_dec_to_input) == (K, apply_b_dec_to_input)
    assert cfg["architecture"] == "topk" and cfg["metadata"]["dataset_path"] == META["dataset_path"]


def test_cfg_has_the_keys_sae_lens_writes(tmp_path, written):
    directory, _ = written
    TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)).save_model(tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / CFG_FILENAME).read_text())
    ours = json.loads((directory / CFG_FILENAME).read_text())
    assert list(ours) == list(theirs)
    assert set(theirs["metadata"]) <= set(ours["metadata"])
    assert ours["normalize_activations"] == ours["reshape_activations"] == "none"
    # Each file was renamed into place: no temp files are left behind, and no sparsity file was asked for.
    assert sorted(os.listdir(directory)) == [CFG_FILENAME, WEIGHTS_FILENAME]


def test_sparsity_file_is_sae_lens_log10_frequency(tmp_path):
    weights = random_weights()
    freq = torch.rand(D_SAE)
    freq[:3] = 0.0  # dead features stay finite thanks to the eps
    write_sae(tmp_path, weights, META, feature_sparsity=freq)
    stored = load_file(tmp_path / SPARSITY_FILENAME)
    assert list(stored) == ["sparsity"]
    expected = torch.log10(freq + 1e-10)
    torch.testing.assert_close(stored["sparsity"], expected)
    torch.testing.assert_close(read_log_feature_sparsity(tmp_path), expected)
    assert torch.isfinite(stored["sparsity"]).all()
    SAE.load_from_disk(tmp_path)  # the extra file does not disturb SAELens
    with pytest.raises(ValueError, match="log10"):
        write_sae(tmp_path, weights, META, feature_sparsity=expected)


def test_sparsity_file_is_optional(written):
    directory, _ = written
    assert read_log_feature_sparsity(directory) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtypes(tmp_path, dtype):
    weights = random_weights()
    write_sae(tmp_path, weights, META, dtype=dtype)
    back, cfg = read_sae(tmp_path)
    torch_dtype = getattr(torch, dtype)
    assert cfg["dtype"] == dtype and back.W_enc.dtype == torch_dtype
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(weights, name).to(torch_dtype)), name
    sae = SAE.load_from_disk(tmp_path)
    assert sae.W_enc.dtype == torch_dtype
    # Same ops in the same dtype, so even bf16 agrees to well within its rounding.
    assert_same_function(back, sae)


def test_write_needs_metadata_and_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(ValueError, match="hook_name"):
        write_sae(tmp_path, random_weights(), {"model_name": "m"})
    with pytest.raises(ValueError, match="dtype"):
        write_sae(tmp_path, random_weights(), META, dtype="int8")
    assert os.listdir(tmp_path) == []


def test_weights_validate_shapes_and_k():
    w = random_weights()
    with pytest.raises(ValueError, match="W_dec"):
        SAEWeights(w.W_enc, w.b_enc, w.W_dec.T, w.b_dec, k=K, apply_b_dec_to_input=True)
    with pytest.raises(ValueError, match="out of range"):
        SAEWeights(w.W_enc, w.b_enc, w.W_dec, w.b_dec, k=D_SAE + 1, apply_b_dec_to_input=True)


# --- SAELens -> vsae ---------------------------------------------------------------------------------------------


def randomised(sae: SAE, seed: int = 2) -> SAE:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_read_sae_lens_topk(tmp_path, apply_b_dec_to_input):
    sae = randomised(TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, apply_b_dec_to_input=apply_b_dec_to_input)))
    sae.save_model(tmp_path)
    weights, cfg = read_sae(tmp_path)
    assert (weights.k, weights.apply_b_dec_to_input, cfg["architecture"]) == (K, apply_b_dec_to_input, "topk")
    assert torch.equal(weights.W_dec, sae.W_dec.data)
    assert_same_function(weights, sae)


def test_read_sae_lens_topk_with_decoder_norm_rescaling_folds_it(tmp_path):
    sae = randomised(TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True)))
    sae.save_model(tmp_path)
    weights, _ = read_sae(tmp_path)
    torch.testing.assert_close(weights.W_dec.norm(dim=-1), torch.ones(D_SAE))
    assert_same_function(weights, sae, atol=1e-5)  # folding rounds once per weight


def test_read_sae_lens_standard_as_topk_with_k_d_sae(tmp_path):
    sae = randomised(StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)))
    sae.save_model(tmp_path)
    weights, cfg = read_sae(tmp_path)
    assert weights.k == D_SAE and cfg["architecture"] == "standard"
    assert_same_function(weights, sae)


# --- errors ------------------------------------------------------------------------------------------------------


def edit_cfg(directory, **changes):
    path = directory / CFG_FILENAME
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_missing_directory_and_files(tmp_path, written):
    directory, _ = written
    with pytest.raises(CheckpointError, match="directory missing"):
        read_sae(tmp_path / "nope")
    (directory / WEIGHTS_FILENAME).unlink()
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILENAME}: missing"):
        read_sae(directory)
    (directory / CFG_FILENAME).unlink()
    with pytest.raises(CheckpointError, match=f"{CFG_FILENAME}: missing"):
        read_sae(directory)


def test_corrupt_cfg_json(written):
    directory, _ = written
    (directory / CFG_FILENAME).write_text('{"d_in": 16,')
    with pytest.raises(CheckpointError, match=f"{CFG_FILENAME}: not valid JSON"):
        read_sae(directory)


def test_truncated_weights(written):
    directory, _ = written
    path = directory / WEIGHTS_FILENAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILENAME}: corrupt or truncated"):
        read_sae(directory)


# 0xFF makes the header invalid UTF-8; 0x01 on the opening brace keeps it ASCII but not JSON.
@pytest.mark.parametrize(("offset", "mask"), [(9, 0xFF), (30, 0xFF), (8, 0x01)])
def test_flipped_bytes_in_safetensors_header(written, offset, mask):
    directory, _ = written
    path = directory / WEIGHTS_FILENAME
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    assert offset < 8 + header_len  # the flip lands in the JSON header, not the tensor data
    data[offset] ^= mask
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILENAME}: corrupt or truncated"):
        read_sae(directory)


def test_unknown_architecture(written):
    directory, _ = written
    edit_cfg(directory, architecture="jumprelu")
    with pytest.raises(CheckpointError, match="architecture 'jumprelu' is not supported"):
        read_sae(directory)


def test_shape_mismatch_between_tensors_and_cfg(written):
    directory, weights = written
    edit_cfg(directory, d_sae=D_SAE * 2, k=K)
    with pytest.raises(CheckpointError, match=r"W_enc has shape \[16, 64\], expected \[16, 128\].*cfg\.json"):
        read_sae(directory)
    edit_cfg(directory, d_sae=D_SAE)
    tensors = load_file(directory / WEIGHTS_FILENAME)
    tensors["b_dec"] = torch.zeros(D_IN + 1)
    save_file(tensors, directory / WEIGHTS_FILENAME)
    with pytest.raises(CheckpointError, match=r"b_dec has shape \[17\], expected \[16\]"):
        read_sae(directory)


def test_missing_or_extra_tensors(written):
    directory, _ = written
    tensors = load_file(directory / WEIGHTS_FILENAME)
    tensors["threshold"] = tensors.pop("b_enc")
    save_file(tensors, directory / WEIGHTS_FILENAME)
    with pytest.raises(CheckpointError, match=r"missing \['b_enc'\], unexpected \['threshold'\]"):
        read_sae(directory)


@pytest.mark.parametrize("k", [0, -1, D_SAE + 1, None, True])
def test_k_out_of_range(written, k):
    directory, _ = written
    edit_cfg(directory, k=k)
    with pytest.raises(CheckpointError, match=r"cfg\.json: k(=| must be an integer)"):
        read_sae(directory)


def test_unsupported_normalisation_and_nan(written):
    directory, _ = written
    edit_cfg(directory, normalize_activations="layer_norm")
    with pytest.raises(CheckpointError, match="normalize_activations='layer_norm'"):
        read_sae(directory)
    edit_cfg(directory, normalize_activations="none")
    tensors = load_file(directory / WEIGHTS_FILENAME)
    tensors["W_dec"][0, 0] = float("nan")
    save_file(tensors, directory / WEIGHTS_FILENAME)
    with pytest.raises(CheckpointError, match="W_dec contains NaN"):
        read_sae(directory)
