"""Mean-pooled model activations over real tokens, and the L1 logistic-regression probes SCR and TPP train on them.

Pooling follows SAEBench (METRICS.md section 3, steps 1-3): texts are tokenized without special tokens, cut to
`context` tokens (the start kept), padded on the right, run through the model with no attention mask (causal
attention never looks right, so padding cannot change real positions), and the activations at `hook_name` are
averaged over the positions whose token is not BOS, EOS or PAD. Deliberate differences:
- SAEBench finds real positions by "activations sum to a nonzero value" after zeroing masked ones; we use the
  token ids themselves, which is what that heuristic approximates.
- `ablate` (SAE latent ablation, evals/scr_tpp.py) is applied to real positions only, so padded positions never
  enter the mean. SAEBench runs padded (zero) positions through the SAE too and keeps whatever the ablation leaves
  there (METRICS.md section 3, step 7 pitfall); masking after ablation is the clean version (DESIGN.md).
- `prepend_bos=True` puts BOS before every text, as the embedded model saw in training (every training context
  starts with BOS); SAEBench adds BOS only where the tokenizer does (Gemma yes, Pythia no). BOS is masked either way.

Only real tokens are kept (`TokenActivations`: a flat [tokens, d] tensor plus per-text offsets), so activations
are computed once per (model, hook, set) and reused for every SAE, as SAEBench caches them.

`cached_token_activations` keeps them on disk too (one safetensors file per key, texts and settings), so ten runs
or a study pay the forward passes once. Stored as computed, float32: float16 would halve the files (the offline
sets' five files hold 2.6M tokens, 1.3 GB at d_model 128) but moved clean probe accuracies by up to 0.003 on the
offline sets (measured on the embedded model), and hits must give exactly what a fresh computation gives.
Loading a 350 MB file and checking it against the texts takes about 3 s, against 90-180 s of forward pass on
the shared 2-core CPU.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from torch import Tensor
from tqdm.auto import tqdm

from activations.atomic import write_atomic
from activations.models import check_hook, special_token_ids, stop_layer
from vsae.firing import special_mask

Ablation = Callable[[Tensor], Tensor]  # [tokens, d] -> [tokens, d]
# Inverse L1 strengths tried on the validation split; SAEBench's fixed l1_penalty=1e-3 under AdamW has no exact
# counterpart, so the strength is chosen per probe instead (selection on validation, never on test).
DEFAULT_CS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass
class TokenActivations:
    """Hook activations at the real tokens of n texts: text i owns rows `acts[offsets[i]:offsets[i + 1]]`."""

    acts: Tensor  # [tokens, d]
    offsets: Tensor  # [n + 1] int64, offsets[0] = 0

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def counts(self) -> Tensor:
        """Real tokens per text [n]."""
        return self.offsets.diff()

    def select(self, rows: Sequence[int] | np.ndarray | Tensor) -> TokenActivations:
        """The texts `rows`, in that order, as a new contiguous `TokenActivations`."""
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        counts = self.counts[rows]
        offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
        offsets[1:] = counts.cumsum(0)
        # Token index of every kept row: each text's start repeated over its length, plus 0..len-1.
        starts = torch.repeat_interleave(self.offsets[rows], counts)
        within = torch.arange(int(offsets[-1])) - torch.repeat_interleave(offsets[:-1], counts)
        return TokenActivations(self.acts[starts + within], offsets)

    def batches(self, batch_tokens: int = 1 << 13) -> Iterator[tuple[slice, Tensor, Tensor]]:
        """(text slice, its token rows [t, d], its counts [b]) in batches of about `batch_tokens` tokens."""
        counts, offsets = self.counts, self.offsets.tolist()
        i, n = 0, len(self)
        while i < n:
            # At least one text per batch; then as many as fit in batch_tokens.
            j = max(i + 1, int(np.searchsorted(offsets, offsets[i] + batch_tokens, side="right")) - 1)
            j = min(j, n)
            yield slice(i, j), self.acts[offsets[i] : offsets[j]], counts[i:j]
            i = j

    def pooled(self, ablate: Ablation | None = None, batch_tokens: int = 1 << 13) -> Tensor:
        """Mean over each text's real tokens [n, d], after `ablate` when given (float32)."""
        out = torch.zeros(len(self), self.acts.shape[-1])
        for rows, acts, counts in self.batches(batch_tokens):
            out[rows] = segment_mean(acts if ablate is None else ablate(acts), counts)
        return out


