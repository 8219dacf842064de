import numpy as np
import pytest
import torch

from activations.cache import open_shards
from activations.loader import ActivationLoader, split_sequences
from tests.test_harvest import run


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_checkpoint, text_corpus):
    out = tmp_path_factory.mktemp("loader") / "c"
    run(out, tiny_checkpoint, text_corpus, tokens=1200, shard_tokens=150)
    return out


def all_rows(cache):
    _, acts, toks = open_shards(cache)
    return np.concatenate(acts), np.concatenate(toks)


def test_every_row_exactly_once_per_epoch(cache):
    acts, _ = all_rows(cache)
    loader = ActivationLoader(cache, batch_size=64, split="all", seed=3)
    assert loader.n_tokens == len(acts) and len(loader) == -(-len(acts) // 64)
    for _ in range(2):
        got = torch.cat(list(loader)).numpy()
        assert got.shape == acts.shape
        order = np.lexsort(got.T[::-1])
        np.testing.assert_array_equal(got[order], acts[np.lexsort(acts.T[::-1])])


def test_deterministic_for_a_seed_and_shuffled(cache):
    a = torch.cat(list(ActivationLoader(cache, 50, seed=1)))
    b = torch.cat(list(ActivationLoader(cache, 50, seed=1)))
    c = torch.cat(list(ActivationLoader(cache, 50, seed=2)))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    loader = ActivationLoader(cache, 50, seed=1)
    first, second = torch.cat(list(loader)), torch.cat(list(loader))
    assert not torch.equal(first, second)  # a new permutation each epoch


def test_unshuffled_order_is_the_cache_order(cache):
    acts, _ = all_rows(cache)
    got = torch.cat(list(ActivationLoader(cache, 100, split="all", shuffle=False))).numpy()
    np.testing.assert_array_equal(got, acts)


def test_held_out_split_is_by_whole_sequence(cache):
    kw = dict(batch_size=128, with_tokens=True, eval_fraction=0.2)
    train = torch.cat([t for _, t in ActivationLoader(cache, split="train", **kw)])
    held = torch.cat([t for _, t in ActivationLoader(cache, split="eval", **kw)])
    train_seqs, held_seqs = set(train[:, 1].tolist()), set(held[:, 1].tolist())
    assert not train_seqs & held_seqs and held_seqs
    _, toks = all_rows(cache)
    assert len(train) + len(held) == len(toks)
    tr, ev = split_sequences(100, 0.2)
    assert len(ev) == 20 and set(tr) | set(ev) == set(range(100))


def test_tokens_stay_aligned_with_activations(cache):
    acts, toks = all_rows(cache)
    for x, t in ActivationLoader(cache, 77, split="all", with_tokens=True, seed=5):
        rows = t[:, 1].numpy() * 31 + t[:, 2].numpy() - 1  # sequence * rows_per_seq + position - BOS
        np.testing.assert_array_equal(x.numpy(), acts[rows])
        np.testing.assert_array_equal(t.numpy(), toks[rows])


def test_breaking_out_early_stops_the_prefetch_thread(cache):
    import threading

    loader = ActivationLoader(cache, 10, prefetch=1)
    for _ in zip(range(2), loader, strict=False):
        pass
    assert not [t for t in threading.enumerate() if t.name == "vsae-prefetch" and t.is_alive()]


# --- streamed or from device memory: the same batches ------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_cache(tmp_path_factory):
    from tests.synthetic import planted_features, synthetic_cache

    rows, _ = planted_features(16 * 60, d_in=8, n_features=32, seed=4)
    return synthetic_cache(tmp_path_factory.mktemp("fp16") / "cache", (rows * 3).astype(np.float16),
                           context=17)


def take(stream, n):
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("start,rank,world_size", [(0, 0, 1), (7, 0, 1), (13, 1, 2), (3, 2, 3)])
def test_device_resident_batches_equal_streamed_ones(fp16_cache, start, rank, world_size, shuffle):
    """Same rows per batch for the same (seed, epoch), across epoch ends, from any start and on any rank."""
    kw = dict(split="train", seed=9, eval_fraction=0.1, shuffle=shuffle, dtype=None)
    streamed = ActivationLoader(fp16_cache, 96, device_budget=0.0, **kw)
    resident = ActivationLoader(fp16_cache, 96, device_budget=1.0, **kw)
    per_epoch = streamed.n_tokens // 96
    a = take(streamed.stream(start, rank, world_size), 2 * per_epoch + 1)
    b = take(resident.stream(start, rank, world_size), 2 * per_epoch + 1)
    assert resident.resident and not streamed.resident
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.dtype == y.dtype == torch.float16, i  # the stored dtype: the caller casts where it computes
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"batch {start + i}")
    # and both are the batches batch_rows names, which a resumed run depends on
    rows = [r[rank::world_size] for e in range(6) for r in list(streamed.batch_rows(e))[:per_epoch]][start:]
    acts = np.concatenate(open_shards(fp16_cache)[1])
    for i, x in enumerate(a):
        np.testing.assert_array_equal(x.numpy(), acts[rows[i]])


