import json

import pytest

from cli import build_parser, main
from tests.test_harvest import HOOK


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("build-tiny-model", "harvest", "train", "eval", "cache-info", "study", "demo"):
        assert command in out


@pytest.mark.parametrize("command", ["build-tiny-model", "harvest", "train", "eval", "cache-info", "study", "demo"])
def test_every_command_has_help_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: vsae " + command in out
    if command != "cache-info":
        assert "(default:" in out


def test_harvest_flags_map_to_config_fields():
    args = build_parser().parse_args(["harvest", "--out", "x", "--corpus", "a", "b", "--keep-bos", "--tokens", "5"])
    assert args.corpus == ["a", "b"] and args.keep_bos and args.tokens == 5 and args.progress


def test_harvest_then_cache_info(tmp_path, tiny_checkpoint, text_corpus, capsys):
    out = tmp_path / "c"
    argv = ["harvest", "--out", str(out), "--model-path", str(tiny_checkpoint), "--hook", HOOK,
            "--corpus", str(text_corpus), "--tokens", "300", "--context", "32", "--no-progress"]
    assert main(argv) == 0
    assert "310 tokens in 1 shards" in capsys.readouterr().out  # 10 contexts of 31 rows
    assert main(["cache-info", str(out)]) == 0
    text = capsys.readouterr().out
    assert HOOK in text and "checksums  1 ok, 0 bad" in text
    shard = out / "tokens-00000.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # flip one bit of the last token row
    shard.write_bytes(bytes(data))
    assert main(["cache-info", str(out)]) == 1
    assert "tokens-00000.npy fails its sha256 check" in capsys.readouterr().err


