import json
from pathlib import Path

import numpy as np
import pytest
import torch

from activations.cache import CacheError, open_shards, read_manifest
from activations.corpus import CorpusError
from activations.harvest import HarvestConfig, harvest
from activations.models import HookNameError, load_local_checkpoint
from activations.tokens import pack_contexts

HOOK = "blocks.1.hook_resid_post"


def run(out: Path, checkpoint: Path, corpus: Path | list, **kw):
    corpus = [str(c) for c in corpus] if isinstance(corpus, list) else [str(corpus)]
    cfg = dict(out=str(out), model_path=str(checkpoint), hook=HOOK, corpus=corpus, tokens=1000,
               context=32, dtype="float32", batch_size=4, shard_tokens=200, progress=False)
    cfg.update(kw)
    return harvest(HarvestConfig(**cfg))


def cache_arrays(out: Path) -> tuple[np.ndarray, np.ndarray]:
    _, acts, toks = open_shards(out)
    return np.concatenate(acts), np.concatenate(toks)


def test_activations_equal_run_with_cache(tmp_path, tiny_checkpoint, text_corpus):
    summary = run(tmp_path / "c", tiny_checkpoint, text_corpus)
    acts, toks = cache_arrays(tmp_path / "c")
    m = read_manifest(tmp_path / "c")
    assert m["complete"] and m["total_tokens"] == summary.tokens == acts.shape[0] >= 1000
    assert m["d_in"] == 32 and m["settings"]["bos_dropped"] and m["stop_at_layer"] == 2

    model = load_local_checkpoint(tiny_checkpoint)
    docs = [p.read_text() for p in sorted(text_corpus.glob("*.txt"))]
    seqs = np.stack(list(pack_contexts(docs, model.tokenizer, 32))[: m["n_sequences"]])
    tokens = torch.from_numpy(seqs)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    want = cache[HOOK][:, 1:].reshape(-1, 32).numpy()
    np.testing.assert_array_equal(acts, want)  # exact in float32
    np.testing.assert_array_equal(toks[:, 0], seqs[:, 1:].reshape(-1))
    np.testing.assert_array_equal(toks[:, 1], np.repeat(np.arange(len(seqs)), 31))
    np.testing.assert_array_equal(toks[:, 2], np.tile(np.arange(1, 32), len(seqs)))
    assert m["mean_squared_norm"] == pytest.approx(float((want.astype(np.float64) ** 2).sum(1).mean()), rel=1e-9)


def reference_harvest(checkpoint: Path, corpus: Path, n_seqs: int, shard_seqs: int, batch: int,
                      dtype=torch.float16) -> np.ndarray:
    """The harvest as first written: each batch's forward, then a synchronous cast and copy to the host."""
    model = load_local_checkpoint(checkpoint)
    docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    seqs = torch.from_numpy(np.stack(list(pack_contexts(docs, model.tokenizer, 32))[:n_seqs]))
    got = {}
    out = []
    with torch.no_grad(), model.hooks(fwd_hooks=[(HOOK, lambda act, hook: got.update(act=act))]):
        for first in range(0, n_seqs, shard_seqs):  # batches never span shards
            shard = seqs[first : first + shard_seqs]
            for b in range(0, len(shard), batch):
                model(shard[b : b + batch], stop_at_layer=2)
                out.append(got["act"][:, 1:].to(dtype).reshape(-1, 32).cpu().numpy())
    return np.concatenate(out)


@pytest.mark.parametrize("slow_writer", [False, True], ids=["plain", "slow-writer"])
def test_harvest_equals_the_synchronous_reference_bit_for_bit(tmp_path, tiny_checkpoint, text_corpus, monkeypatch,
                                                               slow_writer):
    """float16, a batch size that leaves partial batches, several shards; a slow writer thread must not let a
    buffer be refilled before its rows are written."""
    import time

    import activations.harvest as h

    if slow_writer:
        real = h._write_rows
        monkeypatch.setattr(h, "_write_rows", lambda *a: (time.sleep(0.1), real(*a)))
    run(tmp_path / "c", tiny_checkpoint, text_corpus, dtype="float16", batch_size=3, tokens=900, shard_tokens=217)
    acts, _ = cache_arrays(tmp_path / "c")
    m = read_manifest(tmp_path / "c")
    assert m["n_shards"] >= 4 and m["settings"]["shard_sequences"] % 3  # partial batches at every shard end
    want = reference_harvest(tiny_checkpoint, text_corpus, m["n_sequences"], m["settings"]["shard_sequences"], 3)
    assert acts.dtype == np.float16
    np.testing.assert_array_equal(acts, want)


