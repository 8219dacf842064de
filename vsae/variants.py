"""SAE variants: the TopK SAE (Gao et al. 2024) and the variational TopK SAE (Baker & Li 2025).

A variant differs from the TopK base only where the method differs: how the
training latents are drawn and which extra loss terms it adds. Everything
else (pre-bias, decoder constraint, AuxK, sparse decoding) is a shared switch.
Adding a variant: a subclass here plus one line in `VARIANTS`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from vsae.checkpoint import SAEWeights
from vsae.code import TopKCode, encode_topk
from vsae.config import SAEConfig
from vsae.sparse import sparse_decode, sparse_encode

# AuxK runs as dense products over its candidate columns while there are at most this many per k_aux picked,
# through the sparse kernels beyond (the two cross at about 8-9 on the 2-core CPU: benchmarks/auxk_paths.py).
AUX_DENSE_MAX = 8


class TrainingLatents(NamedTuple):
    """A training batch's latents: the k kept values and ids [B, k], the pre-activations, extra loss terms."""

    vals: Tensor  # with gradients; a vSAE's may be negative
    idx: Tensor
    pre: Tensor  # [B, d_sae]
    terms: dict[str, Tensor]  # each already weighted


class TrainStepOutput(NamedTuple):
    """What `loss_terms` hands the trainer: the weighted loss terms, the training latents (detached) and `code`,
    the deterministic TopK code the exported SAE computes for the batch, which every firing statistic counts."""

    terms: dict[str, Tensor]
    vals: Tensor
    idx: Tensor
    code: TopKCode


