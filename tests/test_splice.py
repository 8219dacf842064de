"""evals.splice on the tiny GPT-NeoX: exact identity and zero SAEs, special-token handling, and agreement with
SAELens 6.54's own `run_evals` on the same SAE (loaded by `SAE.load_from_disk`) and the same token batches."""

import numpy as np
import pytest
import torch

from activations.models import load_local_checkpoint, stop_layer
from activations.tokens import pack_contexts
from evals.metrics import CoreAccumulator
from evals.splice import counted_mask, special_token_ids, splice_losses
from tests.conftest import CORPUS_TEXT
from vsae.checkpoint import SAEWeights, write_sae
from vsae.firing import FiringCounter

HOOK = "blocks.1.hook_resid_post"
CTX = 32
D_IN = 32  # the tiny model's hidden size


def model_with_fitted_readout(checkpoint):
    """The tiny random model with its unembedding refitted (ridge regression onto the next token) on the test
    contexts. A random model predicts nearly uniformly, so zero-ablating its residual changes the CE by ~0 and
    the CE score would be 0/0; with a fitted readout CE_zero - CE_clean is about 1.7 nats."""
    model = load_local_checkpoint(checkpoint)
    tokens = corpus_tokens(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=["unembed.hook_in"])
        feats = cache["unembed.hook_in"][:, :-1].reshape(-1, D_IN).double()
        feats = torch.cat([feats, torch.ones(feats.shape[0], 1, dtype=torch.float64)], dim=1)  # bias column
        targets = torch.nn.functional.one_hot(tokens[:, 1:].reshape(-1), model.cfg.d_vocab).double()
        w = torch.linalg.solve(feats.T @ feats + 1e-3 * torch.eye(D_IN + 1, dtype=torch.float64), feats.T @ targets)
        w = 10.0 * w  # a temperature: sharper than the least-squares fit, still far from one-hot
        model.unembed.W_U.copy_(w[:D_IN])
        model.unembed.b_U.copy_(w[D_IN])
    return model


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return model_with_fitted_readout(tiny_checkpoint)


def corpus_tokens(model, n: int = 24) -> torch.Tensor:
    """[n, CTX] contexts of the test corpus: BOS at position 0 and end-of-text between documents (mid-row too)."""
    docs = [f"Document {i}. {text[: 150 + 40 * i]}" for i, text in enumerate(CORPUS_TEXT * 6)]
    rows = list(pack_contexts(docs, model.tokenizer, CTX))
    assert len(rows) >= n
    return torch.from_numpy(np.stack(rows[:n])).long()


def identity_sae(d: int) -> SAEWeights:
    """Exact identity through ReLU + TopK: z = [ReLU(x), ReLU(-x)], k = d keeps every nonzero, x_hat = z+ - z-."""
    eye = torch.eye(d)
    return SAEWeights(
        W_enc=torch.cat([eye, -eye], dim=1), b_enc=torch.zeros(2 * d), W_dec=torch.cat([eye, -eye], dim=0),
        b_dec=torch.zeros(d), k=d, apply_b_dec_to_input=False,
    )


def zero_sae(d: int, d_sae: int = 16) -> SAEWeights:
    return SAEWeights(
        W_enc=torch.zeros(d, d_sae), b_enc=torch.zeros(d_sae), W_dec=torch.zeros(d_sae, d), b_dec=torch.zeros(d),
        k=4, apply_b_dec_to_input=False,
    )


def hook_activations(model, tokens: torch.Tensor) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK], stop_at_layer=stop_layer(model, HOOK))
    return cache[HOOK]


