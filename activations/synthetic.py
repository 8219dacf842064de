"""Synthetic activations with known features (SynthSAEBench, `sae_lens.synthetic`), written as an ordinary cache.

`vsae synth --preset tiny --out CACHE` builds SAELens 6.54's `SyntheticModel` for a preset and a seed (a feature
dictionary with controlled superposition; Zipfian firing probabilities; low-rank correlated and hierarchical,
mutually exclusive firing; per-feature magnitudes), draws rows from it, and writes them with
`activations.cache.write_array_cache`: a manifest whose model kind is "synthetic", shards, checksums. Train, eval,
dashboards and compare read it as any other cache. Beside the cache's own files lies the ground truth:

  ground_truth.json           preset, seed, SAELens's SyntheticModelConfig and hierarchy, versions, how the rows
                              were drawn, the true L0, and the sha256 of each file below
  ground_truth.safetensors    the tensors SAELens's `SyntheticModel.save` writes: feature_vectors [n_features, d_in]
                              (the true dictionary, unit rows), bias [d_in], firing_probabilities [n_features],
                              and correlation_factor [n_features, rank] / correlation_diag [n_features]
  gt-codes-00000.safetensors  the true feature activations of rows [i * B, (i + 1) * B) (B = GT_BLOCK_ROWS), CSR:
                              indptr [n + 1] int64, features [nnz] int32, values [nnz] float32

Row r belongs to chunk r // CHUNK_ROWS, drawn under a torch seed derived from (seed, chunk), so every row is a pure
function of (preset, seed, device, r): `draw_rows` reproduces any range, and the cache does not depend on its shard
size or on how many rows were asked for. The cache stores the draws rounded to its dtype (float16 by default, as
`vsae harvest`); the true codes are stored exactly. On CPUs SAELens's generator is slow at SynthSAEBench-16k's
width (about 200-350 rows/s on two cores, dominated by the dense 16k-wide hierarchy and correlation sampling);
`--device cuda` draws on the GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from activations.atomic import write_atomic, write_text_atomic
from activations.cache import MANIFEST, CacheError, manifest_hash, write_array_cache
from activations.checksums import sha256_file, verify_files
from activations.devices import resolve_device
from activations.guard import DirLock

if TYPE_CHECKING:
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig

GROUND_TRUTH_JSON = "ground_truth.json"
GROUND_TRUTH_WEIGHTS = "ground_truth.safetensors"
GROUND_TRUTH_FORMAT = "vsae-synthetic-ground-truth"
CHUNK_ROWS = 4096  # rows per seeded draw: part of the row stream's definition, recorded in ground_truth.json
GT_BLOCK_ROWS = 1 << 17  # rows per true-code file; a multiple of CHUNK_ROWS
DTYPES = ("float16", "float32")
_ROWS_TEMP = ".synth-rows.npy"


@dataclass(frozen=True)
class SynthPreset:
    """One generator setting, in SynthSAEBench's terms (its table of SynthSAEBench-16k's configuration)."""

    n_features: int
    d_in: int
    tokens: int  # rows written when --tokens is not given
    firing: tuple[float, float, float]  # Zipfian firing probabilities: exponent, p_max, p_min
    hierarchy: tuple[int, int, int]  # root nodes, branching factor, max depth; every parent's children exclusive
    correlation: tuple[int, float]  # low-rank correlation of firing: rank, scale
    orthogonalization: tuple[int, float] | None  # steps, learning rate of SAELens's orthogonalization; None: none
    mean_magnitude: tuple[float, float] = (5.0, 4.0)  # linear from the most to the least frequent feature
    std_magnitude: tuple[float, float] = (0.5, 0.5)  # per-feature std drawn from a folded normal (mean, std)
    about: str = ""

    def model_config(self, seed: int) -> SyntheticModelConfig:
        """SAELens's config of this preset; its seed fixes the dictionary, probabilities, hierarchy, correlation."""
        from sae_lens import synthetic as s

        return s.SyntheticModelConfig(
            num_features=self.n_features, hidden_dim=self.d_in,
            firing_probability=s.ZipfianFiringProbabilityConfig(*self.firing),
            hierarchy=s.HierarchyConfig(total_root_nodes=self.hierarchy[0], branching_factor=self.hierarchy[1],
                                        max_depth=self.hierarchy[2], mutually_exclusive_portion=1.0,
                                        compensate_probabilities=True),
            orthogonalization=None if self.orthogonalization is None else s.OrthogonalizationConfig(
                num_steps=self.orthogonalization[0], lr=self.orthogonalization[1]),
            correlation=s.LowRankCorrelationConfig(rank=self.correlation[0], correlation_scale=self.correlation[1]),
            mean_firing_magnitudes=s.LinearMagnitudeConfig(*self.mean_magnitude),
            std_firing_magnitudes=s.FoldedNormalMagnitudeConfig(*self.std_magnitude),
            seed=seed)


