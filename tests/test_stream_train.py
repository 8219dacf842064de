"""Streaming training (`vsae train --model ...`): the model's activations through a shuffle buffer into the trainer."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from activations.cache import manifest_hash, read_manifest
from activations.harvest import HarvestConfig, harvest
from activations.loader import ActivationLoader, split_sequences
from activations.models import HookNameError
from activations.stream_source import StreamConfig, StreamSource, draw_slots, fill_slots, stream_tokens_for
from cli import main
from evals.provenance import check_runs, choose_split
from tests.crash import crash_at, restore
from tests.test_harvest import cache_arrays
from vsae.config import SAEConfig, TrainConfig
from vsae.run import read_run
from vsae.trainer import train

HOOK = "blocks.1.hook_resid_post"
SAE = SAEConfig(d_sae=64, k=4, dead_after=512)


def scfg(checkpoint, corpus, **kw) -> StreamConfig:
    base = dict(model_path=str(checkpoint), hook=HOOK, corpus=[str(corpus)], context=32, dtype="float32",
                forward_batch=4, shard_tokens=200, stream_tokens=1500, shuffle_buffer=512)
    base.update(kw)
    return StreamConfig(**base)


def tcfg(out, **kw) -> TrainConfig:
    base = dict(out=str(out), steps=20, batch_size=64, lr=1e-3, lr_warmup_steps=2, log_every=5,
                checkpoint_every=5, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def harvest_like(stream: StreamConfig, out) -> None:
    """`vsae harvest` with the stream's settings."""
    harvest(HarvestConfig(out=str(out), model_path=stream.model_path, hook=stream.hook, corpus=stream.corpus,
                          tokens=stream.stream_tokens, context=stream.context, dtype=stream.dtype,
                          batch_size=stream.forward_batch, shard_tokens=stream.shard_tokens, device="cpu",
                          progress=False))


def state(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "trainer_state.safetensors"))