def segment_mean(acts: Tensor, counts: Tensor) -> Tensor:
    """Mean of consecutive row groups: acts [sum(counts), d] -> [len(counts), d], float32 on CPU.

    A text with no real token (empty string) pools to 0, where SAEBench would divide by zero.
    """
    counts = counts.to(acts.device)
    segment = torch.repeat_interleave(torch.arange(len(counts), device=acts.device), counts)
    sums = torch.zeros(len(counts), acts.shape[-1], dtype=torch.float32, device=acts.device)
    sums.index_add_(0, segment, acts.float())
    return (sums / counts.clamp(min=1)[:, None].float()).cpu()


def _tokenize(model, texts: Sequence[str], context: int, prepend_bos: bool) -> list[list[int]]:
    """Token ids per text: optional BOS, then the text's tokens, `context` in all (the start kept, as SAEBench)."""
    tokenizer = model.tokenizer
    context = min(context, model.cfg.n_ctx)  # a model with a shorter window than SAEBench's 128 (the tiny test one)
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise ValueError("prepend_bos=True, but the tokenizer has no BOS token")
    body = context - int(prepend_bos)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []
    return [([bos] if prepend_bos else []) + seq[:body] for seq in ids]


def _hook_batches(
    model, hook_name: str, ids: list[list[int]], batch_size: int, device: str, progress: bool,
) -> Iterator[tuple[np.ndarray, Tensor, Tensor]]:
    """(text indices [b], activations at their real tokens [t, d] on `device`, real-token counts [b]) per batch.

    Texts are batched in order of length, so a batch pads little; indices say where each result belongs.
    """
    check_hook(model, hook_name)
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    special = torch.tensor(sorted(special_token_ids(tokenizer)), dtype=torch.long)
    layer = stop_layer(model, hook_name)
    order = np.argsort([len(seq) for seq in ids], kind="stable")
    grabbed: list[Tensor] = []

    def grab(act: Tensor, hook) -> None:
        grabbed.append(act)

    with torch.no_grad(), model.hooks(fwd_hooks=[(hook_name, grab)]):
        for start in tqdm(range(0, len(ids), batch_size), desc=f"activations {hook_name}", disable=not progress):
            rows = order[start : start + batch_size]
            width = max(1, max(len(ids[r]) for r in rows))
            tokens = torch.full((len(rows), width), pad, dtype=torch.long)
            for i, r in enumerate(rows):
                tokens[i, : len(ids[r])] = torch.tensor(ids[r], dtype=torch.long)
            lengths = torch.tensor([len(ids[r]) for r in rows])
            real = (torch.arange(width)[None, :] < lengths[:, None]) & ~special_mask(tokens, special)
            grabbed.clear()
            model(tokens.to(device), stop_at_layer=layer)
            yield rows, grabbed[0][real.to(device)], real.sum(1)


def _real_counts(model, ids: list[list[int]]) -> Tensor:
    special = special_token_ids(model.tokenizer)
    return torch.tensor([sum(t not in special for t in seq) for seq in ids], dtype=torch.long)


