"""Forward+backward of `sparse_encode` + `sparse_decode` against the dense reference, in one process.

    python benchmarks/sparse_ops.py [--batch 4096] [--d-in 512] [--d-sae 8192] [--k 64] [--rounds 4]

Both sides get the same idx (from the no-grad dense encoder matmul and topk, which a TopK step does either way
and is not timed) and the same upstream gradient. Dense reference: (x @ W_enc + b_enc) -> gather the k selected,
ReLU, scatter into [B, d_sae] -> z @ W_dec. x = input - b_dec requires grad on both sides, as in training; the
sparse path is also timed with an x that needs no grad, and with W_enc stored latent-major (a [d_sae, d_in]
parameter passed as .t(), which spares two transposes). Rounds are interleaved and the best and median of each
are printed, since this machine is shared and noisy. Also times topk_latents against topk(relu(pre)), and a
whole TopK forward+backward each way (encoder matmul and topk included, optimizer not) in tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vsae.sparse import sparse_decode, sparse_encode, topk_latents


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=512)
    ap.add_argument("--d-sae", type=int, default=8192)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    B, d_in, d_sae, k = args.batch, args.d_in, args.d_sae, args.k

    g = torch.Generator().manual_seed(0)
    inp = torch.randn(B, d_in, generator=g)
    W_enc = (torch.randn(d_in, d_sae, generator=g) / d_in**0.5).requires_grad_()
    b_enc = torch.zeros(d_sae).requires_grad_()
    W_dec = W_enc.detach().t().contiguous().requires_grad_()
    b_dec = torch.zeros(d_in).requires_grad_()
    W_enc_T = W_enc.detach().t().contiguous().requires_grad_()  # the same weights stored latent-major
    grad_out = torch.randn(B, d_in, generator=g)
    with torch.no_grad():
        pre_dense = (inp - b_dec) @ W_enc + b_enc
        _, idx = topk_latents(pre_dense, k)
    params = (W_enc, W_enc_T, b_enc, W_dec, b_dec)

    def step(forward) -> None:
        for p in params:
            p.grad = None
        forward().backward(grad_out)

    def dense() -> torch.Tensor:
        pre = (inp - b_dec) @ W_enc + b_enc
        z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
        return z @ W_dec

    def sparse() -> torch.Tensor:
        x = inp - b_dec
        return sparse_decode(idx, sparse_encode(x, W_enc, b_enc, idx).relu(), W_dec)

    def sparse_no_x_grad() -> torch.Tensor:
        return sparse_decode(idx, sparse_encode(inp, W_enc, b_enc, idx).relu(), W_dec)

    def sparse_latent_major() -> torch.Tensor:
        x = inp - b_dec
        return sparse_decode(idx, sparse_encode(x, W_enc_T.t(), b_enc, idx).relu(), W_dec)

    def dense_full() -> torch.Tensor:  # the whole TopK forward: dense encoder, topk on ReLU, dense decoder
        pre = (inp - b_dec) @ W_enc + b_enc
        top = pre.detach().relu().topk(k, dim=1).indices
        return torch.zeros_like(pre).scatter(1, top, pre.gather(1, top).relu()) @ W_dec

    def sparse_full() -> torch.Tensor:  # the same with the encoder matmul under no_grad and the sparse ops
        x = inp - b_dec
        with torch.no_grad():
            _, top = topk_latents(x @ W_enc + b_enc, k)
        return sparse_decode(top, sparse_encode(x, W_enc, b_enc, top).relu(), W_dec)

    cases = {
        "dense reference": lambda: step(dense),
        "sparse_encode+sparse_decode": lambda: step(sparse),
        "  same, x needs no grad": lambda: step(sparse_no_x_grad),
        "  same, W_enc latent-major": lambda: step(sparse_latent_major),
        "topk(relu(pre)) [no grad]": lambda: pre_dense.relu().topk(k, dim=1),
        "topk_latents(pre) [no grad]": lambda: topk_latents(pre_dense, k),
        "full step, dense": lambda: step(dense_full),
        "full step, sparse": lambda: step(sparse_full),
    }
    for fn in cases.values():  # warm-up: allocator, MKL handles
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(timed(fn))

    print(f"B {B}, d_in {d_in}, d_sae {d_sae}, k {k}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    for name, ts in times.items():
        print(f"{name:30s} best {min(ts) * 1e3:8.1f} ms   median {statistics.median(ts) * 1e3:8.1f} ms")
    ratio_best = min(times["dense reference"]) / min(times["sparse_encode+sparse_decode"])
    ratio_med = statistics.median(times["dense reference"]) / statistics.median(times["sparse_encode+sparse_decode"])
    print(f"speed-up of sparse over dense fwd+bwd: {ratio_best:.1f}x (best), {ratio_med:.1f}x (median)")
    full = {name: B / statistics.median(times[f"full step, {name}"]) for name in ("dense", "sparse")}
    print(f"full step (encoder matmul + topk + fwd/bwd, no optimizer): dense {full['dense']:,.0f} tok/s, "
          f"sparse {full['sparse']:,.0f} tok/s (medians), {full['sparse'] / full['dense']:.1f}x")


if __name__ == "__main__":
    main()
