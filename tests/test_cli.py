import pytest

from cli import build_parser, main
from tests.test_harvest import HOOK


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("build-tiny-model", "harvest", "cache-info", "demo"):
        assert command in out


@pytest.mark.parametrize("command", ["build-tiny-model", "harvest", "cache-info", "demo"])
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
