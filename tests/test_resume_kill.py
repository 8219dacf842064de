"""A harvest killed with SIGKILL at random moments resumes to the same cache as an uninterrupted one."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

from activations.cache import read_manifest
from tests.conftest import CORPUS_TEXT
from tests.test_harvest import cache_arrays


def harvest_cmd(out, checkpoint, corpus):
    return [sys.executable, "-m", "cli", "harvest", "--out", str(out), "--model-path", str(checkpoint),
            "--hook", "blocks.1.hook_resid_post", "--corpus", str(corpus), "--tokens", "12000",
            "--context", "32", "--dtype", "float32", "--batch-size", "2", "--shard-tokens", "124",
            "--no-progress"]


def test_sigkill_twice_then_resume_equals_uninterrupted(tmp_path, tiny_checkpoint):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(200):
        (corpus / f"d{i:03d}.txt").write_text(f"Text {i}: " + CORPUS_TEXT[i % 4][: 300 + 7 * i])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(harvest_cmd(full, tiny_checkpoint, corpus), check=True, env=env, capture_output=True)
    n_shards = read_manifest(full)["n_shards"]
    rng = random.Random(1234)
    listed = []
    for _ in range(2):
        proc = subprocess.Popen(harvest_cmd(killed, tiny_checkpoint, corpus), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = (listed[-1] if listed else 0) + rng.randint(1, n_shards // 3)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(read_manifest(killed)["shards"]) >= target:
                    break
            except Exception:  # manifest not written yet
                pass
            time.sleep(0.005)
        time.sleep(rng.random() * 0.05)  # land anywhere inside the next shard's work
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (killed / "manifest.json").exists():  # killed before its first manifest (a slow start under load)
            listed.append(0)
            continue
        m = read_manifest(killed)
        assert not m["complete"], "the harvest finished before it was killed; make it longer"
        listed.append(len(m["shards"]))
    subprocess.run(harvest_cmd(killed, tiny_checkpoint, corpus), check=True, env=env, capture_output=True)
    assert read_manifest(killed)["complete"]
    assert read_manifest(killed)["shards"] == read_manifest(full)["shards"]
    for a, b in zip(cache_arrays(full), cache_arrays(killed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not list(killed.glob("*.tmp"))
