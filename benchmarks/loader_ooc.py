"""Out-of-core loading at scale: rows/s and peak RSS of the training loader, `vsae eval` and `vsae dashboard`.

    python benchmarks/loader_ooc.py --rows 1000000 10000000 50000000 --dir /work/ooc_tmp
    python benchmarks/loader_ooc.py --rows 1000000 --seconds 5 --skip-cli     # a quick run

For each size, a synthetic cache (d_in 512, float16, contexts of 128 with BOS dropped; rows tiled from a 64k-row
random pool, which changes nothing for I/O) is written, measured, and deleted before the next one. Before each
measurement the cache's pages are dropped from the page cache (posix_fadvise DONTNEED on every file: dropping the
whole page cache needs root), so every read comes from the disk. Measured, each in its own process (peak RSS from
os.wait4): the training stream out of core (blocks through the shuffle buffer) and by exact random gathers, for
`--seconds` after its first batch; the disk's sequential rate as `dd` reads a shard (buffered, and O_DIRECT); the
mixing of the two orders, from the batches' positions (no reads); `vsae eval` (core, density) and `vsae dashboard`
(`--tokens` rows, a random TopK SAE). Prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

from activations.cache import (  # noqa: E402
    MANIFEST,
    acts_file,
    read_manifest,
    stamp_shards,
    tokens_file,
    update_totals,
    write_array_cache,
    write_json_atomic,
)
from activations.loader import ActivationLoader  # noqa: E402

D_IN, CONTEXT, POOL = 512, 128, 1 << 16


class TiledRows:
    """An array-like of `n` synthetic float16 rows (row i = pool row i mod 65536) that `write_array_cache` slices
    shard by shard: a 50 GB cache is written without holding it."""

    def __init__(self, n: int, d_in: int = D_IN) -> None:
        self.shape, self.ndim, self.dtype = (n, d_in), 2, np.dtype(np.float16)
        self.pool = np.random.default_rng(0).standard_normal((POOL, d_in), dtype=np.float32).astype(np.float16)

    def __getitem__(self, s: slice) -> np.ndarray:
        return self.pool[np.arange(*s.indices(self.shape[0])) % POOL]


def build(out: Path, rows: int, shard_seqs: int = 2064) -> Path:
    """A cache of about `rows` rows (whole contexts, in equal shards of at most `shard_seqs` contexts): one shard
    written, then copied (a kernel-side copy, fast) under new names, so 50 GB build in minutes; every copy is its
    own blocks on the disk, read like any other shard."""
    seqs = max(1, rows // (CONTEXT - 1))
    first = seqs // -(-seqs // shard_seqs) * (CONTEXT - 1)
    n = -(-seqs // shard_seqs) * first
    manifest = write_array_cache(out, TiledRows(first), CONTEXT, {"kind": "synthetic", "name": "random"},
                                 shard_tokens=first)
    [entry] = manifest["shards"]
    for index in range(1, -(-n // first)):
        new = {**entry, "index": index, "file": acts_file(index), "tokens_file": tokens_file(index)}
        shutil.copyfile(out / entry["file"], out / new["file"])
        shutil.copyfile(out / entry["tokens_file"], out / new["tokens_file"])
        manifest["shards"].append(new)
    total = len(manifest["shards"]) * first
    manifest.update(n_sequences=total // (CONTEXT - 1), n_shards=len(manifest["shards"]))
    manifest["settings"]["tokens"] = total
    update_totals(manifest)
    write_json_atomic(out / MANIFEST, manifest)
    stamp_shards(out, manifest)
    return out


def cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.suffix == ".npy")


def drop_page_cache(cache: Path) -> None:
    for path in cache_files(cache):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dd_rate(cache: Path, direct: bool, max_bytes: int = 2 << 30) -> dict:
    """MB/s and CPU seconds per GB of `dd` reading the first activation shards (up to `max_bytes`) from the disk."""
    import resource

    drop_page_cache(cache)
    shards = [p for p in cache_files(cache) if p.name.startswith("acts-")]
    total, seconds = 0, 0.0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for path in shards:
        if total >= max_bytes:
            break
        t = time.perf_counter()
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"] + (["iflag=direct"] if direct else []),
                       check=True, capture_output=True)
        seconds += time.perf_counter() - t
        total += path.stat().st_size
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"mb_per_s": total / seconds / 1e6, "cpu_s_per_gb": cpu / total * 1e9}


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM: reset at exec, so the parent's memory does not leak in, as it does
    into a child's ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """The peak of this process's anonymous resident memory (RssAnon: its own allocations, not the cache pages a
    memmap maps, which VmHWM counts too), sampled every 50 ms by a daemon thread."""

    def __init__(self) -> None:
        import threading

        self.peak = 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) / 1024)
            time.sleep(0.05)


ANON: AnonPeak | None = None


def cpu_seconds() -> float:
    import resource

    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def child_report(**extra: float) -> None:
    anon = ANON.peak if ANON else float("nan")
    print(json.dumps({**extra, "rss_mib": peak_rss_mib(), "anon_mib": anon, "cpu_s": cpu_seconds()}))


def measured(cmd: list[str]) -> dict:
    """The last JSON line a child prints (`child_report`), with its wall seconds."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": time.perf_counter() - t}