def test_failed_row_write_is_one_cache_error(tmp_path, tiny_checkpoint, text_corpus, monkeypatch):
    import activations.harvest as h

    def disk_full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h, "_write_rows", disk_full)
    with pytest.raises(CacheError, match="No space left on device.*free space"):
        run(tmp_path / "c", tiny_checkpoint, text_corpus)
    assert not read_manifest(tmp_path / "c")["shards"]


def test_bfloat16_model_harvest_is_recorded_and_close_to_float32(tmp_path, tiny_checkpoint, text_corpus):
    run(tmp_path / "f32", tiny_checkpoint, text_corpus, tokens=300)
    run(tmp_path / "bf16", tiny_checkpoint, text_corpus, tokens=300, model_dtype="bfloat16")
    assert read_manifest(tmp_path / "bf16")["settings"]["model_dtype"] == "bfloat16"
    assert "model_dtype" not in read_manifest(tmp_path / "f32")["settings"]  # older caches stay resumable
    a, b = cache_arrays(tmp_path / "f32")[0], cache_arrays(tmp_path / "bf16")[0]
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(b, a, rtol=0.05, atol=0.05 * np.abs(a).max())
    with pytest.raises(ValueError, match="--model-dtype must be one of"):
        run(tmp_path / "x", tiny_checkpoint, text_corpus, model_dtype="int8")


@pytest.mark.cuda
def test_cuda_harvest_equals_the_cpu_harvest_within_bf16_tolerance(tmp_path, tiny_checkpoint, text_corpus):
    """Pinned double buffers, the copy stream and events; float32 storage, so only the GPU's arithmetic differs."""
    run(tmp_path / "cpu", tiny_checkpoint, text_corpus, batch_size=3)
    run(tmp_path / "gpu", tiny_checkpoint, text_corpus, batch_size=3, device="cuda")
    (a, ta), (b, tb) = cache_arrays(tmp_path / "cpu"), cache_arrays(tmp_path / "gpu")
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-2 * np.abs(a).max())


def test_keep_bos_and_float16(tmp_path, tiny_checkpoint, text_corpus):
    run(tmp_path / "c", tiny_checkpoint, text_corpus, keep_bos=True, dtype="float16", tokens=320)
    acts, toks = cache_arrays(tmp_path / "c")
    assert acts.dtype == np.float16 and acts.shape == (320, 32)
    assert (toks[toks[:, 2] == 0, 0] == 0).all()  # BOS rows kept at position 0