def token_activations(
    model,
    hook_name: str,
    texts: Sequence[str],
    context: int = 128,
    batch_size: int = 64,
    device: str = "cpu",
    prepend_bos: bool = True,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> TokenActivations:
    """Activations of `model` at `hook_name` at every real (not BOS/EOS/PAD) token of `texts`, on the CPU."""
    ids = _tokenize(model, texts, context, prepend_bos)
    counts = _real_counts(model, ids)
    offsets = torch.zeros(len(ids) + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    acts = torch.empty(int(offsets[-1]), model.cfg.d_model, dtype=dtype)
    for rows, batch, batch_counts in _hook_batches(model, hook_name, ids, batch_size, device, progress):
        batch = batch.to("cpu", dtype)
        start = 0
        for r, n in zip(rows.tolist(), batch_counts.tolist(), strict=True):
            acts[offsets[r] : offsets[r] + n] = batch[start : start + n]
            start += n
    return TokenActivations(acts, offsets)


def pooled_activations(
    model,
    hook_name: str,
    texts: Sequence[str],
    context: int = 128,
    batch_size: int = 64,
    device: str = "cpu",
    prepend_bos: bool = True,
    ablate: Ablation | None = None,
    progress: bool = True,
) -> Tensor:
    """Per-text mean of the `hook_name` activations over real tokens [len(texts), d] (float32, CPU).

    `ablate` maps the real tokens' activations [t, d] to replacements before pooling (e.g. SAE latent ablation
    with the error term added back, `evals.scr_tpp.sae_ablation`); padded positions are never ablated or pooled.
    """
    ids = _tokenize(model, texts, context, prepend_bos)
    out = torch.zeros(len(ids), model.cfg.d_model)
    for rows, acts, counts in _hook_batches(model, hook_name, ids, batch_size, device, progress):
        out[torch.as_tensor(rows)] = segment_mean(acts if ablate is None else ablate(acts), counts)
    return out


def train_probe(
    X: Tensor | np.ndarray,
    y: np.ndarray,
    X_val: Tensor | np.ndarray,
    y_val: np.ndarray,
    seed: int = 42,
    Cs: Sequence[float] = DEFAULT_CS,
    standardize: bool = True,
) -> LogisticRegression:
    """An L1-regularised logistic-regression probe, its inverse strength C chosen by validation accuracy.

    Stands for SAEBench's probe (a linear layer with BCE + 1e-3 * |w|_1 under AdamW, 20 epochs), with one
    deliberate change: SAEBench keeps the epoch with the best *test* accuracy; here C is picked on the validation
    split and the test set is never seen. Ties go to the larger C: SAEBench's penalty is weak, and a probe that
    separates its data by one attribute must still weigh the other for SCR to have anything to measure.
    Features are standardised for the fit (`standardize=False` penalises raw weights, as SAEBench does), so the
    penalty treats dimensions alike and liblinear converges (3x faster here); the weights are then folded back,
    so the returned model's `coef_` / `intercept_` act on raw activations (`predict(X)`; `coef_` is the probe
    direction latent attribution uses). The chosen C and the validation accuracy of each C are stored as
    `probe.C_` and `probe.validation_accuracy_`.
    """
    X, X_val = _numpy(X), _numpy(X_val)
    y, y_val = np.asarray(y), np.asarray(y_val)
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError(f"a probe trains on labels 0 and 1, both present; got {np.unique(y).tolist()}")
    mean, scale = (X.mean(0), X.std(0)) if standardize else (np.zeros(X.shape[1]), np.ones(X.shape[1]))
    scale[scale == 0] = 1.0  # a constant dimension carries nothing; leave it unscaled
    Xs, Xs_val = (X - mean) / scale, (X_val - mean) / scale
    best, best_acc, accs = None, -1.0, {}
    for C in sorted(Cs):
        probe = _l1_logistic_regression(C, seed)
        probe.fit(Xs, y)
        acc = float((probe.predict(Xs_val) == y_val).mean())
        accs[C] = acc
        if acc >= best_acc:  # ties go to the larger C
            best, best_acc = probe, acc
    assert best is not None, "Cs must not be empty"
    # w.(x - mean)/scale + b = (w/scale).x + (b - w.(mean/scale)): the same decisions on raw activations.
    best.coef_ = best.coef_ / scale
    best.intercept_ = best.intercept_ - best.coef_ @ mean
    best.C_ = best.C
    best.validation_accuracy_ = accs
    return best


def _l1_logistic_regression(C: float, seed: int) -> LogisticRegression:
    # scikit-learn 1.8 deprecates penalty="l1" for l1_ratio=1; older versions ignore l1_ratio without it.
    if tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 8):
        return LogisticRegression(l1_ratio=1.0, C=C, solver="liblinear", random_state=seed, max_iter=1000)
    return LogisticRegression(penalty="l1", C=C, solver="liblinear", random_state=seed, max_iter=1000)


def probe_accuracy(probe: LogisticRegression, X: Tensor | np.ndarray, y: np.ndarray) -> float:
    """Fraction of `y` the probe gets right (decision > 0 is class 1, as SAEBench's logit > 0)."""
    return float((probe.predict(_numpy(X)) == np.asarray(y)).mean())


def _numpy(X: Tensor | np.ndarray) -> np.ndarray:
    return X.detach().cpu().double().numpy() if isinstance(X, Tensor) else np.asarray(X, dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------
# On-disk store of labelled texts' token activations (computed once per model, hook, set and sizes)

STORE_FORMAT = "vsae-labelled-activations"
STORE_VERSION = 1
STORE_DTYPE = torch.float32  # the computed dtype; float16 moved probe accuracies (module docstring)
# token_activations arguments that change its result; the others (batch_size, device, progress) do not.
RESULT_KWARGS = ("context", "prepend_bos", "dtype")
_warned_stores: set[str] = set()


def activations_digest(key: dict, texts: Sequence[str], kwargs: dict) -> str:
    """sha256 of the key (JSON, sorted keys), the texts (each length-prefixed, so no two lists collide) and the
    result-changing `token_activations` arguments, with their defaults filled in."""
    sig = inspect.signature(token_activations)
    settings = {name: kwargs.get(name, sig.parameters[name].default) for name in RESULT_KWARGS}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    digest.update(json.dumps({k: str(v) for k, v in settings.items()}, sort_keys=True).encode())
    for text in texts:
        raw = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return digest.hexdigest()


def cached_token_activations(
    model, hook_name: str, texts: Sequence[str], *, store: Path | None, key: dict, **token_activations_kwargs: Any
) -> TokenActivations:
    """`token_activations(model, hook_name, texts, **kwargs)`, kept in `store` so later calls skip the forward pass.

    The file is `store / f"{digest}.safetensors"` (`activations_digest` of `key`, the texts and the arguments
    that change the result); `key` should name the model, the hook and the set. A hit is checked against the
    texts (shapes, dtypes, real-token count per text); a corrupt or mismatched file is recomputed and replaced
    with a one-line warning. `store=None` only computes; an unwritable store computes and warns once.
    """
    if store is None:
        return token_activations(model, hook_name, texts, **token_activations_kwargs)
    unknown = set(token_activations_kwargs) - set(inspect.signature(token_activations).parameters)
    if unknown:
        raise TypeError(f"cached_token_activations got unknown token_activations arguments {sorted(unknown)}")
    path = Path(store) / f"{activations_digest(key, texts, token_activations_kwargs)}.safetensors"
    if path.exists():
        expected = _expected_counts(model, texts, token_activations_kwargs)
        problem, tokens = _load_stored(path, expected, model.cfg.d_model)
        if problem is None:
            return tokens
        warnings.warn(f"labelled activations {path} {problem}: recomputing and replacing it", stacklevel=2)
    tokens = token_activations(model, hook_name, texts, **token_activations_kwargs)
    _store(path, tokens, key)
    return tokens


def _expected_counts(model, texts: Sequence[str], kwargs: dict) -> Tensor:
    sig = inspect.signature(token_activations)
    context, prepend_bos = (kwargs.get(n, sig.parameters[n].default) for n in ("context", "prepend_bos"))
    return _real_counts(model, _tokenize(model, texts, context, prepend_bos))


def _load_stored(path: Path, counts: Tensor, d_model: int) -> tuple[str | None, TokenActivations | None]:
    """(None, activations) for a sound file, else (what is wrong with it, None)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for a truncated header or body)
        return f"is unreadable ({type(e).__name__}: {str(e)[:80]})", None
    acts, offsets = tensors.get("acts"), tensors.get("offsets")
    if meta.get("format") != STORE_FORMAT or meta.get("version") != str(STORE_VERSION):
        return f"is not a {STORE_FORMAT} v{STORE_VERSION} file", None
    if acts is None or offsets is None or acts.dtype != STORE_DTYPE or offsets.dtype != torch.long:
        return "lacks float acts / int64 offsets", None
    if acts.ndim != 2 or acts.shape[1] != d_model or offsets.shape != (len(counts) + 1,):
        return f"has shapes acts {tuple(acts.shape)}, offsets {tuple(offsets.shape)} for {len(counts)} texts", None
    if int(offsets[0]) != 0 or not torch.equal(offsets.diff(), counts) or int(offsets[-1]) != acts.shape[0]:
        return "does not match the texts' real-token counts", None
    if not torch.isfinite(acts).all():
        return "holds non-finite activations", None
    return None, TokenActivations(acts, offsets)


def _store(path: Path, tokens: TokenActivations, key: dict) -> None:
    """Write atomically; a store that cannot be written (read-only, full, not a directory) warns once."""
    tensors = {"acts": tokens.acts.to(STORE_DTYPE).contiguous(), "offsets": tokens.offsets.contiguous()}
    meta = {"format": STORE_FORMAT, "version": str(STORE_VERSION), "key": json.dumps(key, sort_keys=True, default=str)}
    try:
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    except OSError as e:
        store = str(path.parent)
        if store not in _warned_stores:
            _warned_stores.add(store)
            warnings.warn(f"cannot write labelled activations to {store} ({e.strerror or e}); computing them "
                          f"on every eval instead", stacklevel=3)