def child_stream(cache: str, mode: str, seconds: float, batch: int) -> None:
    """Run in a child: the training stream in `mode`, rows/s after the first batch."""
    budget = {"block": 0.0, "gather": 1.0}[mode]
    loader = ActivationLoader(cache, batch, host_budget=budget, device_budget=0.0, dtype=None, seed=0)
    loader.use_batch_order({"kind": "exact"} if mode == "gather" else loader.batch_order())  # whatever RAM says
    t0 = time.perf_counter()
    it = loader.stream(0)
    next(it)
    t1, cpu1 = time.perf_counter(), cpu_seconds()
    rows = 0
    while time.perf_counter() - t1 < seconds:
        rows += next(it).shape[0]
    child_report(rows_per_s=rows / (time.perf_counter() - t1), first_batch_s=t1 - t0, rows=rows,
                 steady_cpu_s=cpu_seconds() - cpu1)


def child_cli(argv: list[str]) -> None:
    """Run in a child: one `vsae` command in this process, so its peak memory is its own."""
    from cli import main as vsae

    if vsae(argv):
        raise SystemExit(f"vsae {' '.join(argv)} failed")
    child_report()


def run_stream(cache: Path, mode: str, seconds: float, batch: int) -> dict:
    drop_page_cache(cache)
    res = measured([sys.executable, __file__, "--child", mode, "--cache", str(cache), "--seconds", str(seconds),
                    "--batch", str(batch)])
    mb = res["rows"] * D_IN * 2 / 1e6
    return {**res, "mb_per_s": res["rows_per_s"] * D_IN * 2 / 1e6, "cpu_s_per_gb": res["steady_cpu_s"] / mb * 1e3}