PRESETS = {
    # Seconds on a 2-core CPU. 2x superposition in 128 dimensions (mean max |cos| between true features 0.19) keeps
    # a truth-initialised SAE's F1 near 0.94, so ground-truth metrics separate good SAEs from bad ones; L0 about 6.
    "tiny": SynthPreset(256, 128, 127_000, (0.5, 0.3, 0.01), (16, 4, 1), (8, 0.1), (100, 0.01),
                        about="256 features in 128 dimensions, 16 exclusive families of 4, L0 ~6"),
    # Minutes on a CPU (about 2k rows/s on two cores): 16x superposition, deeper hierarchy, L0 ~24. Random unit
    # features, not orthogonalised: SAELens's orthogonalisation of 4096 features took 6 minutes here.
    "small": SynthPreset(4096, 256, 508_000, (0.5, 0.4, 1e-3), (32, 4, 2), (16, 0.1), None,
                         about="4096 features in 256 dimensions, 32 trees of depth 2, L0 ~24"),
    # SynthSAEBench-16k's published configuration (SAELens docs, "SynthSAEBench"): L0 ~34. A GPU preset.
    "synthsaebench-16k": SynthPreset(16384, 768, 5_080_000, (0.5, 0.4, 5e-4), (128, 4, 3), (25, 0.1), (100, 3e-4),
                                     about="SynthSAEBench-16k: 16384 features in 768 dimensions, L0 ~34"),
}


@dataclass
class SynthConfig:
    out: str = field(metadata={"help": "output directory (the cache, with its ground truth beside the shards)"})
    preset: str = field(default="tiny", metadata={
        "help": "generator setting: " + "; ".join(f"{k}: {p.about}" for k, p in PRESETS.items())})
    seed: int = field(default=0, metadata={
        "help": "seed of the dictionary, firing probabilities, hierarchy, correlation and the drawn rows"})
    tokens: int | None = field(default=None, metadata={
        "help": "activation rows to write, rounded up to whole contexts (unset: the preset's default)"})
    dtype: str = field(default="float16", metadata={"help": "storage dtype of the activations"})
    context: int = field(default=128, metadata={
        "help": "rows are grouped into contexts of context - 1 rows, the unit of the train / eval split"})
    shard_tokens: int = field(default=1 << 17, metadata={
        "help": "rows per shard file (rounded down to whole contexts)"})
    device: str = field(default="auto", metadata={
        "help": "torch device that draws the rows (the same seed draws other rows on another device type)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing cache at --out"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r} is not a preset; choose from {', '.join(PRESETS)}")
        if self.tokens is not None and self.tokens <= 0:
            raise ValueError(f"--tokens must be a positive number of rows, got {self.tokens}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")
        if self.context < 2:
            raise ValueError(f"--context must be at least 2 (a context holds context - 1 rows), got {self.context}")
        self.device = resolve_device(self.device)

    @property
    def n_rows(self) -> int:
        """Rows written: the asked-for count rounded up to whole contexts."""
        per = self.context - 1
        return -(-(self.tokens or PRESETS[self.preset].tokens) // per) * per


# --- the true codes of some rows --------------------------------------------------------------------------------

@dataclass
class TrueCodes:
    """Ground-truth feature activations of some rows, CSR: row i's features are features[indptr[i]:indptr[i+1]]."""

    indptr: np.ndarray  # [n + 1] int64
    features: np.ndarray  # [nnz] int32
    values: np.ndarray  # [nnz] float32
    n_features: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_dense(cls, acts: torch.Tensor) -> TrueCodes:
        rows, cols = torch.nonzero(acts, as_tuple=True)
        counts = torch.bincount(rows, minlength=acts.shape[0]).cpu().numpy()
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(indptr, cols.cpu().numpy().astype(np.int32), acts[rows, cols].float().cpu().numpy(), acts.shape[1])

    @classmethod
    def concat(cls, parts: list[TrueCodes]) -> TrueCodes:
        offsets = np.cumsum([0] + [p.indptr[-1] for p in parts[:-1]])
        indptr = np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(parts, offsets, strict=True)])
        return cls(indptr.astype(np.int64), np.concatenate([p.features for p in parts]),
                   np.concatenate([p.values for p in parts]), parts[0].n_features)

    def take(self, rows: np.ndarray) -> TrueCodes:
        """The codes of `rows` (local indices), in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        gather = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return TrueCodes(indptr, self.features[gather], self.values[gather], self.n_features)

    def dense(self, start: int = 0, stop: int | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Rows [start, stop) as a dense [n, n_features] float32 tensor."""
        stop = self.n_rows if stop is None else stop
        lo, hi = self.indptr[start], self.indptr[stop]
        row = np.repeat(np.arange(stop - start), np.diff(self.indptr[start : stop + 1]))
        out = torch.zeros(stop - start, self.n_features, device=device)
        out[torch.from_numpy(row).to(device), torch.from_numpy(self.features[lo:hi].astype(np.int64)).to(device)] = \
            torch.from_numpy(self.values[lo:hi]).to(device)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"indptr": torch.from_numpy(self.indptr), "features": torch.from_numpy(self.features),
                "values": torch.from_numpy(self.values)}


