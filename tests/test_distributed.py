"""torch.distributed: the harvest split over ranks, settings agreement, multi-node training over c10d rendezvous."""

import json
import os
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from activations.cache import read_manifest
from activations.distributed import (
    Ranks,
    block_range,
    disagreement,
    env_ranks,
    rank_device,
    settings_digest,
)
from activations.harvest import HarvestConfig, harvest, progress_file
from tests.conftest import CORPUS_TEXT
from tests.ports import free_port
from tests.test_harvest import HOOK, cache_arrays

ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}



# --- pure pieces ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(7, 2), (2, 3), (100, 8), (0, 2), (5, 1)])
def test_block_ranges_partition_the_items_in_rank_order(n, world):
    blocks = [block_range(n, r, world) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))  # disjoint, complete, rank 0 first
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        block_range(n, 2, 2)


def test_disagreement_names_each_differing_setting_and_rank():
    base = {"tokens": 100, "corpus": {"files": ["a"]}, "context": 32}
    digests = [settings_digest(s) for s in (base, base, {**base, "tokens": 200},
                                            {**base, "corpus": {"files": ["b"]}, "tokens": 200})]
    assert disagreement(digests) == {"corpus": [3], "tokens": [2, 3]}
    assert disagreement([settings_digest(base)] * 3) == {}
    assert disagreement([settings_digest(base), settings_digest({**base, "extra": 1})]) == {"extra": [1]}


def test_env_ranks_and_rank_device():
    assert env_ranks({}) == Ranks(0, 1, 0) and not env_ranks({}).distributed
    assert env_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    with pytest.raises(ValueError, match="RANK 4 is outside WORLD_SIZE 4"):
        env_ranks({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="must be integers"):
        env_ranks({"RANK": "x"})
    assert rank_device("cuda", 2, 1) == torch.device("cuda", 1)
    assert rank_device("cuda:0", 2, 1) == torch.device("cuda", 0)  # an explicit index wins
    assert rank_device("cuda", 1, 1) == torch.device("cuda")
    assert rank_device("cpu", 2, 1) == torch.device("cpu")


def test_settle_tells_every_rank_which_rank_failed(monkeypatch):
    import activations.distributed as d

    monkeypatch.setattr(d, "all_gather", lambda obj, ranks: [None, "CacheError: disk full", obj][: ranks.world_size])
    with pytest.raises(d.DistributedError, match="rank 1 failed while building shards: CacheError: disk full"):
        d.settle("building shards", Ranks(0, 2, 0), lambda: 5)
    with pytest.raises(KeyError, match="mine"):  # a failed rank raises its own error
        d.settle("building shards", Ranks(2, 3, 0), lambda: {}["mine"])
    monkeypatch.setattr(d, "all_gather", lambda obj, ranks: [None] * ranks.world_size)
    assert d.settle("building shards", Ranks(1, 2, 1), lambda: 5) == 5
    assert d.settle("one process", Ranks(), lambda: 7) == 7


def test_check_agreement_message_names_fields_and_ranks(monkeypatch):
    import activations.distributed as d

    other = settings_digest({"tokens": 5, "context": 3})
    monkeypatch.setattr(d, "all_gather", lambda obj, ranks: [obj, other, other])
    with pytest.raises(d.DistributedError, match=r"3 ranks of this `vsae harvest` disagree on context \(ranks 1, 2 "
                       r"differ from rank 0\); start every rank with the same flags"):
        d.check_agreement({"tokens": 5, "context": 4}, Ranks(0, 3, 0), "harvest")
    monkeypatch.setattr(d, "all_gather", lambda obj, ranks: [obj, obj, other])
    with pytest.raises(d.DistributedError, match=r"context \(rank 2 differs from rank 0\); start"):
        d.check_agreement({"tokens": 5, "context": 4}, Ranks(0, 3, 0), "harvest")


# --- distributed harvest: two gloo processes under torchrun ----------------------------------------------------------


def harvest_args(out: Path, checkpoint: Path, corpus: Path, **kw) -> list[str]:
    flags = {"out": out, "model-path": checkpoint, "hook": HOOK, "corpus": corpus, "tokens": 2300, "context": 32,
             "dtype": "float32", "batch-size": 2, "shard-tokens": 124, "device": "cpu", **kw}
    return [a for k, v in flags.items() for a in (f"--{k}", str(v))] + ["--no-progress"]


def torchrun(args: list[str], nproc: int = 2, script: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *(script or ["-m", "cli"]), *args]


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("long-corpus")
    for i in range(60):
        (corpus / f"d{i:03d}.txt").write_text(f"Text {i}: " + CORPUS_TEXT[i % 4][: 300 + 7 * i])
    return corpus


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_checkpoint, long_corpus) -> Path:
    """The reference: the same settings harvested by one process."""
    out = tmp_path_factory.mktemp("single") / "cache"
    harvest(HarvestConfig(out=str(out), model_path=str(tiny_checkpoint), hook=HOOK, corpus=[str(long_corpus)],
                          tokens=2300, context=32, dtype="float32", batch_size=2, shard_tokens=124, device="cpu",
                          progress=False))
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert mb["complete"] and mb["n_shards"] == ma["n_shards"]
    assert [e["sha256"] for e in mb["shards"]] == [e["sha256"] for e in ma["shards"]]
    for x, y in zip(cache_arrays(a), cache_arrays(b), strict=True):
        np.testing.assert_array_equal(x, y)  # rows and (token, sequence, position), bit for bit
    assert not list(b.glob("progress-*")) and not list(b.glob("*.tmp"))