def mixing(positions: list[np.ndarray], block_rows: int, rows_per_seq: int) -> dict:
    """How far batches are from the exact shuffle: |correlation| of a batch's mean position with its draw order,
    the distinct 64k-row blocks per batch, and the fraction of rows sharing their context with another row of the
    batch (the exact shuffle of a large cache: ~0)."""
    means = np.array([p.mean() for p in positions])
    corr = float(np.corrcoef(np.arange(means.size), means)[0, 1])
    blocks = float(np.mean([np.unique(p // block_rows).size for p in positions]))
    shared = []
    for p in positions:
        _, counts = np.unique(p // rows_per_seq, return_counts=True)
        shared.append(counts[counts > 1].sum() / p.size)
    return {"abs_corr_mean_position": abs(corr), "blocks_per_batch": blocks,
            "rows_sharing_context": float(np.mean(shared))}


def mix_report(cache: Path, batch: int, n_batches: int) -> dict:
    """`mixing` of the first `n_batches` (0: one epoch) of each order. The correlation's noise floor is about
    1 / sqrt(windows drawn) for the block order, 1 / sqrt(batches) for the exact one."""
    loader = ActivationLoader(cache, batch, host_budget=0.0, device_budget=0.0, seed=0)
    n_batches = n_batches or loader.block_batches_per_epoch()
    block = [p for _, p in zip(range(n_batches), loader.block_batch_positions(0), strict=False)]
    order = loader.epoch_order(0)
    exact = [order[i * batch : (i + 1) * batch] for i in range(min(n_batches, len(order) // batch))]
    windows = -(-len(block) * batch // (loader.block_rows * loader.buffer_blocks))
    return {"batches": len(block), "windows": windows, **{kind: mixing(pos, loader.block_rows, loader.rows_per_seq)
                                                          for kind, pos in (("block", block), ("exact", exact))}}


def make_run(root: Path, cache: Path, d_sae: int) -> Path:
    import torch

    from vsae.checkpoint import SAEWeights, write_sae

    W_dec = torch.randn(d_sae, D_IN, generator=torch.Generator().manual_seed(0))
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    sae = SAEWeights(W_enc=W_dec.T.contiguous(), b_enc=torch.zeros(d_sae), W_dec=W_dec, b_dec=torch.zeros(D_IN),
                     k=32, apply_b_dec_to_input=True)
    run = root / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    write_sae(run, sae, {"model_name": "random", "hook_name": "synthetic", "context_size": CONTEXT,
                         "dataset_path": str(cache)})
    (run / "train.json").write_text(json.dumps({"train": {"eval_fraction": 0.05}}))
    return run


def run_cli(root: Path, cache: Path, tokens: int, d_sae: int) -> dict:
    run = make_run(root, cache, d_sae)
    out = {}
    for name, argv in (
        ("eval", ["eval", str(run), "--cache", str(cache), "--metrics", "core,density", "--tokens", str(tokens),
                  "--device", "cpu", "--no-progress", "--null-seeds", "1", "--other-cache"]),
        ("dashboard", ["dashboard", str(run), "--cache", str(cache), "--out", str(root / "dash"), "--tokens",
                       str(tokens), "--device", "cpu", "--no-progress"]),
    ):
        drop_page_cache(cache)
        out[name] = {**measured([sys.executable, __file__, "--child-cli", *argv]), "tokens": tokens}
    shutil.rmtree(root / "dash", ignore_errors=True)
    return out


def one_size(root: Path, rows: int, args: argparse.Namespace) -> dict:
    cache = root / f"cache-{rows}"
    shutil.rmtree(cache, ignore_errors=True)
    t = time.perf_counter()
    try:
        build(cache, rows)
        res = {"rows": int(read_manifest(cache)["total_tokens"]), "build_s": time.perf_counter() - t,
               "cache_gb": sum(p.stat().st_size for p in cache_files(cache)) / 1e9,
               "dd": [], "dd_direct": [], "block": [], "gather": []}
        for _ in range(args.repeats):  # interleaved: the disk and the CPUs are shared, their rates drift
            res["dd"].append(dd_rate(cache, False))
            res["dd_direct"].append(dd_rate(cache, True))
            for mode in ("block", "gather"):
                r = run_stream(cache, mode, args.seconds, args.batch)
                res[mode].append({**r, "ratio_to_dd": r["mb_per_s"] / res["dd"][-1]["mb_per_s"]})
        res["mixing"] = mix_report(cache, args.batch, args.mix_batches)
        if not args.skip_cli:
            res.update(run_cli(root, cache, args.tokens, args.d_sae))
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # 50M rows are 51 GB of a shared disk: never left behind
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--dir", default="/tmp/vsae-loader-ooc", help="where the caches are built (and deleted)")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured streaming time per loader")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--mix-batches", type=int, default=0, help="batches the mixing is measured on (0: an epoch)")
    ap.add_argument("--tokens", type=int, default=100_000, help="rows for vsae eval and vsae dashboard")
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--skip-cli", action="store_true", help="no vsae eval / dashboard")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of dd and both loaders")
    ap.add_argument("--child", choices=["block", "gather"], help=argparse.SUPPRESS)
    ap.add_argument("--child-cli", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_cli or args.child:
        global ANON
        ANON = AnonPeak()
    if args.child_cli:
        child_cli(args.child_cli)
        return
    if args.child:
        child_stream(args.cache, args.child, args.seconds, args.batch)
        return
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    for rows in args.rows:
        print(json.dumps(one_size(root, rows, args), default=lambda x: round(x, 3)), flush=True)


if __name__ == "__main__":
    main()