def test_errors_are_one_line_with_exit_code_2(tmp_path, tiny_checkpoint, text_corpus, capsys):
    code = main(["harvest", "--out", str(tmp_path / "c"), "--model-path", str(tiny_checkpoint),
                 "--corpus", str(text_corpus), "--tokens", "-3"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vsae harvest: error: --tokens must be a positive")
    assert main(["cache-info", str(tmp_path)]) == 2
    assert "not an activation cache" in capsys.readouterr().err


def test_train_cli_k_list_preset_and_sweep(tmp_path, capsys):
    import json

    from tests.synthetic import planted_features, synthetic_cache

    rows, _ = planted_features(4000, d_in=16, n_features=64)
    cache = synthetic_cache(tmp_path / "cache", rows)
    common = ["--cache", str(cache), "--steps", "4", "--batch-size", "128", "--d-sae", "32", "--no-progress"]
    assert main(["train", *common, "--out", str(tmp_path / "ks"), "--k", "2,4"]) == 0
    assert sorted(p.name for p in (tmp_path / "ks").iterdir()) == ["k2", "k4"]
    # a preset fills the paper's settings; explicit flags win over it
    assert main(["train", *common, "--out", str(tmp_path / "p"), "--preset", "paper-vsae", "--k", "4"]) == 0
    info = json.loads((tmp_path / "p" / "train.json").read_text())
    assert info["sae"]["decoder"] == "free" and not info["sae"]["pre_bias"] and info["sae"]["aux_k_coef"] == 0
    assert info["train"]["lr"] == 8e-4 and info["train"]["steps"] == 4 and info["sae"]["d_sae"] == 32
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[[sae]]\nvariant = "topk"\n\n[[sae]]\nvariant = "vsae"\nsample = true\n')
    assert main(["train", *common, "--out", str(tmp_path / "s"), "--k", "4", "--sweep", str(sweep)]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["topk-nosample", "vsae-sample"]
    sweep.write_text('[[sae]]\nname = "a"\n\n[[sae]]\nname = "b"\nvariant = "vsae"\n')
    assert main(["train", *common, "--out", str(tmp_path / "n"), "--k", "4", "--sweep", str(sweep)]) == 0
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["a", "b"]
    capsys.readouterr()
    assert main(["train", *common, "--out", str(tmp_path / "p"), "--k", "4"]) == 2
    assert "holds a run already" in capsys.readouterr().err
    sweep.write_text('[[sae]]\nvarient = "topk"\n')
    assert main(["train", *common, "--out", str(tmp_path / "t"), "--sweep", str(sweep)]) == 2
    assert "unknown SAE field(s) varient" in capsys.readouterr().err
    assert main(["train", *common, "--out", str(tmp_path / "bad"), "--k", "40"]) == 2
    assert "k must be in 1..d_sae (32), got 40" in capsys.readouterr().err
    assert main(["train", *common, "--out", str(tmp_path / "bad")]) == 2  # without --k: SAEConfig's k
    assert "k must be in 1..d_sae (32), got 64" in capsys.readouterr().err


def test_eval_metrics_list_and_independence_sample(tmp_path, capsys):
    import json

    from tests.synthetic import planted_features, synthetic_cache

    rows, _ = planted_features(4000, d_in=16, n_features=64)
    cache = synthetic_cache(tmp_path / "cache", rows)
    run = tmp_path / "run"
    assert main(["train", "--cache", str(cache), "--out", str(run), "--steps", "4", "--batch-size", "128",
                 "--d-sae", "32", "--k", "4", "--no-progress"]) == 0
    base = ["eval", str(run), "--cache", str(cache), "--no-progress"]
    for n in (50, 80):
        assert main([*base, "--metrics", "core,independence", "--independence-tokens", str(n)]) == 0
        doc = json.loads((run / "eval.json").read_text())
        assert doc["metrics"]["independence"]["n_tokens"] == n
        assert doc["settings"]["metrics"] == ["core", "independence"] and doc["settings"]["independence_tokens"] == n
    capsys.readouterr()
    assert main([*base, "--metrics", "core,bogus"]) == 2
    assert "vsae eval: error: unknown metric(s) bogus" in capsys.readouterr().err


def test_study_builds_its_config_from_the_flags(tmp_path, monkeypatch, capsys):
    import pipeline.study
    from pipeline.study import StudyConfig

    seen = []

    def fake_run_study(cfg):
        seen.append(cfg)
        return {"runs": [{}, {}], "size_matched": [{}], "skipped": []}

    monkeypatch.setattr(pipeline.study, "run_study", fake_run_study)
    out = str(tmp_path / "s")
    assert main(["study", "--cache", "c", "--plan", "paper", "--out", out, "--steps", "3", "--metrics", "all",
                 "--no-progress"]) == 0
    from evals.registry import METRICS

    assert seen == [StudyConfig(cache="c", plan="paper", out=out, steps=3, metrics=list(METRICS), progress=False)]
    assert f"study of 3 runs (0 combinations skipped) written to {out}" in capsys.readouterr().out
    assert main(["study", "--cache", "c", "--plan", "paper", "--out", out]) == 0
    assert seen[-1].metrics is None and seen[-1].steps is None and seen[-1].device == "cpu"


def test_demo_runs_the_pipeline_with_its_config(monkeypatch):
    import pipeline.demo
    from pipeline.demo import DemoConfig

    seen = []
    monkeypatch.setattr(pipeline.demo, "run_demo", seen.append)
    assert main(["demo", "--out", "d", "--d-sae", "64", "--k", "4", "--train-steps", "7"]) == 0
    assert seen == [DemoConfig(out="d", d_sae=64, k=4, train_steps=7)]


@pytest.fixture()
def small_cache(tmp_path):
    from tests.synthetic import planted_features, synthetic_cache

    rows, _ = planted_features(1000, d_in=16, n_features=64)
    return synthetic_cache(tmp_path / "cache", rows)


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vsae ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(("flags", "needles"), [
    (["--k", "abc"], ["--k 'abc'", "comma list of integers"]),
    (["--device", "bogus"], ["--device 'bogus'", "cpu, cuda"]),
    (["--k", "4", "--sweep", "missing.toml"], ["--sweep missing.toml", "cannot read"]),
])
def test_bad_train_flags_are_one_line_errors(flags, needles, small_cache, tmp_path, capsys):
    argv = ["train", "--cache", str(small_cache), "--out", str(tmp_path / "r"), "--d-sae", "32", "--steps", "2",
            "--no-progress", *flags]
    assert main(argv) == 2
    _one_line_error(capsys, *needles)
    assert not (tmp_path / "r").exists()


def test_cuda_without_cuda_is_a_one_line_error(small_cache, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--cache", str(small_cache), "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
    _one_line_error(capsys, "no CUDA device", "--device cpu")


@pytest.mark.parametrize("text", ['[[sae]]\nk = "abc"\n', 'sae = 3\n', '[[sae]\n'])
def test_bad_sweep_files_are_one_line_errors(text, small_cache, tmp_path, capsys):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(text)
    argv = ["train", "--cache", str(small_cache), "--out", str(tmp_path / "r"), "--d-sae", "32", "--steps", "2",
            "--no-progress", "--sweep", str(sweep)]
    assert main(argv) == 2
    _one_line_error(capsys, "")
    assert not (tmp_path / "r").exists()


def test_output_under_a_file_is_refused_before_any_work(small_cache, tmp_path, capsys, monkeypatch):
    import vsae.trainer

    monkeypatch.setattr(vsae.trainer, "train", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "file").write_text("mine")
    argv = ["train", "--cache", str(small_cache), "--out", str(tmp_path / "file" / "run"), "--d-sae", "32"]
    assert main(argv) == 2
    _one_line_error(capsys, "is a file, not a directory")
    assert (tmp_path / "file").read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path):
    from activations.cache import CacheError

    with pytest.raises(CacheError):
        main(["--debug", "cache-info", str(tmp_path / "nothing")])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("vsae ")


def test_runs_lists_runs_with_settings_and_metrics(small_cache, tmp_path, capsys):
    common = ["--cache", str(small_cache), "--steps", "2", "--batch-size", "64", "--d-sae", "32", "--no-progress"]
    assert main(["train", *common, "--out", str(tmp_path / "runs"), "--k", "2,4"]) == 0
    assert main(["eval", str(tmp_path / "runs" / "k4"), "--cache", str(small_cache), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["runs", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "variant", "d_sae", "k"] and "explained_variance" in lines[0]
    k2, k4 = (line.split() for line in lines[1:])
    assert k2[:4] == ["k2", "topk", "32", "2"] and k4[:4] == ["k4", "topk", "32", "4"]
    ev = lines[0].split().index("explained_variance")
    assert k2[ev] == "-" and k4[ev] != "-"  # only k4 was evaluated
    assert main(["runs", str(tmp_path / "nothing")]) == 2


def test_runs_counts_snapshots_and_lists_them_when_asked(small_cache, tmp_path, capsys):
    assert main(["train", "--cache", str(small_cache), "--steps", "4", "--batch-size", "64", "--d-sae", "32",
                 "--k", "2", "--snapshot-every", "2", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["run"]
    assert lines[-1] == "(2 snapshots of these runs not listed: --snapshots lists them)"
    assert main(["runs", str(tmp_path), "--snapshots"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names == ["run", "run/snapshots/step-000002", "run/snapshots/step-000004"]


def test_device_auto_is_the_default_and_is_printed(small_cache, tmp_path, capsys):
    import torch

    from evals.driver import EvalConfig
    from vsae.config import TrainConfig

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert TrainConfig().device == expected and EvalConfig(cache="c").device == expected
    assert TrainConfig(device="cpu").device == "cpu"
    with pytest.raises(ValueError, match="not a torch device"):
        TrainConfig(device="bogus")
    argv = ["train", "--cache", str(small_cache), "--out", str(tmp_path / "r"), "--d-sae", "32", "--k", "2",
            "--steps", "2", "--batch-size", "64", "--no-progress"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"device: {expected} (auto)"
    assert json.loads((tmp_path / "r" / "train.json").read_text())["train"]["device"] == expected