# --- drawing rows -------------------------------------------------------------------------------------------------

def build_model(preset: str, seed: int, device: str = "cpu", progress: bool = False) -> SyntheticModel:
    """SAELens's SyntheticModel of a preset and seed (its dictionary orthogonalised as the preset says)."""
    from sae_lens.synthetic import FeatureDictionary, SyntheticModel, orthogonal_initializer

    cfg = PRESETS[preset].model_config(seed)
    ortho = cfg.orthogonalization
    # Built here only to choose the progress bar; SyntheticModel builds the same dictionary from the same seed.
    initializer = None if ortho is None else orthogonal_initializer(ortho.num_steps, ortho.lr, progress,
                                                                    ortho.chunk_size)
    features = FeatureDictionary(cfg.num_features, cfg.hidden_dim, bias=cfg.bias, device=device, seed=cfg.seed,
                                 initializer=initializer)
    return SyntheticModel(cfg, feature_dict=features, device=device)


def chunk_seed(seed: int, chunk: int) -> int:
    """The torch seed of one chunk of rows: independent streams per (seed, chunk)."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.no_grad()
def draw_chunk(model: SyntheticModel, seed: int, chunk: int) -> tuple[torch.Tensor, TrueCodes]:
    """Rows [chunk * CHUNK_ROWS, (chunk + 1) * CHUNK_ROWS) of the stream: (x [CHUNK_ROWS, d_in] float32 on the CPU,
    their true codes). The global RNG state is left as it was."""
    device = torch.device(model.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(chunk_seed(seed, chunk))
        x, acts = model.sample_with_features(CHUNK_ROWS)
    return x.float().cpu(), TrueCodes.from_dense(acts)


def draw_rows(model: SyntheticModel, seed: int, start: int, stop: int) -> tuple[np.ndarray, TrueCodes]:
    """Rows [start, stop) of the stream as float32 [n, d_in], and their true codes (what `vsae synth` stored)."""
    first, last = start // CHUNK_ROWS, -(-stop // CHUNK_ROWS)
    xs, codes = zip(*(draw_chunk(model, seed, c) for c in range(first, last)), strict=True)
    offset = start - first * CHUNK_ROWS
    local = np.arange(offset, offset + stop - start)
    return torch.cat(xs).numpy()[local], TrueCodes.concat(list(codes)).take(local)


# --- writing the cache ----------------------------------------------------------------------------------------------

def gt_codes_file(index: int) -> str:
    return f"gt-codes-{index:05d}.safetensors"


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write atomically; the sha256 of what was written."""
    from safetensors.torch import save_file

    write_atomic(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))
    return sha256_file(path)