def fitted_sae(model, tokens: torch.Tensor, d_sae: int = 128, k: int = 8, seed: int = 0) -> SAEWeights:
    """A TopK SAE that reconstructs partly (EV about 0.34 here): latents on the +/- principal axes of the
    activations plus random unit directions, all competing in the TopK; W_enc = W_dec^T up to the decoder
    norms, which are spread over 0.5..1.5 (not unit); b_dec = the activation mean, subtracted from the input."""
    with torch.no_grad():
        x = hook_activations(model, tokens).reshape(-1, D_IN)
    g = torch.Generator().manual_seed(seed)
    mean = x.mean(dim=0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    rows = torch.cat([v, -v, torch.nn.functional.normalize(torch.randn(d_sae - 2 * D_IN, D_IN, generator=g), dim=-1)])
    norms = 0.5 + torch.rand(d_sae, 1, generator=g)
    return SAEWeights(
        W_enc=(rows / norms).T.contiguous(), b_enc=torch.zeros(d_sae), W_dec=rows * norms, b_dec=mean,
        k=k, apply_b_dec_to_input=True,
    )


SPECIAL = {0, 1}  # <|endoftext|> (BOS = EOS) and <|padding|>


def test_special_ids_match_sae_lens(model):
    from sae_lens.util import get_special_token_ids

    assert special_token_ids(model.tokenizer) == set(get_special_token_ids(model.tokenizer)) == SPECIAL


def test_identity_sae_scores_one(model):
    tokens = corpus_tokens(model, 8)
    r = splice_losses(model, HOOK, identity_sae(D_IN), tokens, SPECIAL, batch_size=4, progress=False)
    assert r["kl_sae"] == pytest.approx(0.0, abs=1e-7)
    assert r["ce_sae"] == pytest.approx(r["ce_clean"], abs=1e-6)
    assert r["ce_score"] == pytest.approx(1.0, abs=1e-5)
    assert r["kl_score"] == pytest.approx(1.0, abs=1e-5)
    assert r["ce_zero"] > r["ce_clean"] and r["kl_zero"] > 0
    mask = counted_mask(tokens, SPECIAL)
    assert r["n_tokens"] == int(mask[:, :-1].sum()) and r["n_tokens_kl"] == int(mask.sum())
    assert r["n_tokens"] < tokens.shape[0] * (CTX - 1)  # BOS and mid-row end-of-text were left out


def test_zero_sae_scores_zero_without_special_tokens(model):
    # With no special token, the all-zero SAE puts 0 at every position: exactly the zero ablation.
    tokens = torch.randint(2, model.cfg.d_vocab, (6, CTX), generator=torch.Generator().manual_seed(0))
    r = splice_losses(model, HOOK, zero_sae(D_IN), tokens, SPECIAL, batch_size=4, progress=False)
    assert r["ce_sae"] == r["ce_zero"] and r["kl_sae"] == r["kl_zero"]
    assert r["ce_score"] == pytest.approx(0.0, abs=1e-6)
    assert r["kl_score"] == pytest.approx(0.0, abs=1e-6)


def test_special_positions_are_left_unreplaced(model):
    # Zero SAE with BOS/EOS in the rows: the splice keeps the special positions' activations (unlike the
    # zero ablation, which zeroes every position). Check CE and KL against a hand-written hook.
    tokens = corpus_tokens(model, 6)
    r = splice_losses(model, HOOK, zero_sae(D_IN), tokens, SPECIAL, batch_size=4, progress=False)
    mask = counted_mask(tokens, SPECIAL)
    with torch.no_grad():
        clean = model(tokens).log_softmax(-1)
        kept = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook: a * ~mask[..., None])]).log_softmax(-1)
    ce = -kept[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    kl = (clean.exp() * (clean - kept)).sum(-1)
    assert r["ce_sae"] == pytest.approx(ce[mask[:, :-1]].mean().item(), rel=1e-5)
    assert r["kl_sae"] == pytest.approx(kl[mask].mean().item(), rel=1e-4)
    assert r["ce_sae"] != r["ce_zero"]


class _TokenStore:
    """The parts of SAELens's ActivationsStore that `run_evals` uses: fixed token batches, in order."""

    def __init__(self, tokens: torch.Tensor, batch_size: int) -> None:
        self.batches = list(tokens.split(batch_size))
        self.store_batch_size_prompts = batch_size
        self.context_size = tokens.shape[1]
        self.i = 0

    def get_batch_tokens(self, batch_size: int) -> torch.Tensor:
        assert batch_size == self.store_batch_size_prompts
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def reset_input_dataset(self) -> None:
        self.i = 0


def vsae_core_metrics(model, sae: SAEWeights, tokens: torch.Tensor, batch_size: int) -> dict:
    """What an eval driver does with the pure metrics: per batch, hook activations, drop special rows, update."""
    acc, firing = CoreAccumulator(), FiringCounter(sae.d_sae)
    with torch.no_grad():
        for batch in tokens.split(batch_size):
            x = hook_activations(model, batch)[counted_mask(batch, SPECIAL)]
            z = sae.encode(x)
            acc.update(x, sae.decode(z), z)
            firing.update(z)
    return acc.result() | {"feature_density": firing.result()["density"]}


def test_agrees_with_sae_lens_run_evals(model, tmp_path):
    from sae_lens import SAE
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    tokens, batch_size = corpus_tokens(model, 24), 8
    sae = fitted_sae(model, tokens)
    meta = {"model_name": "tiny-neox", "hook_name": HOOK, "context_size": CTX, "dataset_path": "test corpus"}
    write_sae(tmp_path, sae, meta)
    theirs = SAE.load_from_disk(tmp_path)
    n_batches = tokens.shape[0] // batch_size
    config = EvalConfig(
        batch_size_prompts=batch_size, n_eval_reconstruction_batches=n_batches, compute_kl=True,
        compute_ce_loss=True, n_eval_sparsity_variance_batches=n_batches, compute_l2_norms=True,
        compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=True,
    )
    metrics, features = run_evals(
        theirs, _TokenStore(tokens, batch_size), model, ActivationScaler(), config, exclude_special_tokens=True
    )
    sl = {key: value for group in metrics.values() for key, value in group.items()}

    ours = vsae_core_metrics(model, sae, tokens, batch_size)
    ours |= splice_losses(model, HOOK, sae, tokens, SPECIAL, batch_size=batch_size, progress=False)
    pairs = {  # vsae name: SAELens name
        "l0": "l0", "mse": "mse", "explained_variance": "explained_variance",
        "explained_variance_legacy": "explained_variance_legacy", "cosine_similarity": "cossim",
        "relative_reconstruction_bias": "relative_reconstruction_bias", "ce_clean": "ce_loss_without_sae",
        "ce_sae": "ce_loss_with_sae", "ce_zero": "ce_loss_with_ablation", "ce_score": "ce_loss_score",
        "kl_sae": "kl_div_with_sae", "kl_zero": "kl_div_with_ablation", "kl_score": "kl_div_score",
    }
    for name, sl_name in pairs.items():
        print(f"{name:28s} vsae {ours[name]: .7f}  SAELens {sl[sl_name]: .7f}")
        assert ours[name] == pytest.approx(sl[sl_name], abs=1e-5, rel=1e-5), name  # seen: ~1e-7 apart
    torch.testing.assert_close(ours["feature_density"], torch.tensor(features["feature_density"], dtype=torch.float64))
    # Not a trivial SAE: the scores and EV sit well inside (0, 1).
    assert 0.05 < ours["ce_score"] < 0.95 and 0.05 < ours["kl_score"] < 0.95
    assert 0 < ours["explained_variance"] < 1 and ours["l0"] == pytest.approx(sae.k, abs=1)
