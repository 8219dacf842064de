"""One SAE on disk in SAELens 6.54's `topk` format: `cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`).

`sae_lens.SAE.load_from_disk(dir)` loads what `write_sae` writes, and `read_sae` loads what SAELens's
`TopKSAE.save_model` (or `StandardSAE.save_model`) writes. Safetensors and JSON only: no pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from activations.atomic import write_atomic, write_text_atomic
from vsae.code import TopKCode, decode_topk, encode_topk

# File and key names as SAELens 6.54 uses them (sae_lens/constants.py, training/sae_trainer.py).
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SPARSITY_KEY = "sparsity"
# SAELens stores log10(firing frequency + eps) under SPARSITY_KEY; eps keeps dead features finite.
SPARSITY_EPS = 1e-10

WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
# Dtype names SAELens accepts in cfg.json (sae_lens.constants.DTYPE_MAP); we write the short form.
WRITE_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPES = WRITE_DTYPES | {f"torch.{name}": dt for name, dt in WRITE_DTYPES.items()}
# Metadata that makes a checkpoint usable on its own: which model and hook the SAE reads, on what data.
REQUIRED_METADATA = ("model_name", "hook_name", "context_size", "dataset_path")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be read as one SAE; the message names the file and the problem."""


def _shape_problem(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, d_in: int, d_sae: int) -> str | None:
    """What is wrong with the four tensors' shapes for a (d_in, d_sae) SAE, or None when nothing is."""
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    actual = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    for name, shape in expected.items():
        if tuple(actual[name].shape) != shape:
            return f"{name} has shape {list(actual[name].shape)}, expected {list(shape)} for d_in={d_in}, d_sae={d_sae}"
    return None


def _k_problem(k: Any, d_sae: int) -> str | None:
    # bool is an int subclass; a JSON `true` for k is a broken config, not k=1.
    if not isinstance(k, int) or isinstance(k, bool):
        return f"k must be an integer, got {k!r}"
    if not 0 < k <= d_sae:
        return f"k={k} is out of range 1..d_sae={d_sae}"
    return None