def test_resident_split_is_loaded_once_and_reused(fp16_cache, monkeypatch):
    loader = ActivationLoader(fp16_cache, 64, device_budget=1.0, dtype=torch.float32)
    loads = []
    real = loader.load_split
    monkeypatch.setattr(loader, "load_split", lambda: loads.append(1) or real())
    x = next(loader.stream(0))
    next(loader.stream(5))
    assert loads == [1] and x.dtype == torch.float32  # cast from the stored float16 where the batch is drawn
    assert loader._resident.dtype == torch.float16 and loader._resident.shape == (loader.n_tokens, 8)


def test_device_budget_decides_between_resident_and_streamed(fp16_cache, monkeypatch):
    import activations.loader as mod

    need = ActivationLoader(fp16_cache, 64).split_bytes
    assert need == ActivationLoader(fp16_cache, 64).n_tokens * 8 * 2
    monkeypatch.setattr(mod, "free_memory", lambda device: 4 * need)
    assert ActivationLoader(fp16_cache, 64, device_budget=0.25).fits_device()
    assert not ActivationLoader(fp16_cache, 64, device_budget=0.24).fits_device()
    assert not ActivationLoader(fp16_cache, 64, device_budget=0.0).fits_device()
    small = ActivationLoader(fp16_cache, 64, device_budget=0.24)
    next(small.stream(0))
    assert not small.resident
    with pytest.raises(ValueError, match="device_budget must be a fraction"):
        ActivationLoader(fp16_cache, 64, device_budget=2.0)
    assert mod.free_memory("cpu") > 0


def test_ordered_map_keeps_order_raises_and_stops():
    import threading
    import time

    from activations.prefetch import ordered_map

    def slow_square(i):
        time.sleep(0.01 * (i % 3))  # later items often finish first
        return i * i

    assert list(ordered_map(slow_square, range(20), threads=3, depth=2)) == [i * i for i in range(20)]

    def boom(i):
        if i == 5:
            raise OSError("disk gone")
        return i

    with pytest.raises(OSError, match="disk gone"):
        list(ordered_map(boom, range(10), threads=2))
    gen = ordered_map(slow_square, range(10_000), threads=2, depth=2, name="vsae-test-gather")
    next(gen)
    gen.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("vsae-test-gather") and t.is_alive()]


@pytest.mark.cuda
@pytest.mark.parametrize("budget", [0.0, 1.0], ids=["streamed", "resident"])
def test_cuda_batches_equal_the_cpu_ones(fp16_cache, budget):
    """Pinned buffers, the copy stream and events (streamed) or the device-side permutation (resident)."""
    kw = dict(seed=3, dtype=torch.float32, prefetch=1, gather_threads=3)
    cpu = take(ActivationLoader(fp16_cache, 64, **kw).stream(2), 40)
    gpu = ActivationLoader(fp16_cache, 64, device="cuda", device_budget=budget, **kw)
    got = take(gpu.stream(2), 40)
    assert gpu.resident == (budget > 0)
    for i, (x, y) in enumerate(zip(cpu, got, strict=True)):
        assert y.device.type == "cuda" and y.dtype == torch.float32
        torch.testing.assert_close(y.cpu(), x, rtol=0, atol=0, msg=f"batch {i}")


# --- reading a cache safely: checksums on first read, shared lock, one-line errors --------------------------------


@pytest.fixture
def small(tmp_path):
    from tests.synthetic import planted_features, synthetic_cache

    rows, _ = planted_features(16 * 40, d_in=8, n_features=32)
    return synthetic_cache(tmp_path / "cache", rows)


