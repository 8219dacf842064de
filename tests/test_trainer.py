import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.ports import free_port
from tests.synthetic import planted_features, synthetic_cache
from vsae.checkpoint import CheckpointError, read_sae
from vsae.config import SAEConfig, TrainConfig
from vsae.run import RunError
from vsae.trainer import NonFiniteLoss, train


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    rows, _ = planted_features(16_000, d_in=32, n_features=128, seed=1)
    return synthetic_cache(tmp_path_factory.mktemp("small") / "cache", rows * 3.0)


def tcfg(cache, out, **kw):
    base = dict(cache=str(cache), out=str(out), steps=20, batch_size=256, lr=1e-3, lr_warmup_steps=2,
                log_every=5, checkpoint_every=10, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def weights(run):
    return load_file(str(run / "trainer_state.safetensors"))


def test_planted_features_are_recovered(tmp_path):
    rows, dirs = planted_features(120_000, d_in=64, n_features=512, active=5, seed=0)
    cache = synthetic_cache(tmp_path / "cache", rows)
    [run] = train(tcfg(cache, tmp_path / "run", steps=1500, batch_size=512, lr=2e-3, lr_warmup_steps=50,
                       checkpoint_every=10_000), [SAEConfig(d_sae=1024, k=8, dead_after=20_000)])
    w, _ = read_sae(run)
    dec = w.W_dec / w.W_dec.norm(dim=1, keepdim=True)
    best = (torch.from_numpy(dirs) @ dec.T).max(dim=1).values
    recovered = float((best > 0.9).float().mean())
    assert recovered >= 0.9, f"only {recovered:.2%} of the planted directions recovered at cos > 0.9"


def test_run_directory_and_log(tmp_path, small_cache):
    [run] = train(tcfg(small_cache, tmp_path / "r"), [SAEConfig(d_sae=64, k=4)])
    info = json.loads((run / "train.json").read_text())
    assert info["step"] == 20 and info["complete"] and info["tokens_seen"] == 20 * 256
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [5, 10, 15, 20]
    assert {"loss", "mse", "l0", "dead_fraction", "tokens_per_s", "lr"} <= set(lines[0])
    assert lines[-1]["l0"] <= 4
    state = weights(run)
    torch.testing.assert_close(state["param.W_dec"].norm(dim=1), torch.ones(64))
    assert [p.name for p in tmp_path.glob(".r*")] == []  # no temp, old checkpoint or lock file left behind


@pytest.mark.parametrize("sae_cfg", [SAEConfig(d_sae=64, k=4),
                                     SAEConfig(variant="vsae", d_sae=64, k=4, decoder="free", pre_bias=False,
                                               b_dec_init="zero", aux_k_coef=0.0, sample=True, kl_coef=0.01)])
def test_saelens_loads_the_run_and_reconstructs_raw_activations(tmp_path, small_cache, sae_cfg):
    from sae_lens import SAE

    from activations.loader import ActivationLoader

    [run] = train(tcfg(small_cache, tmp_path / "r"), [sae_cfg])
    sl = SAE.load_from_disk(str(run), device="cpu")
    w, _ = read_sae(run)
    x = next(iter(ActivationLoader(small_cache, 100, split="eval", shuffle=False)))
    torch.testing.assert_close(sl.decode(sl.encode(x)), w.decode(w.encode(x)), rtol=1e-5, atol=1e-5)
    if sae_cfg.variant == "topk":  # 20 steps are enough for TopK to beat predicting the mean
        err = (w.decode(w.encode(x)) - x).pow(2).sum(-1).mean()
        assert err < (x - x.mean(0)).pow(2).sum(-1).mean()
    # vsae's own deterministic encoding of the trained module agrees with the export
    from vsae.variants import build_sae

    state = weights(run)
    sae = build_sae(sae_cfg, 32)
    sae.load_state_dict({k.removeprefix("param."): v for k, v in state.items() if k.startswith("param.")})
    scale = json.loads((run / "train.json").read_text())["norm_scale"]
    torch.testing.assert_close(sae.reconstruct(x / scale) * scale, w.decode(w.encode(x)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["topk", "vsae"])
def test_resume_after_interrupt_equals_straight_run(tmp_path, small_cache, monkeypatch, variant):
    cfg = SAEConfig(variant=variant, d_sae=64, k=4, sample=variant == "vsae", dead_after=512)
    [straight] = train(tcfg(small_cache, tmp_path / "straight"), [cfg])
    import vsae.trainer as tr

    real = tr.update_step

    def crash_at_13(s, x, step, *a):
        if step == 13:
            raise RuntimeError("simulated kill")  # no save: the run keeps its step-10 checkpoint
        real(s, x, step, *a)

    monkeypatch.setattr(tr, "update_step", crash_at_13)
    with pytest.raises(RuntimeError):
        train(tcfg(small_cache, tmp_path / "resumed"), [cfg])
    assert json.loads((tmp_path / "resumed" / "train.json").read_text())["step"] == 10
    monkeypatch.setattr(tr, "update_step", real)
    train(tcfg(small_cache, tmp_path / "resumed"), [cfg], resume=True)
    a, b = weights(straight), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == [5, 10, 15, 20]


def test_keyboard_interrupt_saves_progress(tmp_path, small_cache, monkeypatch):
    import vsae.trainer as tr

    real = tr.update_step

    def stop_at_7(s, x, step, *a):
        if step == 7:
            raise KeyboardInterrupt
        real(s, x, step, *a)

    monkeypatch.setattr(tr, "update_step", stop_at_7)
    with pytest.raises(KeyboardInterrupt):
        train(tcfg(small_cache, tmp_path / "r"), [SAEConfig(d_sae=64, k=4)])
    assert json.loads((tmp_path / "r" / "train.json").read_text())["step"] == 7


def test_several_saes_share_each_batch(tmp_path, small_cache):
    cfgs = [SAEConfig(d_sae=64, k=4), SAEConfig(d_sae=64, k=8), SAEConfig(variant="vsae", d_sae=64, k=4)]
    runs = train(tcfg(small_cache, tmp_path / "sweep"), cfgs)
    assert [r.name for r in runs] == ["topk-k4", "topk-k8", "vsae-k4"]
    [alone] = train(tcfg(small_cache, tmp_path / "alone"), [cfgs[1]])
    for key, v in weights(alone).items():
        torch.testing.assert_close(weights(runs[1])[key], v, rtol=0, atol=0, msg=key)


def test_bad_inputs(tmp_path, small_cache):
    train(tcfg(small_cache, tmp_path / "r", steps=10), [SAEConfig(d_sae=64, k=4)])
    with pytest.raises(RunError, match="holds a run already.*--resume"):
        train(tcfg(small_cache, tmp_path / "r", steps=10), [SAEConfig(d_sae=64, k=4)])
    with pytest.raises(RunError, match=r"differs from the saved one in sae\.k, train\.lr"):
        train(tcfg(small_cache, tmp_path / "r", steps=10, lr=5e-3), [SAEConfig(d_sae=64, k=5)], resume=True)
    rows, _ = planted_features(2000, d_in=16, n_features=32)
    narrow = synthetic_cache(tmp_path / "narrow", rows)
    with pytest.raises(RunError, match="width 16 .* width 32"):
        train(tcfg(narrow, tmp_path / "r", steps=10), [SAEConfig(d_sae=64, k=4)], resume=True)
    with pytest.raises(ValueError, match="k must be in 1..d_sae"):
        train(tcfg(small_cache, tmp_path / "x"), [SAEConfig(d_sae=64, k=65)])
    with pytest.raises(ValueError, match="k must be in 1..d_sae"):
        train(tcfg(small_cache, tmp_path / "x"), [SAEConfig(d_sae=64, k=0)])
    weights_file = tmp_path / "r" / "sae_weights.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="sae_weights.safetensors"):
        read_sae(tmp_path / "r")
    state_file = tmp_path / "r" / "trainer_state.safetensors"
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        train(tcfg(small_cache, tmp_path / "r", steps=10), [SAEConfig(d_sae=64, k=4)], resume=True)


def test_non_finite_loss_stops_with_step_and_term(tmp_path, small_cache, monkeypatch):
    from vsae.variants import TopKSAE

    real = TopKSAE.loss_terms
    calls = []

    def poisoned(self, x, progress, dead, generator=None, candidates=None):
        calls.append(1)
        out = real(self, x, progress, dead, generator, candidates)
        if len(calls) == 13:
            out.terms["mse"] = out.terms["mse"] * float("nan")
        return out

    monkeypatch.setattr(TopKSAE, "loss_terms", poisoned)
    with pytest.raises(NonFiniteLoss, match="loss term mse is not finite at step 12.*step 10"):
        train(tcfg(small_cache, tmp_path / "r"), [SAEConfig(d_sae=64, k=4)])
    assert json.loads((tmp_path / "r" / "train.json").read_text())["step"] == 10


def test_auxk_revives_latents_that_die_without_it(tmp_path, small_cache):
    """Half the latents start with encoder columns 100x too small, so TopK never picks them."""
    import vsae.variants as variants

    real_init = variants.TopKSAE.__init__

    def crippled(self, cfg, d_in, generator=None):
        real_init(self, cfg, d_in, generator)
        with torch.no_grad():
            self.W_enc[:, cfg.d_sae // 2 :] *= 0.01

    alive = {}
    for coef in (0.0, 1 / 32):
        variants.TopKSAE.__init__ = crippled
        try:
            [run] = train(tcfg(small_cache, tmp_path / f"aux{coef}", steps=60),
                          [SAEConfig(d_sae=64, k=4, aux_k_coef=coef, dead_after=1024, b_dec_init="zero")])
        finally:
            variants.TopKSAE.__init__ = real_init
        fired = weights(run)["tokens_since_fired"][32:] < 1024  # fired in the last 4 batches
        alive[coef] = int(fired.sum())
    assert alive[0.0] <= 2 and alive[1 / 32] >= 16, alive


def test_distributed_two_gloo_processes_match_one(tmp_path, small_cache):
    common = ["--cache", str(small_cache), "--steps", "10", "--batch-size", "256", "--lr", "1e-3",
              "--lr-warmup-steps", "2", "--d-sae", "64", "--k", "4", "--no-progress", "--checkpoint-every", "10"]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "cli", "train", "--out", str(tmp_path / "one"), *common],
                            env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "cli", "train", "--out", str(tmp_path / "two"), *common],
                         env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in ("param.W_enc", "param.W_dec", "param.b_enc", "param.b_dec"):
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-4, atol=1e-5, err_msg=key)


