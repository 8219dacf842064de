import pytest

from cli import build_parser, main
from tests.test_harvest import HOOK


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("build-tiny-model", "harvest", "train", "eval", "cache-info", "demo"):
        assert command in out


@pytest.mark.parametrize("command", ["build-tiny-model", "harvest", "train", "eval", "cache-info", "demo"])
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
