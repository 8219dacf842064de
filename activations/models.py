"""Load a TransformerLens model (hub name, local HF checkpoint, or the embedded default).

Every model is loaded without weight processing (no LayerNorm folding, no
centring), as SAELens does, so the cached residual stream is the model's own:
the same numbers a Hugging Face forward or the paper's nnsight harvest gives.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED_MODEL = "vsae-tiny"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which and how to provide it."""


class HookNameError(ValueError):
    """A hook name the model does not have; the message lists the closest valid names."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a hub name, a local HF checkpoint, or the embedded model."""

    name: str = EMBEDDED_MODEL
    path: str | None = None

    def describe(self) -> dict:
        if self.path is not None:
            path = Path(self.path).resolve()
            return {"kind": "local", "name": path.name, "path": str(path)}
        if self.name == EMBEDDED_MODEL:
            return {"kind": "embedded", "name": self.name}
        return {"kind": "hub", "name": self.name}


def source_from_manifest(description: dict) -> ModelSource:
    """The `ModelSource` a cache manifest's `settings.model` describes (so evals load the same model)."""
    if description.get("kind") == "local":
        return ModelSource(name=description["name"], path=description["path"])
    return ModelSource(name=description.get("name", EMBEDDED_MODEL))


def load_model(source: ModelSource, device: str = "cpu", dtype: str = "float32"):
    """A `HookedTransformer` in eval mode for `source`."""
    if source.path is not None:
        return load_local_checkpoint(source.path, device=device, dtype=dtype)
    if source.name == EMBEDDED_MODEL:
        from activations.tiny_model import ensure_tiny_model

        return load_local_checkpoint(ensure_tiny_model(), device=device, dtype=dtype)
    return _load_from_hub(source.name, device=device, dtype=dtype)


def _load_from_hub(name: str, device: str, dtype: str):
    from transformer_lens import HookedTransformer

    try:
        model = HookedTransformer.from_pretrained_no_processing(name, device=device, dtype=dtype)
    except ValueError as e:
        if "not found" in str(e):
            raise ModelLoadError(
                f"unknown model {name!r}: TransformerLens has no official model of that name "
                f"(e.g. 'pythia-70m-deduped'); for a local Hugging Face checkpoint use "
                f"--model-path DIR, or leave --model out for the embedded {EMBEDDED_MODEL!r}"
            ) from e
        raise
    except OSError as e:
        raise ModelLoadError(
            f"cannot load model {name!r}: its weights are not cached and the Hugging Face hub "
            f"could not be reached ({type(e).__name__}). Download the checkpoint elsewhere and "
            f"pass --model-path DIR (a directory with config.json and the weights), or leave "
            f"--model out to use the embedded {EMBEDDED_MODEL!r}"
        ) from e
    return model.eval()


def load_local_checkpoint(path: str | Path, device: str = "cpu", dtype: str = "float32"):
    """Build a `HookedTransformer` from a local Hugging Face checkpoint directory.

    TransformerLens 3.9's `from_pretrained` accepts only official names, but its
    config converter reads a local `config.json` and its per-architecture weight
    converters map an HF state dict; this is `from_pretrained_no_processing`
    with the name lookup left out.
    """
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"--model-path {path}: no config.json there; expected a Hugging Face checkpoint "
            f"directory (config.json + model.safetensors + tokenizer files)"
        )
    _check_safetensors(path)
    torch_dtype = getattr(torch, dtype)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        cfg = loading.get_pretrained_model_config(
            str(path), fold_ln=False, device=device, dtype=torch_dtype
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load the checkpoint in {path}: {e}") from e
    state_dict = loading.get_pretrained_state_dict(str(path), cfg, hf_model, dtype=torch_dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    model.move_model_modules_to_device()
    return model.eval()


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_safetensors(path: Path) -> None:
    """Refuse a checkpoint without safetensors weights: a pickle (`pytorch_model.bin`) can run code when loaded."""
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if not pickles:
        raise ModelLoadError(f"--model-path {path}: no model.safetensors there; expected a Hugging Face checkpoint "
                             f"directory (config.json + model.safetensors + tokenizer files)")
    raise ModelLoadError(
        f"--model-path {path} holds {', '.join(pickles[:3])} but no .safetensors weights: only safetensors weights "
        f"are loaded (a pickle can run code); convert a checkpoint you trust with `python -c \"from transformers "
        f"import AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}')\"`"
    )


def default_hook(model) -> str:
    """The residual stream after the middle block: `blocks.3.hook_resid_post` for Pythia-70M."""
    return f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"


def check_hook(model, hook_name: str) -> None:
    """Raise `HookNameError` listing the closest valid names when `hook_name` is not a hook."""
    names = list(model.hook_dict)
    if hook_name in names:
        return
    close = difflib.get_close_matches(hook_name, names, n=6, cutoff=0.5)
    if not close:
        close = [n for n in names if n.endswith("hook_resid_post")]
    raise HookNameError(
        f"unknown hook {hook_name!r} for this model ({model.cfg.n_layers} layers); "
        f"closest valid names: {', '.join(close)}"
    )


def stop_layer(model, hook_name: str) -> int | None:
    """The `stop_at_layer` that still runs `hook_name`: blocks after its own are skipped."""
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    if m:
        return int(m.group(1)) + 1
    if hook_name in ("hook_embed", "hook_pos_embed", "hook_tokens"):
        return 0
    return None  # ln_final, unembed: the whole model runs


# The tokenizer attributes SAELens's `get_special_token_ids` reads (sae_lens/util.py).
_SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")


def special_token_ids(tokenizer) -> set[int]:
    """The structural special ids SAELens excludes by default: BOS, EOS, PAD, SEP, decoder start (not chat tokens)."""
    ids = (getattr(tokenizer, attr, None) for attr in _SPECIAL_TOKEN_ATTRS)
    return {int(i) for i in ids if i is not None}


def tokenizer_id(model, source: ModelSource) -> str:
    """A short identifier of the tokenizer, stored in the cache manifest."""
    tok = model.tokenizer
    return f"{source.describe()['name']}:{type(tok).__name__}:vocab{len(tok)}"