def test_non_finite_gradient_with_finite_loss_never_reaches_weights_or_checkpoint(tmp_path, small_cache,
                                                                                  monkeypatch):
    from vsae.variants import TopKSAE

    real = TopKSAE.before_step
    calls = []

    def poisoned(self):
        calls.append(1)
        if len(calls) == 10:  # step 9: without the check its NaN weights would be the step-10 checkpoint
            self.W_dec.grad[0, 0] = float("nan")
        real(self)

    monkeypatch.setattr(TopKSAE, "before_step", poisoned)
    with pytest.raises(NonFiniteLoss, match="gradient is not finite .*at step 9.*step 5"):
        train(tcfg(small_cache, tmp_path / "r", checkpoint_every=5), [SAEConfig(d_sae=64, k=4)])
    assert json.loads((tmp_path / "r" / "train.json").read_text())["step"] == 5
    assert all(torch.isfinite(v.float()).all() for v in weights(tmp_path / "r").values())


def test_interrupt_inside_a_step_saves_no_half_step(tmp_path, small_cache, monkeypatch):
    """Ctrl-C after opt.step() but before the step counter moves: the last whole step's state is what resumes."""
    from vsae.variants import TopKSAE

    cfg = SAEConfig(d_sae=64, k=4, dead_after=512)
    [straight] = train(tcfg(small_cache, tmp_path / "straight", checkpoint_every=5), [cfg])
    real = TopKSAE.after_step
    calls = []

    def interrupted(self):
        real(self)
        calls.append(1)
        if len(calls) == 8:  # step 7, weights already updated
            raise KeyboardInterrupt

    monkeypatch.setattr(TopKSAE, "after_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tcfg(small_cache, tmp_path / "r", checkpoint_every=5), [cfg])
    assert json.loads((tmp_path / "r" / "train.json").read_text())["step"] == 5
    monkeypatch.setattr(TopKSAE, "after_step", real)
    train(tcfg(small_cache, tmp_path / "r", checkpoint_every=5), [cfg], resume=True)
    a, b = weights(straight), weights(tmp_path / "r")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_sampled_vsae_firing_statistics_count_the_deterministic_code(tmp_path, small_cache, monkeypatch):
    """Latents the exported encoder never selects (b_enc -100) are picked by the noise alone: not fired."""
    from vsae.checkpoint import SPARSITY_FILENAME
    from vsae.variants import VariationalTopKSAE

    real_init = VariationalTopKSAE.__init__

    def crippled(self, cfg, d_in, generator=None):
        real_init(self, cfg, d_in, generator)
        with torch.no_grad():
            self.b_enc[cfg.d_sae // 2 :] = -100.0

    monkeypatch.setattr(VariationalTopKSAE, "__init__", crippled)
    cfg = SAEConfig(variant="vsae", d_sae=64, k=4, sample=True, dead_after=256)
    [run] = train(tcfg(small_cache, tmp_path / "r"), [cfg])
    state = weights(run)
    assert float(state["param.b_enc"][32:].max()) < -99  # still never selected by the deterministic encoder
    assert float(state["fire_count"][32:].sum()) == 0 and float(state["fire_count"][:32].sum()) > 0
    assert int((state["tokens_since_fired"][32:] >= 256).sum()) == 32  # dead for AuxK
    log10_density = next(iter(load_file(str(run / SPARSITY_FILENAME)).values()))
    assert float(log10_density[32:].max()) <= -10 < float(log10_density[:32].max())  # SAELens: log10(0 + 1e-10)
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert all(line["l0"] <= 4 for line in lines)


def _nan_rank_worker(rank: int, port: int, out: str, results, where: str) -> None:
    import datetime
    from pathlib import Path

    import torch.distributed as dist

    from vsae.trainer import check_finite, fresh_state, update_step

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    cfg = TrainConfig(cache="unused", out=out, steps=4, batch_size=32, lr=1e-3, progress=False)
    s = fresh_state(Path(out) / f"rank{rank}", SAEConfig(d_sae=16, k=2), cfg, 8, 4, torch.device("cpu"),
                    sparse=True, rank=rank)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(rank))
    if rank == 1 and where == "input":
        x[3, 2] = float("nan")
    if rank == 1 and where == "gradient":  # after the gradients' all_reduce: only this rank sees it

        def poison() -> None:
            s.sae.W_dec.grad[0, 0] = float("nan")

        s.sae.before_step = poison
    try:
        update_step(s, x, 0, 4, cfg, False, 2)
        check_finite([s], 2)  # what the loop runs at log and checkpoint steps
        results.put((rank, "stepped"))
    except NonFiniteLoss as e:
        results.put((rank, f"NonFiniteLoss: {e}"))
    except Exception as e:  # a peer that left mid-collective, or a timeout
        results.put((rank, f"{type(e).__name__}: {e}"))
    dist.destroy_process_group()


@pytest.mark.parametrize("where", ["input", "gradient"])
def test_distributed_ranks_agree_on_a_non_finite_step(tmp_path, where):
    """One rank's NaN stops every rank with NonFiniteLoss before anyone steps, none waiting in an all_reduce."""
    import multiprocessing

    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_nan_rank_worker, args=(r, port, str(tmp_path), results, where)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in procs:
            rank, what = results.get(timeout=120)
            got[rank] = what
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(what.startswith("NonFiniteLoss") for what in got.values()), got
    if where == "input":
        assert "loss term mse is not finite at step 0" in got[1], got
    else:
        assert "gradient is not finite" in got[1] and "another rank" in got[0], got


@pytest.mark.parametrize("stop", ["checkpoint", "ctrl-c"])
def test_non_finite_step_between_log_steps_never_reaches_a_checkpoint(tmp_path, small_cache, monkeypatch, stop):
    """The device flag is read at a checkpoint step that is no log step, and on Ctrl-C: a state holding the
    NaN step is never saved, the step-4 checkpoint stays."""
    import vsae.trainer as tr
    from vsae.variants import TopKSAE

    real = TopKSAE.before_step
    calls = []

    def poisoned(self):
        calls.append(1)
        if len(calls) == 6:  # step 5
            self.W_dec.grad[0, 0] = float("inf")
        real(self)

    monkeypatch.setattr(TopKSAE, "before_step", poisoned)
    real_step = tr.update_step

    def ctrl_c_at_7(s, x, step, *a):
        if step == 7 and stop == "ctrl-c":
            raise KeyboardInterrupt
        real_step(s, x, step, *a)

    monkeypatch.setattr(tr, "update_step", ctrl_c_at_7)
    cfg = tcfg(small_cache, tmp_path / "r", checkpoint_every=4, log_every=100)
    with pytest.raises(KeyboardInterrupt if stop == "ctrl-c" else NonFiniteLoss,
                       **({} if stop == "ctrl-c" else {"match": "gradient is not finite .*at step 5.*step 4"})):
        train(cfg, [SAEConfig(d_sae=64, k=4)])
    assert json.loads((tmp_path / "r" / "train.json").read_text())["step"] == 4
    assert all(torch.isfinite(v.float()).all() for v in weights(tmp_path / "r").values())
