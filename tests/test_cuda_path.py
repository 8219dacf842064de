"""The CUDA path held without a GPU: its code path (dense, bf16) on the CPU, device consistency under fake CUDA
tensors, the per-rank noise and device choice; and `cuda`-marked tests that run only where CUDA exists."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.overrides import TorchFunctionMode

from tests.crash import crash_at, restore
from tests.synthetic import planted_features, synthetic_cache
from vsae.config import SAEConfig, TrainConfig
from vsae.trainer import NO_FAULT, fresh_state, noise_seed, train, train_device, update_step, window_means
from vsae.variants import build_sae

# Every variant with each of its own switch settings that changes what is trained.
VARIANT_SWITCHES = [dict(variant="topk"), dict(variant="vsae", sample=False),
                    dict(variant="vsae", sample=True, variance="fixed"),
                    dict(variant="vsae", sample=True, variance="learned")]
SHARED_SWITCHES = list(itertools.product(("unit", "free"), (True, False), (0.0, 1 / 32)))


def _label(own: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in own.items())


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("own", VARIANT_SWITCHES, ids=_label)
def test_bf16_steps_train_every_variant_and_switch(own, sparse):
    """The CUDA choice (dense + bf16) and `--sparse --bf16`, every variant x switch, a few steps on the CPU."""
    tcfg = TrainConfig(cache="unused", out="unused", steps=6, batch_size=64, lr=1e-3, lr_warmup_steps=1,
                       progress=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, 16, generator=g)
    for decoder, pre_bias, aux in SHARED_SWITCHES:
        # dead_after 1: every latent that did not fire in the last batch is dead, so AuxK runs from step 1
        cfg = SAEConfig(d_sae=64, k=4, decoder=decoder, pre_bias=pre_bias, aux_k_coef=aux, dead_after=1, **own)
        s = fresh_state(Path("unused"), cfg, tcfg, 16, 6, torch.device("cpu"), sparse=sparse)
        before = {n: p.detach().clone() for n, p in s.sae.named_parameters()}
        for step in range(6):
            update_step(s, x[step], step, 6, tcfg, True, 1)
        assert s.step == 6
        for n, p in s.sae.named_parameters():
            assert p.dtype == torch.float32 and torch.isfinite(p).all(), (cfg, n)
        assert not torch.equal(before["W_enc"], s.sae.W_enc), cfg
        means = window_means(s)
        assert s.window_steps == 6 and all(v == v for v in means.values()), (cfg, means)
        assert int(s.fault_step) == NO_FAULT, cfg
        if aux:
            assert "auxk" in means, cfg


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    rows, _ = planted_features(8_000, d_in=32, n_features=128, seed=1)
    return synthetic_cache(tmp_path_factory.mktemp("small") / "cache", rows * 3.0)


@pytest.mark.parametrize("own", VARIANT_SWITCHES, ids=_label)
def test_cuda_choice_trains_end_to_end_on_the_cpu_and_resumes_exactly(tmp_path, small_cache, monkeypatch, own):
    """`train` with what CUDA picks by default (dense, bf16), through the loop, a checkpoint and a resume."""
    import vsae.trainer as tr

    cfg = SAEConfig(d_sae=64, k=4, dead_after=256, **own)
    kw = dict(steps=10, batch_size=128, lr=1e-3, lr_warmup_steps=1, log_every=5, checkpoint_every=5,
              progress=False, device="cpu", sparse=False, bf16=True)
    [straight] = train(TrainConfig(cache=str(small_cache), out=str(tmp_path / "a"), **kw), [cfg])
    real = tr.update_step

    def crash_at_7(s, x, step, *a):
        if step == 7:
            raise RuntimeError("simulated kill")
        real(s, x, step, *a)

    resumed = TrainConfig(cache=str(small_cache), out=str(tmp_path / "b"), **kw)
    monkeypatch.setattr(tr, "update_step", crash_at_7)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(resumed, [cfg])
    restore(monkeypatch, real)
    train(resumed, [cfg], resume=True)
    a = load_file(str(straight / "trainer_state.safetensors"))
    b = load_file(str(tmp_path / "b" / "trainer_state.safetensors"))
    for key in a:  # noise included: it is reseeded from (seed, rank, step)
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert all(torch.isfinite(v.float()).all() for v in a.values())
    assert json.loads((straight / "train.json").read_text())["complete"]


def _fake_cuda(sae: nn.Module) -> None:
    for name, p in list(sae.named_parameters()):
        # no grad: autograd on fake CUDA tensors aborts a CPU-only build
        setattr(sae, name, nn.Parameter(torch.empty(p.shape, device="cuda"), requires_grad=False))


@pytest.mark.parametrize("own", VARIANT_SWITCHES, ids=_label)
def test_forward_stays_on_the_device_under_fake_cuda_tensors(own):
    """A CPU tensor made anywhere in the dense forward would meet the CUDA ones and raise here."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sae = build_sae(SAEConfig(d_sae=64, k=4, **own), 16)
    sae.sparse = False
    with FakeTensorMode(), torch.no_grad():
        _fake_cuda(sae)
        out = sae.loss_terms(torch.randn(8, 16, device="cuda"), 0.5, None, None)
        assert all(t.device.type == "cuda" for t in out.terms.values())
        assert out.vals.device.type == out.code.vals.device.type == out.code.idx.device.type == "cuda"