def test_interrupted_harvest_resumes_to_identical_cache(tmp_path, tiny_checkpoint, text_corpus, monkeypatch):
    run(tmp_path / "full", tiny_checkpoint, text_corpus)
    import activations.harvest as h

    real = h._commit_shard
    calls = []

    def dies_on_third(shard, manifest, out):
        calls.append(shard.index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed after two shards were committed, one in flight
        real(shard, manifest, out)

    monkeypatch.setattr(h, "_commit_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "part", tiny_checkpoint, text_corpus)
    monkeypatch.setattr(h, "_commit_shard", real)
    m = read_manifest(tmp_path / "part")
    assert not m["complete"] and len(m["shards"]) == 2
    with pytest.raises(CacheError, match="incomplete"):
        open_shards(tmp_path / "part")
    summary = run(tmp_path / "part", tiny_checkpoint, text_corpus)
    assert summary.built_shards == m["n_shards"] - 2
    for a, b in zip(cache_arrays(tmp_path / "full"), cache_arrays(tmp_path / "part"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert read_manifest(tmp_path / "full")["shards"] == read_manifest(tmp_path / "part")["shards"]


def test_shard_contexts_skip_built_shards_and_name_a_short_corpus():
    import activations.harvest as h

    cfg = HarvestConfig(out="unused", corpus=["some-corpus"], tokens=310, context=32, shard_tokens=100)
    layout = h._layout(cfg)
    assert (layout.rows_per_seq, layout.n_seqs, layout.shard_seqs, layout.n_shards) == (31, 10, 3, 4)
    seqs = [np.full(32, i) for i in range(10)]
    got = [(index, first, [int(s[0]) for s in shard]) for index, first, shard in
           h._shard_contexts(iter(seqs), cfg, layout, [1, 3])]
    # Shards 0 and 2 are built already: their contexts are read and dropped, so shard 3 gets sequence 9.
    assert got == [(1, 3, [3, 4, 5]), (3, 9, [9])]
    with pytest.raises(CacheError, match="some-corpus gives only 8 contexts"):
        list(h._shard_contexts(iter(seqs[:8]), cfg, layout, [2, 3]))


def test_truncated_shard_is_named_and_rebuilt(tmp_path, tiny_checkpoint, text_corpus, capsys):
    out = tmp_path / "c"
    run(out, tiny_checkpoint, text_corpus)
    before = cache_arrays(out)
    victim = out / "acts-00001.npy"
    victim.write_bytes(victim.read_bytes()[:-100])
    summary = run(out, tiny_checkpoint, text_corpus)
    assert "acts-00001.npy" in capsys.readouterr().err
    assert summary.built_shards == 1
    for a, b in zip(before, cache_arrays(out), strict=True):
        np.testing.assert_array_equal(a, b)


def test_other_settings_are_never_overwritten_silently(tmp_path, tiny_checkpoint, text_corpus):
    out = tmp_path / "c"
    run(out, tiny_checkpoint, text_corpus)
    with pytest.raises(CacheError, match="differs in: context.*--overwrite"):
        run(out, tiny_checkpoint, text_corpus, context=16)
    assert read_manifest(out)["settings"]["context"] == 32
    run(out, tiny_checkpoint, text_corpus, context=16, overwrite=True)
    assert read_manifest(out)["settings"]["context"] == 16


def test_same_command_twice_builds_nothing(tmp_path, tiny_checkpoint, text_corpus):
    run(tmp_path / "c", tiny_checkpoint, text_corpus)
    assert run(tmp_path / "c", tiny_checkpoint, text_corpus).built_shards == 0


def test_bad_inputs_fail_with_one_clear_error(tmp_path, tiny_checkpoint, text_corpus):
    with pytest.raises(ValueError, match="--tokens must be a positive"):
        run(tmp_path / "a", tiny_checkpoint, text_corpus, tokens=0)
    with pytest.raises(HookNameError, match="blocks.1.hook_resid_post"):
        run(tmp_path / "b", tiny_checkpoint, text_corpus, hook="blocks.1.hook_resid_psot")
    with pytest.raises(CorpusError):
        run(tmp_path / "c", tiny_checkpoint, tmp_path / "no-such-corpus")
    with pytest.raises(CacheError, match="fewer than"):
        run(tmp_path / "d", tiny_checkpoint, text_corpus, tokens=10_000_000)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="cannot write to --out"):
        run(blocker / "sub", tiny_checkpoint, text_corpus)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not part of an activation cache"):
        run(foreign, tiny_checkpoint, text_corpus)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_empty_corpus(tmp_path, tiny_checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    with pytest.raises(CorpusError, match="empty"):
        run(tmp_path / "c", tiny_checkpoint, empty)


def test_non_utf8_text_is_decoded_and_counted(tmp_path, tiny_checkpoint, text_corpus):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 200)
    run(tmp_path / "c", tiny_checkpoint, [bad, text_corpus], tokens=200)
    stats = read_manifest(tmp_path / "c")["corpus_stats"]
    assert stats["n_files_with_bad_utf8"] == 1 and stats["n_replacement_chars"] > 0


def test_manifest_is_json_with_reproduction_settings(tmp_path, tiny_checkpoint, text_corpus):
    run(tmp_path / "c", tiny_checkpoint, text_corpus)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    for key in ("model", "hook_name", "corpus", "tokens", "context", "dtype", "bos_dropped"):
        assert key in m["settings"]
    assert all(len(s["sha256"]) == 64 for s in m["shards"])


def test_sequence_tokens_rebuilds_contexts(tmp_path, tiny_checkpoint, text_corpus):
    from activations.cache import sequence_tokens
    from activations.models import ModelSource, source_from_manifest

    run(tmp_path / "c", tiny_checkpoint, text_corpus)
    m = read_manifest(tmp_path / "c")
    model = load_local_checkpoint(tiny_checkpoint)
    docs = [p.read_text() for p in sorted(text_corpus.glob("*.txt"))]
    seqs = np.stack(list(pack_contexts(docs, model.tokenizer, 32))[: m["n_sequences"]])
    np.testing.assert_array_equal(sequence_tokens(tmp_path / "c", np.array([0, 5, 3])), seqs[[0, 5, 3]])
    assert source_from_manifest(m["settings"]["model"]) == ModelSource(name=tiny_checkpoint.name,
                                                                       path=str(tiny_checkpoint.resolve()))


# --- what a harvest may touch: only its own cache, one writer at a time ---------------------------------------------


def edit_manifest(out: Path, edit) -> None:
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))


def test_resume_never_touches_a_file_the_manifest_names_outside(tmp_path, tiny_checkpoint, text_corpus):
    out = tmp_path / "c"
    run(out, tiny_checkpoint, text_corpus)
    victim = tmp_path / "victim.npy"
    victim.write_bytes(b"not a shard")  # unverifiable: the old harvest unlinked it
    for name in ("../victim.npy", str(victim)):
        edit_manifest(out, lambda m, name=name: m["shards"][1].update(file=name))
        with pytest.raises(CacheError, match=r"shards\[1\].file must be a plain file name.*--overwrite"):
            run(out, tiny_checkpoint, text_corpus)
        assert victim.read_bytes() == b"not a shard"
    run(out, tiny_checkpoint, text_corpus, overwrite=True)  # rebuilds inside the cache only
    assert victim.read_bytes() == b"not a shard"
    assert read_manifest(out)["complete"]


def test_symlinked_shard_is_replaced_not_followed(tmp_path, tiny_checkpoint, text_corpus, capsys):
    out = tmp_path / "c"
    run(out, tiny_checkpoint, text_corpus)
    before = cache_arrays(out)
    victim = tmp_path / "victim.npy"
    (out / "acts-00001.npy").rename(victim)
    (out / "acts-00001.npy").symlink_to(victim)
    kept = victim.read_bytes()
    assert run(out, tiny_checkpoint, text_corpus).built_shards == 1
    assert "leads outside the cache" in capsys.readouterr().err
    assert victim.read_bytes() == kept and not (out / "acts-00001.npy").is_symlink()
    for a, b in zip(before, cache_arrays(out), strict=True):
        np.testing.assert_array_equal(a, b)


def test_second_harvest_into_one_cache_is_refused(tmp_path, tiny_checkpoint, text_corpus):
    import os

    from activations.guard import DirLock, LockedError

    out = tmp_path / "c"
    with DirLock(out, "cache"):  # another harvest holds the cache (a second DirLock conflicts, as in a process)
        for overwrite in (False, True):
            with pytest.raises(LockedError, match=f"PID {os.getpid()}"):
                run(out, tiny_checkpoint, text_corpus, overwrite=overwrite)
    assert not out.exists()  # refused before anything was made
    run(out, tiny_checkpoint, text_corpus)
    from activations.loader import ActivationLoader

    loader = ActivationLoader(out, 64)  # a reader (train, eval, dashboard)
    with pytest.raises(LockedError):
        run(out, tiny_checkpoint, text_corpus, overwrite=True, context=16)
    assert read_manifest(out)["settings"]["context"] == 32
    loader.close()
    run(out, tiny_checkpoint, text_corpus, overwrite=True, context=16)


def test_harvest_records_its_checksums_for_the_first_reader(tmp_path, tiny_checkpoint, text_corpus, monkeypatch):
    import activations.checksums as checksums
    from activations.loader import ActivationLoader

    out = tmp_path / "c"
    run(out, tiny_checkpoint, text_corpus)
    calls = []
    monkeypatch.setattr(checksums, "sha256_file", lambda path, *a, **kw: calls.append(path) or "0" * 64)
    ActivationLoader(out, 64).close()
    assert calls == []  # the harvest hashed every shard as it wrote it
    assert run(out, tiny_checkpoint, text_corpus).built_shards == 0  # its record is part of the cache