def flip_byte(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def count_hashes(monkeypatch):
    import activations.checksums as checksums

    calls = []
    real = checksums.sha256_file

    def counted(path, *a, **kw):
        calls.append(path.name)
        return real(path, *a, **kw)

    monkeypatch.setattr(checksums, "sha256_file", counted)
    return calls


def test_flipped_byte_is_refused_naming_the_shard_and_the_fix(small):
    import os

    from activations.cache import CacheError

    ActivationLoader(small, 16).close()
    shard = small / "acts-00000.npy"
    st = shard.stat()
    flip_byte(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: still caught (ctime, inode)
    with pytest.raises(CacheError, match=r"shard acts-00000.npy fails its sha256 check.*rerun the same `vsae harv"):
        ActivationLoader(small, 16)
    flip_byte(shard)  # restored: usable again
    ActivationLoader(small, 16).close()


def test_tokens_file_is_verified_too(small):
    from activations.cache import CacheError, sequence_tokens

    flip_byte(small / "tokens-00000.npy")
    with pytest.raises(CacheError, match="tokens-00000.npy fails its sha256 check"):
        sequence_tokens(small, np.array([0]))


def test_each_file_is_hashed_once_then_recorded(small, monkeypatch, tmp_path):
    import json

    import activations.checksums as checksums
    from activations.checksums import RECORD

    (small / RECORD).unlink()  # as if copied without its record
    calls = count_hashes(monkeypatch)
    ActivationLoader(small, 16).close()
    assert sorted(calls) == ["acts-00000.npy", "tokens-00000.npy"]
    assert set(json.loads((small / RECORD).read_text())["files"]) == {"acts-00000.npy", "tokens-00000.npy"}
    ActivationLoader(small, 16).close()
    open_shards(small)
    assert len(calls) == 2  # later opens (a new process reads the same record) hash nothing

    # A cache the user cannot write: the record goes under vsae's cache dir instead.
    (small / RECORD).unlink()
    monkeypatch.setenv("VSAE_CACHE_DIR", str(tmp_path / "vsae-cache"))
    real_write = checksums.write_text_atomic

    def read_only_cache(path, text):
        if path.parent == small:
            raise PermissionError(13, "Permission denied", str(path))
        return real_write(path, text)

    monkeypatch.setattr(checksums, "write_text_atomic", read_only_cache)
    ActivationLoader(small, 16).close()
    ActivationLoader(small, 16).close()
    assert len(calls) == 4 and not (small / RECORD).exists()
    assert len(list((tmp_path / "vsae-cache" / "verified").glob("*.json"))) == 1


def test_truncated_shard_is_named_before_mapping(small):
    from activations.cache import CacheError

    shard = small / "acts-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(CacheError, match=r"shard acts-00000.npy is truncated \(.* of .* bytes\); rerun the same"):
        ActivationLoader(small, 16)


def test_loader_holds_a_shared_lock_while_it_reads(small):
    import gc

    from activations.guard import DirLock, LockedError

    loader = ActivationLoader(small, 16)
    second = ActivationLoader(small, 16)  # readers share
    with pytest.raises(LockedError, match="in use by another vsae process"):
        DirLock(small, "cache").__enter__()  # what `vsae harvest --overwrite` takes
    loader.close()
    acts = open_shards(small)[1]
    view = acts[0][:3]
    del second, acts
    gc.collect()
    with pytest.raises(LockedError):  # a view of a shard still reads it
        DirLock(small, "cache").__enter__()
    del view
    with DirLock(small, "cache"):
        with pytest.raises(LockedError):  # and a cache being written is not read
            ActivationLoader(small, 16)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("settings"), "no settings"),
    (lambda m: m.pop("d_in"), "no d_in"),
    (lambda m: m.update(shards=[]), "shards must be n_shards = 1 entries"),
    (lambda m: m.update(mean_squared_norm=None), "mean_squared_norm must be a number in a complete cache"),
    (lambda m: m.update(d_in=-4), r"d_in must be an integer in \[1, "),
    (lambda m: m.update(n_sequences=10**15), "n_sequences must be"),
    (lambda m: m["shards"][0].update(n_tokens="16"), r"shards\[0\].n_tokens must be an integer"),
    (lambda m: m["shards"][0].update(file="../victim.npy"), r"shards\[0\].file must be a plain .* '../victim.npy'"),
    (lambda m: m["shards"][0].update(file="/tmp/victim.npy"), "must be a plain file name"),
    (lambda m: m["shards"][0].update(tokens_file="acts-00000.npy"), "must be 'tokens-00000.npy'"),
    (lambda m: m["settings"].update(dtype="object"), "settings.dtype must be a float dtype"),
])
def test_damaged_manifest_is_one_cache_error(small, edit, match):
    import json

    from activations.cache import MANIFEST, CacheError, read_manifest

    m = json.loads((small / MANIFEST).read_text())
    edit(m)
    (small / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CacheError, match=match):
        read_manifest(small)
    with pytest.raises(CacheError, match=match):
        ActivationLoader(small, 16)


@pytest.mark.parametrize("text, match", [("[1, 2]", "a JSON list, not a manifest"), ("{", "unreadable JSON"),
                                         ("[" * 100_000, "unreadable JSON")])
def test_manifest_that_is_not_an_object(small, text, match):
    from activations.cache import MANIFEST, CacheError, read_manifest

    (small / MANIFEST).write_text(text)
    with pytest.raises(CacheError, match=match):
        read_manifest(small)


def test_shard_symlink_leading_out_is_refused(small, tmp_path):
    from activations.cache import CacheError

    outside = tmp_path / "elsewhere.npy"
    (small / "acts-00000.npy").rename(outside)  # the very bytes the manifest expects, but outside the cache
    (small / "acts-00000.npy").symlink_to(outside)
    with pytest.raises(CacheError, match="leads outside"):
        ActivationLoader(small, 16)