def test_contexts_from_any_sequence_equal_the_one_pass_contexts(tiny_checkpoint, long_corpus):
    """A rank starts tokenizing at the document holding its first token; its contexts are the single pass's,
    wherever the start falls: inside a document, on its EOS, on a document's first token."""
    from transformers import AutoTokenizer

    import activations.harvest as h
    from activations.corpus import corpus_documents
    from activations.tokens import pack_contexts

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    cfg = HarvestConfig(out="unused", corpus=[str(long_corpus)], context=32, device="cpu")
    docs = [d for d in corpus_documents(cfg.corpus) if d]
    ends = h._token_ends(cfg, tok, 10**9, Ranks())
    want = np.cumsum([len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs])
    np.testing.assert_array_equal(ends, want)
    assert h._token_ends(cfg, tok, 1, Ranks()).size == len(docs)  # one round of COUNT_DOCS covers them all
    for context, starts in ((32, [*range(0, ends[-1] // 31, 7), ends[-1] // 31 - 1, ends[-1] // 31]),  # to the end
                            (2, sorted({int(e) + o for e in ends[:-1] for o in (-1, 0, 1)}))):  # around each EOS
        full = list(pack_contexts(iter(docs), tok, context))
        for first in starts:
            got = list(islice(h._contexts_from(iter(docs), tok, context, first, ends), 2))
            assert [g.tolist() for g in got] == [f.tolist() for f in full[first : first + 2]], (context, first)


@pytest.mark.slow
def test_two_rank_harvest_equals_one_process(tmp_path, tiny_checkpoint, long_corpus, single):
    out = tmp_path / "cache"
    t0 = time.perf_counter()
    ddp = subprocess.run(torchrun(["harvest", *harvest_args(out, tiny_checkpoint, long_corpus)]), env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    print(f"2-rank harvest: {time.perf_counter() - t0:.1f} s")
    assert ddp.stdout.count("cache ") == 1  # rank 0 alone reports
    m = read_manifest(out)
    assert m["harvest"]["world_size"] == 2 and m["n_shards"] % 2  # an odd count: the blocks differ in size
    assert_same_cache(single, out)


def _children(pid: int) -> dict[int, dict[str, str]]:
    """{pid: environment} of the processes whose parent is `pid`."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
                found[int(proc.name)] = env
        except (OSError, ValueError):
            continue
    return found


def _kill_rank_after(proc: subprocess.Popen, out: Path, rank: int, shards: int, deadline: float) -> int:
    """SIGKILL the worker of `rank` once its progress file lists `shards` shards; returns how many it listed."""
    listed = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            listed = len(json.loads((out / progress_file(rank)).read_text())["shards"])
        except (OSError, ValueError):
            pass
        if listed >= shards:
            break
        time.sleep(0.01)
    victims = [p for p, env in _children(proc.pid).items() if env.get("RANK") == str(rank)]
    assert proc.poll() is None and victims, "the harvest ended before it was killed; make it longer"
    os.kill(victims[0], signal.SIGKILL)
    return listed


@pytest.mark.slow
def test_harvest_resumes_after_one_rank_is_killed(tmp_path, tiny_checkpoint, long_corpus, single):
    """Rank 1 is SIGKILLed mid-way (its partial shard left as .tmp); one of its listed shards is then truncated.
    Rerunning the same command rebuilds exactly what is missing or bad and ends with the single-process cache."""
    out = tmp_path / "cache"
    args = ["harvest", *harvest_args(out, tiny_checkpoint, long_corpus)]
    proc = subprocess.Popen(torchrun(args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        listed = _kill_rank_after(proc, out, rank=1, shards=3, deadline=time.time() + 300)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    m = read_manifest(out)
    n_shards = m["n_shards"]
    assert not m["complete"] and listed >= 3
    progress = json.loads((out / progress_file(1)).read_text())["shards"]
    assert len(progress) < len(block_range(n_shards, 1, 2))  # killed before its block was done
    victim = out / progress[0]["file"]
    victim.write_bytes(victim.read_bytes()[:-64])
    again = subprocess.run(torchrun(args), env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{victim.name} is truncated" in again.stderr
    assert_same_cache(single, out)


@pytest.mark.slow
def test_ranks_that_disagree_on_settings_are_refused_before_anything_is_written(tmp_path, tiny_checkpoint,
                                                                                   long_corpus):
    out = tmp_path / "cache"
    launcher = tmp_path / "launch.py"  # rank 1 is started with another --tokens and --context
    launcher.write_text(
        "import os, sys\nfrom cli import main\nargs = sys.argv[1:]\n"
        "if os.environ['RANK'] == '1':\n"
        "    args[args.index('--tokens') + 1] = '3000'\n"
        "    args[args.index('--context') + 1] = '16'\n"
        "sys.exit(main(args))\n")
    got = subprocess.run(torchrun(["harvest", *harvest_args(out, tiny_checkpoint, long_corpus)],
                                  script=[str(launcher)]), env=ENV, capture_output=True, text=True, timeout=600)
    assert got.returncode != 0
    assert "disagree on context (rank 1 differs from rank 0); tokens (rank 1 differs from rank 0)" in got.stderr
    assert "vsae harvest: error:" in got.stderr  # one line, not a traceback
    assert not out.exists()


# --- training: ranks read their own rows; two "machines" over the c10d rendezvous ------------------------------------


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    from tests.synthetic import planted_features, synthetic_cache

    rows, _ = planted_features(8_000, d_in=32, n_features=128, seed=1)
    return synthetic_cache(tmp_path_factory.mktemp("small") / "cache", rows * 3.0)


def test_each_rank_reads_only_its_own_rows_of_each_batch(small_cache, monkeypatch):
    from activations.loader import ActivationLoader

    def batches(rank: int, world: int) -> tuple[list[torch.Tensor], list[np.ndarray]]:
        loader = ActivationLoader(small_cache, 64, seed=3, device_budget=0.0, dtype=torch.float32)
        read = []
        real = loader.gather
        monkeypatch.setattr(loader, "gather", lambda rows, out=None: (read.append(rows.copy()), real(rows, out))[1])
        stream = loader.stream(5, rank=rank, world_size=world)
        got = [next(stream) for _ in range(4)]
        stream.close()
        loader.close()
        return got, read

    whole, _ = batches(0, 1)
    (b0, r0), (b1, r1) = batches(0, 2), batches(1, 2)
    for i in range(4):
        assert b0[i].shape[0] == b1[i].shape[0] == 32
        torch.testing.assert_close(whole[i][0::2], b0[i], rtol=0, atol=0)
        torch.testing.assert_close(whole[i][1::2], b1[i], rtol=0, atol=0)
    rows0, rows1 = np.concatenate(r0), np.concatenate(r1)
    assert not np.intersect1d(rows0, rows1).size  # neither rank reads a row of the other's half
    assert rows0.size <= 32 * (4 + 2 * 2 + 2)  # its own rows of the batches drawn (and a few prefetched), no more


def train_args(small_cache: Path, out: Path) -> list[str]:
    return ["train", "--cache", str(small_cache), "--out", str(out), "--steps", "8", "--batch-size", "256",
            "--lr", "1e-3", "--lr-warmup-steps", "2", "--d-sae", "64", "--k", "4", "--no-progress",
            "--checkpoint-every", "8", "--device", "cpu"]


@pytest.mark.slow
def test_two_nodes_over_c10d_rendezvous_train_like_one_process(tmp_path, small_cache):
    """Two torchrun agents, one process each, meet over the c10d TCP rendezvous on localhost as two machines
    would (`--nnodes 2`); the result equals one process's run of the same global batch."""
    from safetensors.torch import load_file

    single = subprocess.run([sys.executable, "-m", "cli", *train_args(small_cache, tmp_path / "one")], env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                                "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "vsae-test",
                                "--local-addr", "127.0.0.1", "-m", "cli", *train_args(small_cache, tmp_path / "two")],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [a.communicate(timeout=600) for a in agents]
    assert all(a.returncode == 0 for a in agents), [err[-2000:] for _, err in outputs]
    assert sum(out.count("run written to") for out, _ in outputs) == 1  # one global rank 0
    a = load_file(str(tmp_path / "one" / "trainer_state.safetensors"))
    b = load_file(str(tmp_path / "two" / "trainer_state.safetensors"))
    for key in ("param.W_enc", "param.W_dec", "param.b_enc", "param.b_dec"):
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-4, atol=1e-5, err_msg=key)
