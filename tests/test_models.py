import pytest
import torch

from activations.models import (
    HookNameError,
    ModelLoadError,
    ModelSource,
    check_hook,
    default_hook,
    load_local_checkpoint,
    load_model,
    stop_layer,
)


def test_local_checkpoint_matches_hugging_face(tiny_checkpoint):
    from transformers import GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM.from_pretrained(tiny_checkpoint).eval()
    tl = load_local_checkpoint(tiny_checkpoint)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_out = hf(tokens, output_hidden_states=True)
        _, cache = tl.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
        assert torch.allclose(tl(tokens), hf_out.logits, atol=1e-5)
        # Unprocessed weights: the residual stream is the HF model's own hidden state.
        assert torch.allclose(cache["blocks.1.hook_resid_post"], hf_out.hidden_states[2], atol=1e-5)


def test_default_hook_and_stop_layer(tiny_checkpoint):
    model = load_local_checkpoint(tiny_checkpoint)
    assert default_hook(model) == "blocks.2.hook_resid_post"
    assert stop_layer(model, "blocks.2.hook_resid_post") == 3
    assert stop_layer(model, "blocks.0.attn.hook_z") == 1
    assert stop_layer(model, "hook_embed") == 0
    assert stop_layer(model, "ln_final.hook_normalized") is None


def test_wrong_hook_lists_close_names(tiny_checkpoint):
    model = load_local_checkpoint(tiny_checkpoint)
    with pytest.raises(HookNameError, match="blocks.2.hook_resid_post"):
        check_hook(model, "blocks.2.hook_resid_pots")
    with pytest.raises(HookNameError, match="hook_resid_post"):
        check_hook(model, "nonsense")


def test_missing_model_offline_names_it_and_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"pythia-70m-deduped.*--model-path"):
        load_model(ModelSource("pythia-70m-deduped"))
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model(ModelSource("no-such-model-xyz"))


def test_model_path_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(ModelSource(path=str(tmp_path)))


def test_pickle_weights_are_refused_with_the_conversion(tmp_path, tiny_checkpoint):
    import shutil

    import torch
    from safetensors.torch import load_file

    for f in tiny_checkpoint.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    torch.save(load_file(tiny_checkpoint / "model.safetensors"), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pytorch_model.bin but no .safetensors.*save_pretrained"):
        load_model(ModelSource(path=str(tmp_path)))
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(ModelSource(path=str(tmp_path)))