class TopKSAE(nn.Module):
    """z = TopK(ReLU(W_enc (x - b_dec) + b_enc)); x_hat = z W_dec + b_dec; loss = MSE + AuxK."""

    # SAEConfig fields that act only on this variant: elsewhere they change nothing, so a study neither trains
    # nor names runs that differ only in them.
    own_fields: tuple[str, ...] = ()

    @staticmethod
    def inert(cfg: SAEConfig) -> str | None:
        """Why this combination of the variant's own switches cannot change what is trained (None when it can);
        a study skips such runs instead of training a copy."""
        return None

    def __init__(self, cfg: SAEConfig, d_in: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        cfg.validate(d_in)
        self.cfg, self.d_in, self.k = cfg, d_in, cfg.k
        self.k_aux = cfg.k_aux or d_in // 2
        W_dec = torch.randn(cfg.d_sae, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if cfg.decoder == "free":
            W_dec *= 0.1  # the paper's vSAE code: 0.1-norm rows, never renormalised
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())  # tied init
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.sparse = True  # sparse encode/decode ops (CPU); dense matmuls otherwise (CUDA)

    # --- shared pieces -----------------------------------------------------------------
    def encoder_input(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.cfg.pre_bias else x

    def pre_activations(self, x_in: Tensor, out: Tensor | None = None) -> Tensor:
        # addmm fuses the bias into the GEMM: a separate add over [B, d_sae] costs a third as much again.
        return torch.addmm(self.b_enc.to(x_in.dtype), x_in, self.W_enc.to(x_in.dtype), out=out)

    @torch.no_grad()
    def selection_pre(self, x_in: Tensor) -> Tensor:
        """`pre_activations` without gradient, for choosing the TopK (sparse mode), written into memory kept
        from step to step (`_scratch`).

        A fresh [B, d_sae] result is new memory on every step, and on the CPU its page faults cost about half as
        much again as the GEMM (B 4096, d_sae 8192: addmm 216 ms fresh, 157 ms into kept memory). The result is
        overwritten by the next call, of this SAE or another, so nothing may hold it past the step.
        """
        if torch.is_autocast_enabled(x_in.device.type):
            return self.pre_activations(x_in)  # autocast leaves out= variants alone: keep its dtype choice
        return self.pre_activations(x_in, out=_scratch((x_in.shape[0], self.cfg.d_sae), x_in.dtype, x_in.device))

    def selected_pre(self, x_in: Tensor, idx: Tensor, pre: Tensor) -> Tensor:
        """Pre-activations of the selected latents, with gradients to the encoder.

        Sparse mode recomputes just these B x k dot products, so the backward never
        forms a dense [B, d_sae] gradient; a `pre` that already carries gradients is
        gathered from instead.
        """
        if pre.requires_grad:
            return pre.gather(1, idx)
        if self.sparse:
            return sparse_encode(x_in, self.W_enc, self.b_enc, idx)
        return self.pre_activations(x_in).gather(1, idx)

    def decode_sparse(self, idx: Tensor, vals: Tensor) -> Tensor:
        """sum_j vals[:, j] * W_dec[idx[:, j]] (no bias)."""
        if self.sparse:
            return sparse_decode(idx, vals, self.W_dec)
        z = torch.zeros(vals.shape[0], self.cfg.d_sae, dtype=vals.dtype, device=vals.device)
        return z.scatter(1, idx, vals) @ self.W_dec.to(vals.dtype)

    @torch.no_grad()
    def encode(self, x: Tensor) -> TopKCode:
        """Deterministic evaluation encoding, for every variant: the code the exported SAE computes."""
        return encode_topk(x, self.W_enc, self.b_enc, self.b_dec, self.k, self.cfg.pre_bias)

    def reconstruct(self, x: Tensor) -> Tensor:
        vals, idx = self.encode(x)
        return self.decode_sparse(idx, vals) + self.b_dec

    # --- what a variant may change -----------------------------------------------------
    def training_latents(self, x_in: Tensor, progress: float, generator: torch.Generator | None
                         ) -> TrainingLatents:
        """The latents of a training batch, and the variant's extra loss terms."""
        pre = self.selection_pre(x_in) if self.sparse else self.pre_activations(x_in)
        idx = pre.detach().topk(self.k, dim=1, sorted=False).indices
        vals = self.selected_pre(x_in, idx, pre).relu()
        return TrainingLatents(vals, idx, pre, {})

    # --- the loss ----------------------------------------------------------------------
    def loss_terms(self, x: Tensor, progress: float, dead: Tensor | None,
                   generator: torch.Generator | None = None, candidates: Tensor | None = None) -> TrainStepOutput:
        """Loss terms (each already weighted), plus the batch's code (vals, idx) for statistics.

        `progress` is the fraction of the run done (for warm-ups); `dead` a bool mask of latents that have not
        fired for `dead_after` tokens (for AuxK); `candidates` the ids of every latent that may be dead (a superset
        of `dead`'s, fixed for many steps, so AuxK runs without reading `dead` on the host: see `aux_loss`).
        """
        x_in = self.encoder_input(x)
        vals, idx, pre, terms = self.training_latents(x_in, progress, generator)
        x_hat = self.decode_sparse(idx, vals) + self.b_dec
        terms = {"mse": (x_hat - x).pow(2).sum(-1).mean(), **terms}
        if self.cfg.aux_k_coef > 0 and dead is not None:
            if candidates is None:
                candidates = dead.nonzero().squeeze(1)  # a host read: the trainer passes candidates instead
            if candidates.numel():
                terms["auxk"] = self.cfg.aux_k_coef * self.aux_loss(x_in, pre, x - x_hat.detach(), dead, candidates)
        return TrainStepOutput(terms, vals.detach(), idx, self.firing_code(pre, vals, idx))

    @torch.no_grad()
    def firing_code(self, pre: Tensor, vals: Tensor, idx: Tensor) -> TopKCode:
        """The batch's deterministic code (what `encode` computes), for firing statistics: TopK's training
        latents are that code already."""
        return TopKCode(vals.detach(), idx)

    def aux_loss(self, x_in: Tensor, pre: Tensor, residual: Tensor, dead: Tensor, candidates: Tensor) -> Tensor:
        """AuxK: the top `k_aux` dead latents reconstruct the residual, normalised by its variance.

        The top k_aux are chosen among the `candidates` columns with the live ones masked out: a fixed shape, so
        no host read of how many latents are dead, and far cheaper than masking all of [B, d_sae] when few
        latents may be dead. Where fewer than k_aux are dead the extra picks get value 0 (no reconstruction, no
        gradient), and with none dead the term is exactly 0.
        """
        k_aux = min(self.k_aux, candidates.numel())
        cand_dead = dead.index_select(0, candidates)
        if self.sparse and candidates.numel() > AUX_DENSE_MAX * k_aux:
            recon = self._aux_recon_sparse(x_in, pre, candidates, cand_dead, k_aux)
        else:
            recon = self._aux_recon_candidates(x_in, candidates, cand_dead, k_aux)
        variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
        loss = (recon - residual).pow(2).sum(-1).mean() / variance.clamp_min(1e-12)
        return torch.where(cand_dead.any(), loss, 0.0)  # not loss * any: a NaN loss would survive the 0

    def _aux_recon_candidates(self, x_in: Tensor, candidates: Tensor, cand_dead: Tensor, k_aux: int) -> Tensor:
        """AuxK's reconstruction as dense products over the candidate columns only: [B, C] GEMMs instead of
        B x k_aux sparse dot products, several times faster while C stays within a few k_aux (the usual case:
        few latents near death), and on a GPU a fraction of a dense [B, d_sae] decode."""
        pre_c = torch.addmm(self.b_enc.index_select(0, candidates), x_in, self.W_enc.index_select(1, candidates))
        with torch.no_grad():
            scores = pre_c.detach().masked_fill(~cand_dead, float("-inf"))
            top = scores.topk(k_aux, dim=1, sorted=False).indices
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True) & cand_dead
        code = pre_c.relu() * keep
        return code @ self.W_dec.index_select(0, candidates).to(code.dtype)

    def _aux_recon_sparse(self, x_in: Tensor, pre: Tensor, candidates: Tensor, cand_dead: Tensor,
                          k_aux: int) -> Tensor:
        """AuxK's reconstruction through the sparse kernels (B x k_aux dot products): for many candidates."""
        with torch.no_grad():
            scores = pre.detach().index_select(1, candidates).masked_fill(~cand_dead, float("-inf"))
            top = scores.topk(k_aux, dim=1, sorted=False).indices
            idx = candidates[top]
            picked_dead = cand_dead[top]  # False only where fewer than k_aux candidates are dead
        vals = self.selected_pre(x_in, idx, pre).relu() * picked_dead
        return self.decode_sparse(idx, vals)

    # --- the decoder constraint ----------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Remove the gradient component parallel to each (unit) decoder row."""
        if self.cfg.decoder == "unit" and self.W_dec.grad is not None:
            g, d = self.W_dec.grad, self.W_dec
            g -= (g * d).sum(1, keepdim=True) * d

    @torch.no_grad()
    def after_step(self) -> None:
        if self.cfg.decoder == "unit":
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # --- export ------------------------------------------------------------------------
    @torch.no_grad()
    def export(self, scale: float) -> SAEWeights:
        """Weights that act on raw activations (the training input was x / scale).

        pre and z scale by `scale` (ReLU and TopK commute with a positive scale), so
        b_enc and b_dec take the factor and the decoder rows keep their norms.
        """
        return SAEWeights(
            W_enc=self.W_enc.detach().float().clone(), b_enc=self.b_enc.detach().float() * scale,
            W_dec=self.W_dec.detach().float().clone(), b_dec=self.b_dec.detach().float() * scale,
            k=self.k, apply_b_dec_to_input=self.cfg.pre_bias,
        )


class VariationalTopKSAE(TopKSAE):
    """vSAE: mu = ReLU(pre), z = mu + sigma * eps (if `sample`), TopK by |z| keeping signs; + KL to N(0, 1)."""

    own_fields = ("sample", "variance", "kl_coef", "kl_warmup")

    @staticmethod
    def inert(cfg: SAEConfig) -> str | None:
        """Why this combination of the variant's own switches cannot change what is trained (None when it can)."""
        if cfg.variance == "learned" and not cfg.sample:
            return "without sampling the learned variance reaches only the KL term, never the reconstruction"
        return None

    def __init__(self, cfg: SAEConfig, d_in: int, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, d_in, generator)
        if cfg.variance == "learned":
            W_var = torch.empty(d_in, cfg.d_sae)
            nn.init.kaiming_uniform_(W_var.T, a=0.01, generator=generator)
            self.W_var = nn.Parameter(W_var)
            self.b_var = nn.Parameter(torch.full((cfg.d_sae,), -2.0))

    def log_variance(self, x_in: Tensor) -> Tensor | None:
        if self.cfg.variance == "fixed":
            return None  # sigma = 1
        return (x_in @ self.W_var + self.b_var).clamp(-6.0, 2.0)

    def training_latents(self, x_in: Tensor, progress: float, generator: torch.Generator | None
                         ) -> TrainingLatents:
        pre = self.pre_activations(x_in)  # dense gradient: the KL term reaches every latent
        mu = pre.relu()
        logvar = self.log_variance(x_in)
        z = mu
        if self.cfg.sample:
            eps = noise_like(mu, generator)
            z = mu + (eps if logvar is None else eps * (0.5 * logvar).exp())
        idx = z.detach().abs().topk(self.k, dim=1, sorted=False).indices
        vals = z.gather(1, idx)
        weight = self.cfg.kl_coef * kl_warmup(progress, self.cfg.kl_warmup)
        return TrainingLatents(vals, idx, pre, {"kl": weight * gaussian_kl(mu, logvar)})


    @torch.no_grad()
    def firing_code(self, pre: Tensor, vals: Tensor, idx: Tensor) -> TopKCode:
        if not self.cfg.sample:
            return super().firing_code(pre, vals, idx)
        # The sampled latents are signed and noisy: counting them would describe the noise, not the exported
        # deterministic encoder (noise alone would keep dead latents "alive" and hide them from AuxK).
        det_vals, det_idx = pre.detach().topk(self.k, dim=1, sorted=False)
        return TopKCode(det_vals.relu_(), det_idx)


_SCRATCH: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _scratch(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A tensor of `shape` over one block of memory per (dtype, device) kept for the process: the SAEs of a
    multi-SAE pass step one after another, so they share it, and peak memory stays one selection's."""
    n = shape[0] * shape[1]
    buf = _SCRATCH.get((dtype, device))
    if buf is None or buf.numel() < n:
        _SCRATCH[(dtype, device)] = buf = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def noise_like(mu: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like `mu`, drawn on mu's device by `generator`, which must live there too
    (PyTorch refuses a CPU generator for a CUDA tensor; checked here so a mismatch is named, even where a
    device is only simulated)."""
    if generator is not None and not same_device(generator.device, mu.device):
        raise ValueError(f"the noise generator is on {generator.device} but the latents are on {mu.device}; "
                         f"make the generator on the training device")
    return torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same, an unindexed one ("cuda") standing for the current index."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def kl_warmup(progress: float, fraction: float) -> float:
    return 1.0 if fraction <= 0 else min(1.0, progress / fraction)


def gaussian_kl(mu: Tensor, logvar: Tensor | None) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over latents, mean over the batch.

    mu is clamped to [-10, 10] inside the term as in the paper's code. With fixed
    unit variance this is exactly 0.5 * ||mu||^2: an L2 penalty.
    """
    mu = mu.clamp(-10.0, 10.0)
    if logvar is None:
        per_latent = 0.5 * mu.pow(2)
    else:
        per_latent = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return per_latent.sum(-1).mean().clamp_min(0.0)


VARIANTS: dict[str, type[TopKSAE]] = {
    "topk": TopKSAE,
    "vsae": VariationalTopKSAE,
}


def build_sae(cfg: SAEConfig, d_in: int, generator: torch.Generator | None = None) -> TopKSAE:
    cfg.validate(d_in)
    return VARIANTS[cfg.variant](cfg, d_in, generator)


@torch.no_grad()
def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    y = points.mean(0)
    for _ in range(iters):
        w = 1.0 / (points - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * points).sum(0) / w.sum()
        if (y_new - y).norm() < tol * y.norm().clamp_min(1e-8):
            return y_new
        y = y_new
    return y