@dataclass
class SAEWeights:
    """A TopK SAE as every vsae variant exports it.

    z = TopK_k(ReLU((x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc)); x_hat = z @ W_dec + b_dec.

    Decoder rows are whatever the variant trained (not necessarily unit norm); nothing here renormalises them.
    """

    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_in]
    b_dec: Tensor  # [d_in]
    k: int
    apply_b_dec_to_input: bool

    def __post_init__(self) -> None:
        problem = _shape_problem(self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.d_in, self.d_sae)
        problem = problem or _k_problem(self.k, self.d_sae)
        if problem:
            raise ValueError(f"SAEWeights: {problem}")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[-1]

    def encode_topk(self, x: Tensor) -> TopKCode:
        """The sparse code of x [..., d_in]: (vals, idx) [..., k] (`vsae.code.encode_topk`)."""
        return encode_topk(x, self.W_enc, self.b_enc, self.b_dec, self.k, self.apply_b_dec_to_input)

    def decode_topk(self, code: TopKCode) -> Tensor:
        """x_hat [..., d_in] of a sparse code (`vsae.code.decode_topk`)."""
        return decode_topk(code, self.W_dec, self.b_dec)

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations [..., d_sae] with at most k nonzeros per row (SAELens's `encode`)."""
        return self.encode_topk(x).to_dense(self.d_sae)

    def decode(self, z: Tensor) -> Tensor:
        """x_hat of a dense code z [..., d_sae] (SAELens's `decode`)."""
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec


def _sae_lens_version() -> str:
    # SAELens treats a cfg.json without metadata.sae_lens_version as pre-6.0 and rewrites it, so we must
    # name a version; the installed one is the format we match. importlib avoids importing sae_lens itself.
    try:
        return version("sae-lens")
    except PackageNotFoundError:
        return "6.54.12"


def _sae_cfg(weights: SAEWeights, metadata: dict[str, Any], dtype: str = "float32") -> dict[str, Any]:
    """The cfg.json dict, with the keys and order `TopKSAE(...).save_model` writes."""
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {missing}; a checkpoint must say what model, hook and data it was trained on")
    meta = {"sae_lens_version": _sae_lens_version(), "sae_lens_training_version": None}  # not trained by SAELens
    meta.update(metadata)
    return {
        "d_in": weights.d_in,
        "d_sae": weights.d_sae,
        "dtype": dtype,
        "device": "cpu",  # the files hold CPU tensors; loaders pick their own device
        "apply_b_dec_to_input": bool(weights.apply_b_dec_to_input),
        "normalize_activations": "none",  # any activation scale is folded into the weights before export
        "reshape_activations": "none",
        "metadata": meta,
        "k": int(weights.k),
        # Decoder rows may have free norms (one variant trains them); SAELens must use them as they are.
        "rescale_acts_by_decoder_norm": False,
        "architecture": "topk",
    }


def write_sae(
    directory: Path,
    weights: SAEWeights,
    metadata: dict[str, Any],
    dtype: str = "float32",
    feature_sparsity: Tensor | None = None,
) -> None:
    """Write cfg.json, sae_weights.safetensors and, given per-feature firing frequencies, sparsity.safetensors.

    `directory` must exist; the caller makes the run directory as a whole atomic, each file here is atomic itself.
    `feature_sparsity` is each feature's firing frequency in [0, 1]; SAELens stores log10(freq + 1e-10).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    if dtype not in WRITE_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(WRITE_DTYPES)}")
    # Serialise everything before writing anything, so a bad argument leaves no partial checkpoint behind.
    cfg_text = json.dumps(_sae_cfg(weights, metadata, dtype), indent=2, allow_nan=False)  # strict JSON for other tools
    torch_dtype = WRITE_DTYPES[dtype]
    # Fresh contiguous CPU copies: safetensors refuses views and tensors that share storage.
    tensors = {
        name: getattr(weights, name).detach().to("cpu", torch_dtype, copy=True, memory_format=torch.contiguous_format)
        for name in WEIGHT_KEYS
    }
    sparsity = None
    if feature_sparsity is not None:
        freq = feature_sparsity.detach().to("cpu", torch.float32)
        if tuple(freq.shape) != (weights.d_sae,):
            raise ValueError(f"feature_sparsity has shape {list(freq.shape)}, expected [{weights.d_sae}]")
        if not bool(((freq >= 0) & (freq <= 1)).all()):
            raise ValueError("feature_sparsity must be firing frequencies in [0, 1] (not log10 values)")
        sparsity = {SPARSITY_KEY: torch.log10(freq + SPARSITY_EPS).contiguous()}

    write_atomic(directory / WEIGHTS_FILENAME, lambda p: save_file(tensors, p))
    if sparsity is not None:
        write_atomic(directory / SPARSITY_FILENAME, lambda p: save_file(sparsity, p))
    # cfg.json last: a directory with a cfg.json has all its files.
    write_text_atomic(directory / CFG_FILENAME, cfg_text)


def _read_cfg(directory: Path) -> dict[str, Any]:
    path = directory / CFG_FILENAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_safetensors(path: Path, device: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(path, framework="pt", device=device) as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e


@dataclass(frozen=True)
class _Shape:
    """What cfg.json says about the tensors: sizes, k, dtype, pre-bias, and whether to fold decoder norms."""

    d_in: int
    d_sae: int
    k: int
    dtype: torch.dtype
    apply_b_dec_to_input: bool
    rescale_acts_by_decoder_norm: bool


def _check_cfg(cfg: dict[str, Any], cfg_path: Path) -> _Shape:
    """The SAE that cfg.json describes, or a CheckpointError naming the first unsupported or invalid key."""
    architecture = cfg.get("architecture")
    if architecture not in ("topk", "standard"):
        raise CheckpointError(
            f"{cfg_path}: architecture {architecture!r} is not supported (only 'topk', and 'standard' ReLU)"
        )
    for key in ("d_in", "d_sae"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{cfg_path}: {key} must be a positive integer, got {value!r}")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    # A ReLU SAE is TopK with k = d_sae: keeping every positive pre-activation.
    k = cfg.get("k") if architecture == "topk" else d_sae
    if problem := _k_problem(k, d_sae):
        raise CheckpointError(f"{cfg_path}: {problem}")
    dtype_name = cfg.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise CheckpointError(f"{cfg_path}: dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
    # These change the math at run time in ways SAEWeights does not model; a folded export has "none".
    for key in ("normalize_activations", "reshape_activations"):
        if cfg.get(key, "none") != "none":
            raise CheckpointError(f"{cfg_path}: {key}={cfg[key]!r} is not supported (only 'none')")
    apply_b_dec_to_input = cfg.get("apply_b_dec_to_input", True)  # SAELens's default
    if not isinstance(apply_b_dec_to_input, bool):
        raise CheckpointError(f"{cfg_path}: apply_b_dec_to_input must be true or false, got {apply_b_dec_to_input!r}")
    rescale = architecture == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm", False))
    return _Shape(d_in, d_sae, k, DTYPES[dtype_name], apply_b_dec_to_input, rescale)


def _read_weight_tensors(weights_path: Path, shape: _Shape, device: str, cfg_path: Path) -> dict[str, Tensor]:
    """The four weight tensors, checked: names, float dtype, shapes against cfg.json, finite values."""
    tensors = _read_safetensors(weights_path, device)
    missing = [key for key in WEIGHT_KEYS if key not in tensors]
    extra = sorted(set(tensors) - set(WEIGHT_KEYS))
    if missing or extra:
        raise CheckpointError(
            f"{weights_path}: expected tensors {list(WEIGHT_KEYS)}; missing {missing}, unexpected {extra}"
        )
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{weights_path}: {name} has non-float dtype {t.dtype}")
    if problem := _shape_problem(*(tensors[key] for key in WEIGHT_KEYS), shape.d_in, shape.d_sae):
        raise CheckpointError(f"{weights_path}: {problem} (from {cfg_path})")
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{weights_path}: {name} contains NaN or inf")
    return tensors


def _fold_decoder_norms(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SAELens's rescale_acts_by_decoder_norm as plain TopK weights.

    TopK(pre * n) then (z / n) @ W_dec equals TopK(pre') @ W_dec' with W_enc' = W_enc * n, b_enc' = b_enc * n,
    W_dec' = W_dec / n; folded in float32 or better so bf16 SAEs lose nothing extra.
    """
    work = torch.promote_types(W_dec.dtype, torch.float32)
    norm = W_dec.to(work).norm(dim=-1).clamp(min=1e-8)
    return W_enc.to(work) * norm, b_enc.to(work) * norm, W_dec.to(work) / norm[:, None]


def read_sae(directory: Path, device: str = "cpu") -> tuple[SAEWeights, dict[str, Any]]:
    """Load one SAE written by `write_sae` or by SAELens (`topk`, or `standard` as TopK with k = d_sae).

    Returns the weights in cfg.json's dtype on `device`, and cfg.json as read. A SAELens topk SAE with
    rescale_acts_by_decoder_norm has its decoder norms folded into the encoder (as SAELens does on saving
    an inference model), which computes the same function with plain TopK.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory missing")
    cfg = _read_cfg(directory)
    cfg_path = directory / CFG_FILENAME
    shape = _check_cfg(cfg, cfg_path)
    tensors = _read_weight_tensors(directory / WEIGHTS_FILENAME, shape, device, cfg_path)
    W_enc, b_enc, W_dec, b_dec = (tensors[key] for key in WEIGHT_KEYS)
    if shape.rescale_acts_by_decoder_norm:
        W_enc, b_enc, W_dec = _fold_decoder_norms(W_enc, b_enc, W_dec)
    weights = SAEWeights(
        W_enc=W_enc.to(shape.dtype),
        b_enc=b_enc.to(shape.dtype),
        W_dec=W_dec.to(shape.dtype),
        b_dec=b_dec.to(shape.dtype),
        k=shape.k,
        apply_b_dec_to_input=shape.apply_b_dec_to_input,
    )
    return weights, cfg


def read_log_feature_sparsity(directory: Path, device: str = "cpu") -> Tensor | None:
    """log10(firing frequency + 1e-10) per feature from sparsity.safetensors, or None when there is no such file."""
    path = Path(directory) / SPARSITY_FILENAME
    if not path.exists():
        return None
    tensors = _read_safetensors(path, device)
    if SPARSITY_KEY not in tensors:
        raise CheckpointError(f"{path}: no {SPARSITY_KEY!r} tensor (has {sorted(tensors)})")
    sparsity = tensors[SPARSITY_KEY]
    if sparsity.ndim != 1:
        raise CheckpointError(f"{path}: {SPARSITY_KEY!r} has shape {list(sparsity.shape)}, expected [d_sae]")
    return sparsity
