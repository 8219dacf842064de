"""Out-of-core loading: blocks of whole sequences through a shuffle buffer (activations/loader.py, `blocked`)."""

import functools
import json
import shutil

import numpy as np
import pytest
import torch

from activations.cache import CacheError, open_shards, write_array_cache
from activations.loader import ActivationLoader, block_starts, contiguous_runs, rank_share, split_sequences
from tests.ports import free_port

RPS = 31  # rows per sequence (context 32, BOS dropped)
OOC = dict(host_budget=0.0, device_budget=0.0, block_rows=100, buffer_blocks=3, dtype=None, eval_fraction=0.1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    acts = np.random.default_rng(0).standard_normal((RPS * 200, 8)).astype(np.float16)
    out = tmp_path_factory.mktemp("ooc") / "c"
    write_array_cache(out, acts, RPS + 1, {"name": "t"}, shard_tokens=RPS * 37)  # shards cut across blocks
    return out


def all_acts(cache):
    return np.concatenate(open_shards(cache)[1])


def take(it, n):
    return [x for _, x in zip(range(n), it, strict=False)]


def reads(loader):
    """Record the global rows each block read of `loader` touches."""
    seen = []
    real = loader._read_piece

    def spy(shard, local, n, at, out):
        seen.append(np.arange(n) + loader._shard_starts[shard] + local)
        real(shard, local, n, at, out)

    loader._read_piece = spy
    return seen


def test_blocks_are_whole_sequences_and_cover_the_split(cache):
    loader = ActivationLoader(cache, 64, **OOC)
    assert loader.blocked and loader.block_rows == 3 * RPS  # 100 rows, clipped down to whole sequences
    starts = block_starts(loader.n_tokens, loader.block_rows)
    assert starts[0] == 0 and starts[-1] == loader.n_tokens and np.all(np.diff(starts)[:-1] == 93)
    assert contiguous_runs(np.array([5, 6, 7, 9, 10, 11]), np.array([0, 10, 20])) == [
        (0, 5, 3, 0), (0, 9, 1, 3), (1, 0, 2, 4)]  # a gap and a shard boundary each start a run
    off, n = rank_share(np.array([93, 10]), 1, 3)
    assert off.tolist() == [31, 3] and n.tolist() == [31, 3]


def test_streamed_batches_are_the_rows_their_positions_name(cache):
    loader = ActivationLoader(cache, 64, **OOC)
    acts = all_acts(cache)
    per_epoch = loader.block_batches_per_epoch()
    batches = take(loader.stream(0), 2 * per_epoch + 3)
    positions = take(loader.block_batch_positions(0), 2 * per_epoch + 3)
    for x, p in zip(batches, positions, strict=True):
        assert x.dtype == torch.float16
        np.testing.assert_array_equal(x.numpy(), acts[loader.rows_at(p)])
    epoch = np.concatenate(positions[:per_epoch])
    assert epoch.size == np.unique(epoch).size == per_epoch * 64  # each row at most once per epoch
    assert loader.n_tokens - epoch.size < 64  # only the last partial batch is dropped
    assert not np.array_equal(epoch, np.concatenate(positions[per_epoch : 2 * per_epoch]))  # a new order


@pytest.mark.parametrize("how", ["direct, chunked", "buffered"])
def test_direct_and_buffered_reads_give_the_same_rows(cache, monkeypatch, how):
    import os

    import activations.loader as ld

    if how == "buffered":
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    else:
        monkeypatch.setattr(ld, "DIRECT_CHUNK", 2 * ld.ALIGN)  # rows straddle chunk and block edges
    loader = ActivationLoader(cache, 64, **OOC)
    acts = all_acts(cache)
    for x, p in zip(take(loader.stream(3), 12), take(loader.block_batch_positions(3), 12), strict=True):
        np.testing.assert_array_equal(x.numpy(), acts[loader.rows_at(p)])


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("start", [1, 29, 90])  # inside a window, across a window edge, in the second epoch
def test_resumed_stream_equals_the_straight_one_bit_for_bit(cache, start, world_size):
    for rank in range(world_size):
        straight = take(ActivationLoader(cache, 64, **OOC).stream(0, rank, world_size), start + 12)[start:]
        resumed = take(ActivationLoader(cache, 64, **OOC).stream(start, rank, world_size), 12)
        for a, b in zip(straight, resumed, strict=True):
            assert torch.equal(a, b)


def test_order_is_a_function_of_the_seed(cache):
    a = np.concatenate(take(ActivationLoader(cache, 64, seed=1, **OOC).block_batch_positions(), 20))
    b = np.concatenate(take(ActivationLoader(cache, 64, seed=1, **OOC).block_batch_positions(), 20))
    c = np.concatenate(take(ActivationLoader(cache, 64, seed=2, **OOC).block_batch_positions(), 20))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_each_batch_mixes_the_blocks_of_its_window(cache):
    loader = ActivationLoader(cache, 64, **OOC)
    per_epoch = loader.block_batches_per_epoch()
    blocks = [np.unique(p // loader.block_rows) for p in take(loader.block_batch_positions(), per_epoch)]
    assert max(b.size for b in blocks) <= 2 * 3  # at most two windows of 3 blocks
    assert np.mean([b.size for b in blocks]) >= 2.5  # and nearly always all 3 of its window
    first = np.concatenate(take(loader.block_batch_positions(), 4))  # the first window: not in cache order
    assert abs(np.corrcoef(np.arange(first.size), first)[0, 1]) < 0.2


def test_blocks_never_read_the_held_out_sequences(cache):
    loader = ActivationLoader(cache, 64, with_tokens=False, **OOC)
    seen = reads(loader)
    take(loader.stream(0), loader.block_batches_per_epoch())
    read = np.concatenate(seen)
    _, held = split_sequences(200, 0.1)
    assert held.size == 20 and not np.isin(read // RPS, held).any()
    assert np.unique(read).size == loader.n_tokens  # every training row (the reader runs into the next epoch)


def test_ranks_read_disjoint_shares_that_make_up_the_epoch(cache):
    W = 2
    read = []
    for rank in range(W):
        loader = ActivationLoader(cache, 64, **OOC)
        seen = reads(loader)
        take(loader.stream(0, rank, W), loader.block_batches_per_epoch(W))
        read.append(np.unique(np.concatenate(seen)))
    assert not np.intersect1d(read[0], read[1]).size  # no rank reads a row another rank uses, in any epoch
    assert read[0].size + read[1].size == ActivationLoader(cache, 64, **OOC).n_tokens
    assert abs(read[0].size - read[1].size) <= 60  # each block cut in two halves (one row apart)


def test_budgets_choose_the_order(cache, monkeypatch):
    import activations.loader as ld

    assert ActivationLoader(cache, 64, **OOC).batch_order() == {"kind": "block", "block_rows": 93,
                                                                "buffer_blocks": 3}
    small = ActivationLoader(cache, 64, host_budget=0.5)
    assert not small.blocked and small.batch_order() == {"kind": "exact"}
    monkeypatch.setattr(ld, "free_memory", lambda device: small.split_bytes)  # the split: 100% of free RAM
    assert ActivationLoader(cache, 64, host_budget=0.99).blocked
    assert not ActivationLoader(cache, 64, host_budget=1.0).blocked
    assert not ActivationLoader(cache, 64, host_budget=0.0, device_budget=1.0).blocked  # resident wins
    assert not ActivationLoader(cache, 64, host_budget=0.0, shuffle=False).blocked  # reads in order anyway
    small.use_batch_order({"kind": "block", "block_rows": 62, "buffer_blocks": 2})
    assert small.blocked and small.block_rows == 62
    with pytest.raises(ValueError, match="host_budget"):
        ActivationLoader(cache, 64, host_budget=1.5)


def test_a_shard_removed_mid_stream_is_named(tmp_path, cache):
    copy = tmp_path / "c"
    shutil.copytree(cache, copy)
    loader = ActivationLoader(copy, 64, **OOC)
    batches = loader.stream(0)
    next(batches)
    (copy / "acts-00002.npy").unlink()
    with pytest.raises(CacheError, match=r"shard acts-00002\.npy .*removed.*resume the run from its last checkpoint"):
        take(batches, 200)


def test_a_shard_replaced_mid_stream_is_named(tmp_path, cache):
    copy = tmp_path / "c"
    shutil.copytree(cache, copy)
    loader = ActivationLoader(copy, 64, **OOC)
    batches = loader.stream(0)
    next(batches)
    shutil.copy(copy / "acts-00001.npy", copy / "new.npy")
    (copy / "new.npy").replace(copy / "acts-00001.npy")
    with pytest.raises(CacheError, match=r"shard acts-00001\.npy was replaced"):
        take(batches, 200)


# --- the trainer -----------------------------------------------------------------------------------------------
def tcfg(cache, out, **kw):
    from vsae.config import TrainConfig

    base = dict(cache=str(cache), out=str(out), steps=30, batch_size=64, lr=1e-3, lr_warmup_steps=2, log_every=5,
                checkpoint_every=10, progress=False, device="cpu", device_data_budget=0.0, host_data_budget=0.0,
                eval_fraction=0.1)
    base.update(kw)
    return TrainConfig(**base)


def test_shard_removed_mid_run_keeps_the_last_checkpoint_and_resumes_exactly(tmp_path, cache, monkeypatch):
    from safetensors.torch import load_file

    import vsae.trainer as tr
    from vsae.config import SAEConfig

    monkeypatch.setattr(tr, "ActivationLoader", functools.partial(ActivationLoader, block_rows=62, buffer_blocks=2))
    sae = [SAEConfig(d_sae=32, k=4)]
    copy = tmp_path / "c"
    shutil.copytree(cache, copy)
    [straight] = tr.train(tcfg(copy, tmp_path / "straight"), sae)
    assert json.loads((straight / "train.json").read_text())["batch_order"]["kind"] == "block"

    real = tr.update_step
    shard = copy / "acts-00004.npy"
    kept = shard.read_bytes()

    def remove_at_12(s, x, step, *a):
        if step == 12 and shard.exists():
            shard.unlink()  # the filesystem loses a shard mid-run
        real(s, x, step, *a)

    monkeypatch.setattr(tr, "update_step", remove_at_12)
    with pytest.raises(CacheError, match=r"shard acts-00004\.npy"):
        tr.train(tcfg(copy, tmp_path / "r"), sae)
    saved = json.loads((tmp_path / "r" / "train.json").read_text())
    assert saved["step"] in (10, 20) and not saved["complete"]  # the last good checkpoint, whole
    shard.write_bytes(kept)
    monkeypatch.setattr(tr, "update_step", real)
    # resumed where RAM would now choose the exact shuffle: the run keeps its block order, so equals the straight
    tr.train(tcfg(copy, tmp_path / "r", host_data_budget=1.0), sae, resume=True)
    a, b = load_file(str(straight / "trainer_state.safetensors")), load_file(str(tmp_path / "r" /
                                                                                  "trainer_state.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_block_batches_equal_the_cpu_ones(cache):
    cpu = take(ActivationLoader(cache, 64, **OOC).stream(5), 30)
    gpu = take(ActivationLoader(cache, 64, device="cuda", **{**OOC, "dtype": torch.float32}).stream(5), 30)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.device.type == "cuda" and b.dtype == torch.float32
        torch.testing.assert_close(a.float(), b.cpu(), rtol=0, atol=0)


def test_sample_draws_distinct_split_rows_without_a_whole_permutation(cache, monkeypatch):
    acts = all_acts(cache)
    loader = ActivationLoader(cache, 64, eval_fraction=0.1, seed=4)
    monkeypatch.setattr(loader, "epoch_order", None)  # never a permutation of the whole split
    x = loader.sample(500)
    rows = np.flatnonzero((acts[:, None, :] == x[None, :, :]).all(-1).any(1))  # the rows x holds (all distinct)
    assert x.shape == (500, 8) and rows.size == 500
    np.testing.assert_array_equal(x, acts[rows])  # in cache order
    assert np.isin(rows, loader.rows).all()  # training rows only
    np.testing.assert_array_equal(ActivationLoader(cache, 64, eval_fraction=0.1, seed=4).sample(500), x)
    assert not np.array_equal(ActivationLoader(cache, 64, eval_fraction=0.1, seed=5).sample(500), x)
    np.testing.assert_array_equal(loader.sample(10**9), acts[loader.rows])


def _rank_worker(rank: int, port: int, cache: str, out: str, results) -> None:
    import datetime

    import torch.distributed as dist

    import vsae.trainer as tr
    from vsae.config import SAEConfig

    orders = []

    class Recorded(ActivationLoader):
        def stream(self, *a, **kw):
            orders.append(self.batch_order())
            return super().stream(*a, **kw)

    tr.ActivationLoader = Recorded
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:  # rank 1's budget alone would choose the exact shuffle: it must follow rank 0's blocks
        tr.train(tcfg(cache, out, steps=4, host_data_budget=0.0 if rank == 0 else 1.0), [SAEConfig(d_sae=16, k=2)],
                 rank=rank, world_size=2)
        results.put((rank, orders[-1]["kind"]))
    except Exception as e:
        results.put((rank, f"{type(e).__name__}: {e}"))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~20 s on the shared CPU
def test_ddp_ranks_follow_rank_0s_batch_order(tmp_path, cache):
    import multiprocessing

    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_worker, args=(r, port, str(cache), str(tmp_path / "r"), results))
             for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
    assert got == {0: "block", 1: "block"}
    # the blocks were dealt to 2 ranks: a resume by one process would reorder the batches still to come
    import vsae.trainer as tr
    from vsae.config import SAEConfig
    from vsae.run import RunError

    with pytest.raises(RunError, match="drawn for 2 process"):
        tr.train(tcfg(cache, tmp_path / "r", steps=8), [SAEConfig(d_sae=16, k=2)], resume=True)