def test_noise_generator_must_live_on_the_latents_device():
    """PyTorch refuses a CPU generator for CUDA tensors; fake tensors do not, so vsae checks it itself."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sae = build_sae(SAEConfig(variant="vsae", d_sae=64, k=4, sample=True), 16)
    sae.sparse = False
    cpu_generator = torch.Generator(device="cpu").manual_seed(0)
    with FakeTensorMode(), torch.no_grad():
        _fake_cuda(sae)
        with pytest.raises(ValueError, match="generator is on cpu but the latents are on cuda"):
            sae.loss_terms(torch.randn(8, 16, device="cuda"), 0.5, None, cpu_generator)


def test_trainer_noise_generator_is_on_the_training_device():
    tcfg = TrainConfig(cache="unused", out="unused", steps=2, batch_size=8, progress=False)
    s = fresh_state(Path("unused"), SAEConfig(variant="vsae", d_sae=32, k=4, sample=True), tcfg, 8, 2,
                    torch.device("cpu"), sparse=False)
    assert s.generator.device == s.sae.W_enc.device == torch.device("cpu")


def test_ranks_draw_different_noise_and_steps_do_not_repeat():
    seeds = {noise_seed(0, rank, step) for rank in range(8) for step in range(2000)}
    assert len(seeds) == 8 * 2000 and all(0 <= s < 2**63 for s in seeds)
    assert noise_seed(0, 0, 5) == noise_seed(0, 0, 5) != noise_seed(1, 0, 5)
    tcfg = TrainConfig(cache="unused", out="unused", steps=2, batch_size=8, progress=False)
    cfg = SAEConfig(variant="vsae", d_sae=32, k=4, sample=True, b_dec_init="zero")
    x = torch.randn(8, 8)
    codes = []
    for rank in (0, 1):
        s = fresh_state(Path("unused"), cfg, tcfg, 8, 2, torch.device("cpu"), sparse=False, rank=rank)
        s.generator.manual_seed(noise_seed(s.seed, s.rank, 0))
        codes.append(s.sae.training_latents(s.sae.encoder_input(x), 0.0, s.generator).vals)
    assert not torch.equal(codes[0], codes[1])


def test_train_device_picks_this_ranks_gpu():
    assert train_device("cuda", 2, {"LOCAL_RANK": "3"}) == torch.device("cuda", 3)
    assert train_device("cuda", 1, {"LOCAL_RANK": "3"}) == torch.device("cuda")
    assert train_device("cuda:1", 2, {"LOCAL_RANK": "3"}) == torch.device("cuda", 1)  # an explicit index wins
    assert train_device("cpu", 2, {"LOCAL_RANK": "3"}) == torch.device("cpu")
    assert train_device("cuda", 2, {}) == torch.device("cuda", 0)


# --- on a GPU only ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_cache(tmp_path_factory):
    rows, _ = planted_features(16_000, d_in=32, n_features=128, seed=1)
    return synthetic_cache(tmp_path_factory.mktemp("gpu") / "cache", rows * 3.0)


def _tcfg(cache, out, **kw):
    return TrainConfig(**{**dict(cache=str(cache), out=str(out), steps=20, batch_size=256, lr=1e-3,
                                 lr_warmup_steps=2, log_every=5, checkpoint_every=10, progress=False,
                                 device="cuda"), **kw})


@pytest.mark.cuda
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("own", VARIANT_SWITCHES, ids=_label)
def test_cuda_every_variant_trains_and_resumes_like_a_straight_run(tmp_path, gpu_cache, monkeypatch, own, sparse):

    cfg = SAEConfig(d_sae=64, k=4, dead_after=512, **own)
    [straight] = train(_tcfg(gpu_cache, tmp_path / "straight", sparse=sparse), [cfg])
    real = crash_at(monkeypatch, 13)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(_tcfg(gpu_cache, tmp_path / "resumed", sparse=sparse), [cfg])
    restore(monkeypatch, real)
    train(_tcfg(gpu_cache, tmp_path / "resumed", sparse=sparse), [cfg], resume=True)
    info = json.loads((straight / "train.json").read_text())
    assert info["complete"] and info["train"]["device"].startswith("cuda")
    a = load_file(str(straight / "trainer_state.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "trainer_state.safetensors"))
    for key in a:
        if key.startswith("param."):
            assert torch.isfinite(a[key]).all(), key
            # GPU kernels (atomics in index_add / scatter backward) need not be bit-deterministic
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)


# --- no host syncs between log steps -------------------------------------------------------------------------

class SyncRecorder(TorchFunctionMode):
    """Records every call that reads a tensor back to the host (on CUDA each one waits for the GPU to drain)."""

    READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.cpu,
             torch.Tensor.numpy, torch.masked_select, torch.Tensor.masked_select, torch.unique,
             torch.Tensor.unique, torch.argwhere, torch.Tensor.argwhere}

    def __init__(self, host_tensors=()) -> None:
        super().__init__()
        self.host_tensors = list(host_tensors)  # host-side on CUDA too (Adam's step counters)
        self.calls: list[str] = []
        self.phase = "setup"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        first = args[0] if args else None
        masked = func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _has_bool_tensor(args[1])
        if (func in self.READS or masked) and not any(first is t for t in self.host_tensors):
            self.calls.append(f"{self.phase}: {getattr(func, '__name__', func)}")
        return func(*args, **(kwargs or {}))


def _has_bool_tensor(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def test_sync_recorder_sees_each_kind_of_host_read():
    t = torch.randn(4)
    for read in (lambda: t.sum().item(), lambda: bool(t.any()), lambda: float(t[0]), lambda: int(t.argmax()),
                 lambda: t.tolist(), lambda: t.nonzero(), lambda: t[t > 0], lambda: t.__setitem__(t > 0, 0.0)):
        with SyncRecorder() as rec:
            read()
        assert len(rec.calls) == 1, rec.calls


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_steps_between_log_steps_read_nothing_back_from_the_device(bf16):
    """Every variant x switch of the CUDA path (dense), four SAEs in one pass: after the first step of each log
    window (AuxK's candidate refresh) a step makes no host read at all."""
    tcfg = TrainConfig(cache="unused", out="unused", steps=12, batch_size=64, lr=1e-3, lr_warmup_steps=1,
                       log_every=4, progress=False)
    x = torch.randn(12, 64, 16, generator=torch.Generator().manual_seed(0))
    states = [fresh_state(Path("unused"), SAEConfig(d_sae=64, k=4, dead_after=64, **own), tcfg, 16, 12,
                          torch.device("cpu"), sparse=False) for own in VARIANT_SWITCHES]
    for step in range(2):  # Adam creates its state at the first step
        for s in states:
            update_step(s, x[step], step, 12, tcfg, bf16, 1)
    adam_steps = [st["step"] for s in states for st in s.opt.state.values()]
    with SyncRecorder(adam_steps) as rec:
        for step in range(2, 12):
            rec.phase = f"step {step}"
            for s in states:
                update_step(s, x[step], step, 12, tcfg, bf16, 1)
    assert rec.calls and all(c in ("step 4: nonzero", "step 8: nonzero") for c in rec.calls), rec.calls
    assert all(int(s.fault_step) == NO_FAULT and s.step == 12 for s in states)


def test_training_loop_reads_the_device_only_at_log_and_checkpoint_steps(tmp_path, small_cache, monkeypatch):
    import vsae.trainer as tr

    real_step = tr.update_step
    recorder: list[SyncRecorder] = []

    def step_and_mark(s, x, step, *a):
        rec = recorder[0]
        rec.phase = f"in step {step}"
        if step == 1:
            rec.host_tensors += [st["step"] for st in s.opt.state.values()]
        real_step(s, x, step, *a)
        rec.phase = f"after step {step}"

    monkeypatch.setattr(tr, "update_step", step_and_mark)
    cfg = SAEConfig(d_sae=64, k=4, dead_after=256)
    with SyncRecorder() as rec:
        recorder.append(rec)
        train(TrainConfig(cache=str(small_cache), out=str(tmp_path / "r"), steps=20, batch_size=64, lr=1e-3,
                          lr_warmup_steps=1, log_every=5, checkpoint_every=10, progress=False, device="cpu",
                          sparse=False), [cfg])
    steps = [c.split(":")[0] for c in rec.calls if not c.startswith("setup")]
    allowed = {f"in step {k}" for k in (0, 5, 10, 15)} | {f"after step {k}" for k in (4, 9, 14, 19)}
    assert set(steps) <= allowed, sorted(set(steps) - allowed)
    assert "in step 1" not in steps  # Adam's first step, recorded before its counters were exempted, is clean


@pytest.mark.parametrize("budget", [0.0, 1.0], ids=["streamed", "resident"])
def test_multi_sae_pass_from_either_loader_equals_single_runs(tmp_path, budget):
    """Four SAEs on one pass of a float16 cache, from device memory or streamed: each equals its own run."""
    rows, _ = planted_features(4_000, d_in=32, n_features=128, seed=2)
    cache = synthetic_cache(tmp_path / "cache", (rows * 3.0).astype(np.float16))
    cfgs = [SAEConfig(d_sae=64, k=4, dead_after=256, **own) for own in VARIANT_SWITCHES]
    kw = dict(cache=str(cache), steps=12, batch_size=128, lr=1e-3, lr_warmup_steps=1, log_every=4,
              checkpoint_every=6, progress=False, device="cpu", sparse=False, device_data_budget=budget)
    runs = train(TrainConfig(out=str(tmp_path / "group"), **kw), cfgs)
    other = 1.0 - budget  # the single run reads through the other loader: the batches must be the same
    [alone] = train(TrainConfig(out=str(tmp_path / "alone"), **{**kw, "device_data_budget": other}), [cfgs[2]])
    a = load_file(str(runs[2] / "trainer_state.safetensors"))
    b = load_file(str(alone / "trainer_state.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.cuda
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("own", VARIANT_SWITCHES, ids=_label)
def test_cuda_steps_between_log_steps_never_synchronize(own, sparse):
    """CUDA's own detector: any synchronizing call inside these steps raises (the dense default and --sparse)."""
    tcfg = TrainConfig(cache="unused", out="unused", steps=8, batch_size=256, lr=1e-3, lr_warmup_steps=1,
                       log_every=8, progress=False, device="cuda")
    x = torch.randn(8, 256, 32, device="cuda")
    s = fresh_state(Path("unused"), SAEConfig(d_sae=128, k=8, dead_after=256, **own), tcfg, 32, 8,
                    torch.device("cuda"), sparse=sparse)
    update_step(s, x[0], 0, 8, tcfg, True, 1)  # the window's first step reads AuxK's candidates
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 8):
            update_step(s, x[step], step, 8, tcfg, True, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(s.fault_step) == NO_FAULT and window_means(s)["l0"] <= 8