def _fill(cfg: SynthConfig, model: SyntheticModel, acts: np.ndarray, directory: Path) -> list[dict]:
    """Draw every row into `acts` (the cache dtype's memmap) and write the true-code files; their entries."""
    n = acts.shape[0]
    blocks, pending = [], []
    bar = tqdm(total=n, unit="row", unit_scale=True, desc="synth", disable=not cfg.progress)
    for chunk in range(-(-n // CHUNK_ROWS)):
        x, codes = draw_chunk(model, cfg.seed, chunk)
        lo = chunk * CHUNK_ROWS
        hi = min(n, lo + CHUNK_ROWS)
        acts[lo:hi] = x[: hi - lo].numpy()
        pending.append(codes.take(np.arange(hi - lo)))
        bar.update(hi - lo)
        if hi % GT_BLOCK_ROWS == 0 or hi == n:
            block = TrueCodes.concat(pending)
            name = gt_codes_file(len(blocks))
            blocks.append({"file": name, "rows": block.n_rows, "nnz": int(block.indptr[-1]),
                           "sha256": _write_safetensors(directory / name, block.tensors())})
            pending = []
    bar.close()
    return blocks


def _ground_truth_doc(cfg: SynthConfig, model: SyntheticModel, manifest: dict, blocks: list[dict],
                      weights_sha: str) -> dict:
    n_rows = sum(b["rows"] for b in blocks)
    return {
        "format": GROUND_TRUTH_FORMAT, "format_version": 1, "preset": cfg.preset,
        "preset_settings": asdict(PRESETS[cfg.preset]), "seed": cfg.seed,
        "synthetic_model_config": model.cfg.to_dict(),
        "hierarchy": model.hierarchy.to_dict() if model.hierarchy is not None else None,
        "versions": {"sae_lens": _version("sae-lens"), "torch": torch.__version__},
        "rows": {"n_rows": n_rows, "chunk_rows": CHUNK_ROWS, "device": cfg.device, "stored_dtype": cfg.dtype,
                 "seeding": "chunk c = rows [c * chunk_rows, (c + 1) * chunk_rows) drawn by "
                            "SyntheticModel.sample_with_features after torch.manual_seed(chunk_seed(seed, c))"},
        "n_features": model.cfg.num_features, "d_in": model.cfg.hidden_dim,
        "true_l0": sum(b["nnz"] for b in blocks) / n_rows,
        "weights": {"file": GROUND_TRUTH_WEIGHTS, "sha256": weights_sha},
        "codes": {"block_rows": GT_BLOCK_ROWS, "files": blocks},
        "cache_hash": manifest_hash(manifest),
    }


def _model_tensors(model: SyntheticModel) -> dict[str, torch.Tensor]:
    """The tensors SAELens's `SyntheticModel.save` writes, under its names."""
    out = {"feature_vectors": model.feature_dict.feature_vectors.data,
           "bias": model.feature_dict.bias.data,
           "firing_probabilities": model.activation_generator.firing_probabilities}
    if model.correlation_matrix is not None:
        out["correlation_factor"] = model.correlation_matrix.correlation_factor
        out["correlation_diag"] = model.correlation_matrix.correlation_diag
    return {k: v.detach().float().cpu() for k, v in out.items()}


@dataclass
class SynthReport:
    out: Path
    n_rows: int
    n_features: int
    d_in: int
    true_l0: float
    seconds: float

    def line(self) -> str:
        return (f"{self.n_rows:,} synthetic rows (d_in {self.d_in}, {self.n_features:,} true features, true L0 "
                f"{self.true_l0:.2f}) written to {self.out} with its ground truth in {self.seconds:.1f}s")


def synthesize(cfg: SynthConfig) -> SynthReport:
    """Write the cache `cfg.out`: rows drawn from the preset's SyntheticModel, and their ground truth beside them.

    Built in a temp directory beside `out` and renamed into place, so a killed run leaves no half cache; `out` is
    held (one writer, no reader) for the whole run."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    with DirLock(out, "cache"):
        _check_out(out, cfg.overwrite)
        for leftover in out.parent.glob(f".{out.name}.synth-*.tmp"):  # a killed run's: we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = out.with_name(f".{out.name}.synth-{os.getpid()}.tmp")
        tmp.mkdir(parents=True)
        try:
            doc = _build(cfg, tmp)
            _swap_in(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return SynthReport(out, cfg.n_rows, doc["n_features"], doc["d_in"], doc["true_l0"], time.perf_counter() - t0)


def _build(cfg: SynthConfig, directory: Path) -> dict:
    """The whole cache and its ground truth in `directory`; returns ground_truth.json's content."""
    model = build_model(cfg.preset, cfg.seed, cfg.device, cfg.progress)
    # The rows go through a memmap in the cache dtype, so that cache.py's one writer makes the shards and the
    # manifest without holding the cache in RAM (the disk holds the rows twice until the shards are written).
    acts = np.lib.format.open_memmap(directory / _ROWS_TEMP, mode="w+", dtype=np.dtype(cfg.dtype),
                                     shape=(cfg.n_rows, model.cfg.hidden_dim))
    blocks = _fill(cfg, model, acts, directory)
    description = {"kind": "synthetic", "name": f"synth-{cfg.preset}", "preset": cfg.preset, "seed": cfg.seed}
    manifest = write_array_cache(directory, acts, cfg.context, description, shard_tokens=cfg.shard_tokens)
    del acts
    (directory / _ROWS_TEMP).unlink()
    weights_sha = _write_safetensors(directory / GROUND_TRUTH_WEIGHTS, _model_tensors(model))
    doc = _ground_truth_doc(cfg, model, manifest, blocks, weights_sha)
    write_text_atomic(directory / GROUND_TRUTH_JSON, json.dumps(doc, indent=1) + "\n")
    return doc


def _check_out(out: Path, overwrite: bool) -> None:
    """`out` may be absent, an empty directory, or (with --overwrite) a cache; never anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CacheError(f"--out {out} is a file; choose a directory")
    if not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise CacheError(f"--out {out} holds files but no cache ({MANIFEST}); choose an empty or new directory")
    if not overwrite:
        raise CacheError(f"--out {out} holds a cache already; pass --overwrite to replace it, or choose another --out")


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished cache `tmp` to `out` (the caller holds its lock); an old cache there is moved aside first
    and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}.tmp")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


# --- reading the ground truth back ----------------------------------------------------------------------------------

class GroundTruthError(CacheError):
    """A cache without (usable) ground truth where ground truth was asked for."""


def has_ground_truth(cache_dir: str | Path) -> bool:
    return (Path(cache_dir) / GROUND_TRUTH_JSON).is_file()


def read_ground_truth(cache_dir: str | Path) -> dict:
    """ground_truth.json of a synthetic cache, checked against the cache it sits in."""
    from activations.cache import read_manifest

    path = Path(cache_dir) / GROUND_TRUTH_JSON
    if not path.is_file():
        raise GroundTruthError(f"{cache_dir}: no {GROUND_TRUTH_JSON}; only caches made by `vsae synth` carry "
                               f"ground truth")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GroundTruthError(f"{path}: unreadable ({e}); rebuild the cache with `vsae synth --overwrite`") from None
    if not isinstance(doc, dict) or doc.get("format") != GROUND_TRUTH_FORMAT:
        raise GroundTruthError(f"{path}: not a {GROUND_TRUTH_FORMAT} file; rebuild the cache with `vsae synth`")
    if doc.get("cache_hash") != manifest_hash(read_manifest(cache_dir)):
        raise GroundTruthError(f"{path}: written for other rows than this cache's manifest lists; rebuild the cache "
                               f"with `vsae synth --overwrite`")
    return doc


def _verified(cache_dir: Path, entries: list[dict]) -> None:
    bad = verify_files(cache_dir, {e["file"]: e["sha256"] for e in entries})
    if bad:
        raise GroundTruthError(f"cache {cache_dir}: {bad[0]} fails its sha256 check (corrupt); rebuild the cache "
                               f"with `vsae synth --overwrite`")


def ground_truth_tensors(cache_dir: str | Path) -> dict[str, torch.Tensor]:
    """ground_truth.safetensors (feature_vectors: the true dictionary [n_features, d_in], bias, firing_probabilities,
    correlation factors), checksum-verified."""
    from safetensors.torch import load_file

    cache_dir = Path(cache_dir)
    doc = read_ground_truth(cache_dir)
    _verified(cache_dir, [doc["weights"]])
    return load_file(str(cache_dir / GROUND_TRUTH_WEIGHTS))


def true_codes(cache_dir: str | Path, rows: np.ndarray) -> TrueCodes:
    """The true feature activations of the cache's global `rows`, in the order given."""
    from safetensors.torch import load_file

    cache_dir = Path(cache_dir)
    doc = read_ground_truth(cache_dir)
    rows = np.asarray(rows, dtype=np.int64)
    files, block_rows = doc["codes"]["files"], int(doc["codes"]["block_rows"])
    if rows.size and (rows.min() < 0 or rows.max() >= sum(f["rows"] for f in files)):
        raise ValueError(f"rows outside the cache's {sum(f['rows'] for f in files)} rows")
    block = rows // block_rows
    parts, order = [], []
    for b in np.unique(block):
        _verified(cache_dir, [files[b]])
        t = load_file(str(cache_dir / files[b]["file"]))
        codes = TrueCodes(t["indptr"].numpy(), t["features"].numpy(), t["values"].numpy(), int(doc["n_features"]))
        where = np.nonzero(block == b)[0]
        parts.append(codes.take(rows[where] - b * block_rows))
        order.append(where)
    if not parts:
        return TrueCodes(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), int(doc["n_features"]))
    return TrueCodes.concat(parts).take(np.argsort(np.concatenate(order), kind="stable"))


def synthetic_info(cache_dir: str | Path) -> dict[str, Any]:
    """A short description of a synthetic cache's generator, for pages and reports."""
    doc = read_ground_truth(cache_dir)
    return {k: doc[k] for k in ("preset", "seed", "n_features", "d_in", "true_l0")}