def assert_same_state(a, b) -> None:
    a, b = state(a), state(b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_buffer_slots_and_drain():
    """Draws are distinct slots, a pure function of (seed, step); a short refill drops the holes it cannot fill."""
    a = draw_slots(3, 7, 100, 10)
    assert len(set(a.tolist())) == 10 and a.max() < 100
    np.testing.assert_array_equal(a, draw_slots(3, 7, 100, 10))
    assert not np.array_equal(a, draw_slots(3, 8, 100, 10))
    buf = torch.arange(6.0)[:, None].repeat(1, 2)
    n = fill_slots(buf, 6, np.array([4, 1, 2]), torch.full((1, 2), 9.0))
    assert n == 4 and buf[:4, 0].tolist() == [0.0, 3.0, 9.0, 5.0]  # slot 4 refilled; 1 and 2 dropped
    # the stream's length for a number of training rows: the fewest whole sequences whose train split holds them
    n = stream_tokens_for(1000, 31, 0.05) // 31
    assert len(split_sequences(n, 0.05)[0]) * 31 >= 1000 > len(split_sequences(n - 1, 0.05)[0]) * 31


def test_one_pass_draws_every_training_row_once_and_no_held_out_row(tmp_path, tiny_checkpoint, text_corpus):
    """Against a harvested cache of the same settings: the batches of a whole pass are exactly the loader's
    training split (held-out sequences never enter the buffer), and the scale is the first fill's."""
    stream = scfg(tiny_checkpoint, text_corpus, shuffle_buffer=300)
    harvest_like(stream, tmp_path / "c")
    src = StreamSource(stream, 50, seed=1, eval_fraction=0.1, device="cpu")
    batches = src.stream(0)
    drawn = torch.cat([next(batches) for _ in range(src.n_tokens // 50)])
    batches.close()
    train_rows = ActivationLoader(tmp_path / "c", 50, split="train", eval_fraction=0.1, shuffle=False).rows
    acts, _ = cache_arrays(tmp_path / "c")
    want = acts[train_rows]  # the training split in stream order
    where: dict[bytes, list[int]] = {}
    for i, row in enumerate(want[::-1]):  # repeated texts give equal rows: each is matched once, earliest first
        where.setdefault(row.tobytes(), []).append(len(want) - 1 - i)
    drawn_at = np.array([where[row.tobytes()].pop() for row in drawn.numpy()])  # a row not in the split: error
    assert len(drawn_at) == len(want) - len(want) % 50
    assert drawn_at[:50].max() < 300 and not np.array_equal(np.sort(drawn_at[:50]), np.arange(50))  # mixed
    assert drawn_at[-50:].mean() > drawn_at[:50].mean() + 300  # and still following the stream
    sample = want[:300].astype(np.float64)
    assert src.manifest["mean_squared_norm"] == pytest.approx(float((sample ** 2).sum(1).mean()), rel=1e-12)


def test_trains_loss_falls_and_records_the_stream(tmp_path, tiny_checkpoint, text_corpus):
    stream = scfg(tiny_checkpoint, text_corpus, stream_tokens=None)  # just enough for 40 steps
    [run] = train(tcfg(tmp_path / "r", steps=40, lr=3e-3), [SAE], stream=stream)
    info = json.loads((run / "train.json").read_text())
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert info["complete"] and info["step"] == 40 and len(lines) == 8
    assert lines[-1]["mse"] < 0.7 * lines[0]["mse"]
    assert info["stream"]["norm_sample_tokens"] == 512 and info["stream"]["model_path"] == str(tiny_checkpoint)
    assert info["hook_name"] == HOOK and info["model"]["kind"] == "local"
    n_seqs = info["stream"]["stream_tokens"] // 31
    assert info["stream"]["stream_tokens"] == stream_tokens_for(40 * 64, 31, 0.05)
    assert info["train_tokens_available"] == len(split_sequences(n_seqs, 0.05)[0]) * 31 >= 40 * 64


def test_resume_after_a_crash_equals_a_straight_run(tmp_path, tiny_checkpoint, text_corpus, monkeypatch):
    """Checkpoints every 5 steps; a crash at step 13 resumes from step 10's buffer and stream position. The
    --cache-out the two runs write is the same too."""
    straight = train(tcfg(tmp_path / "straight"), [SAE],
                     stream=scfg(tiny_checkpoint, text_corpus, cache_out=str(tmp_path / "c1")))[0]
    real = crash_at(monkeypatch, 13)
    stream = scfg(tiny_checkpoint, text_corpus, cache_out=str(tmp_path / "c2"))
    with pytest.raises(RuntimeError, match="simulated"):
        train(tcfg(tmp_path / "resumed"), [SAE], stream=stream)
    saved = state(tmp_path / "resumed")
    assert int(saved["stream.step"]) == 10 and saved["stream.buffer"].shape == (512, 32)
    restore(monkeypatch, real)
    train(tcfg(tmp_path / "resumed"), [SAE], stream=stream, resume=True)
    assert_same_state(straight, tmp_path / "resumed")
    for a, b in zip(cache_arrays(tmp_path / "c1"), cache_arrays(tmp_path / "c2"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cache_out_equals_a_harvest_and_eval_accepts_the_run(tmp_path, tiny_checkpoint, text_corpus):
    """One pass trains and keeps the data: --cache-out is the cache `vsae harvest` writes with the same settings
    (the run's 20 steps use part of the stream: the rest is forwarded to finish the cache), and its held-out
    sequences are ones the run never drew."""
    stream = scfg(tiny_checkpoint, text_corpus, cache_out=str(tmp_path / "out"))
    [run] = train(tcfg(tmp_path / "r", steps=10), [SAE], stream=stream)
    harvest_like(stream, tmp_path / "h")
    mine, theirs = read_manifest(tmp_path / "out"), read_manifest(tmp_path / "h")
    assert mine["complete"]
    drop = ("corpus_stats",)
    assert {k: v for k, v in mine.items() if k not in drop} == {k: v for k, v in theirs.items() if k not in drop}
    for a, b in zip(cache_arrays(tmp_path / "out"), cache_arrays(tmp_path / "h"), strict=True):
        np.testing.assert_array_equal(a, b)
    info = read_run(run).train
    assert info["cache_hash"] == manifest_hash(mine) and info["cache"] == str(tmp_path / "out")
    check_runs([read_run(run)], mine, manifest_hash(mine), other_cache=False)  # raises if refused
    split = choose_split([read_run(run)], mine, other_cache=False)
    held = split.sequences(mine["n_sequences"])
    np.testing.assert_array_equal(held, split_sequences(mine["n_sequences"], 0.05)[1])


def test_several_saes_share_the_stream(tmp_path, tiny_checkpoint, text_corpus):
    cfgs = [SAE, SAEConfig(d_sae=64, k=8, dead_after=512)]
    runs = train(tcfg(tmp_path / "sweep", steps=10), cfgs, stream=scfg(tiny_checkpoint, text_corpus))
    assert [r.name for r in runs] == ["k4", "k8"]
    [alone] = train(tcfg(tmp_path / "alone", steps=10), [cfgs[1]], stream=scfg(tiny_checkpoint, text_corpus))
    assert_same_state(runs[1], alone)


def cli_args(checkpoint, corpus, out, *extra):
    return ["train", "--model-path", str(checkpoint), "--hook", HOOK, "--corpus", str(corpus), "--context", "32",
            "--forward-batch", "4", "--shard-tokens", "200", "--shuffle-buffer", "512", "--out", str(out),
            "--batch-size", "64", "--d-sae", "64", "--k", "4", "--lr", "1e-3", "--device", "cpu", "--no-progress",
            *extra]


def test_refused_flag_combinations(tmp_path, tiny_checkpoint, text_corpus, capsys):
    def refused(args, match):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert all(m in err for m in match), err

    refused(cli_args(tiny_checkpoint, text_corpus, tmp_path / "a", "--cache", str(tmp_path)),
            ["--cache trains on a harvested cache", "--model-path"])
    refused(["train", "--corpus", str(text_corpus), "--out", str(tmp_path / "b")], ["--corpus", "also give --model"])
    refused(["train", "--out", str(tmp_path / "c")], ["give --cache DIR", "--model NAME"])
    refused(cli_args(tiny_checkpoint, text_corpus, tmp_path / "d", "--shuffle-buffer", "32"),
            ["--shuffle-buffer 32 is smaller than one batch"])
    refused(cli_args(tiny_checkpoint, text_corpus, tmp_path / "e", "--stream-tokens", "600", "--steps", "50"),
            ["needs 3,200 training rows", "--stream-tokens 600"])
    with pytest.raises(HookNameError, match="blocks.1.hook_resid_post"):
        StreamSource(scfg(tiny_checkpoint, text_corpus, hook="blocks.1.hook_resid_pots"), 64, seed=0,
                     eval_fraction=0.05, device="cpu")
    with pytest.raises(ValueError, match="runs in one process"):
        StreamSource(scfg(tiny_checkpoint, text_corpus), 64, seed=0, eval_fraction=0.05, device="cpu", world_size=2)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_checkpoint, text_corpus):
    """The CLI run killed with SIGKILL after a checkpoint, then `--resume`d, ends where an uninterrupted run ends."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    extra = ("--steps", "40", "--checkpoint-every", "4", "--stream-tokens", "3000")
    cmd = [sys.executable, "-m", "cli"]
    subprocess.run(cmd + cli_args(tiny_checkpoint, text_corpus, tmp_path / "full", *extra), check=True, env=env,
                   capture_output=True)
    proc = subprocess.Popen(cmd + cli_args(tiny_checkpoint, text_corpus, tmp_path / "killed", *extra), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "killed" / "train.json").is_file():
            break
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = read_run(tmp_path / "killed").train["step"]
    assert 0 < step < 40, "the run finished before it was killed"
    subprocess.run(cmd + cli_args(tiny_checkpoint, text_corpus, tmp_path / "killed", *extra, "--resume"),
                   check=True, env=env, capture_output=True)
    assert_same_state(tmp_path / "full", tmp_path / "killed")
