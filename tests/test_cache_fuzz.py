"""Fuzz a cache's manifest and shard files one change at a time.

For each change, `vsae cache-info`, `vsae train` and `vsae eval` (of a run trained once on the intact cache) must
succeed or fail with exactly one `vsae ...` line on stderr: never a traceback, never a hang, and never a change
to any file outside the directories they were given (a sibling victim directory and file are watched; the victim
holds the very bytes of a shard, so only confinement keeps a reader from using it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from activations.cache import MANIFEST, write_array_cache
from cli import main
from tests.synthetic import planted_features

CONTEXT, SHARD_ROWS = 17, 16 * 20  # two shards of 20 sequences
TRAIN = ["--steps", "2", "--batch-size", "64", "--d-sae", "16", "--k", "2", "--no-progress"]
TIMEOUT_S = 30


class Hung(BaseException):
    """Raised by the alarm: a BaseException, so no `except OSError` or `except Exception` on the way swallows it."""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    """(a valid two-shard cache, a run trained on it); neither is changed by the cases, which work on copies."""
    root = tmp_path_factory.mktemp("fuzz")
    rows, _ = planted_features(2 * SHARD_ROWS, d_in=8, n_features=32)
    write_array_cache(root / "cache", rows, CONTEXT, {"kind": "synthetic", "name": "planted"},
                      shard_tokens=SHARD_ROWS)
    assert main(["train", "--cache", str(root / "cache"), "--out", str(root / "run"), *TRAIN]) == 0
    return root / "cache", root / "run"


# --- the changes -----------------------------------------------------------------------------------------------------

Change = Callable[[Path, Path], None]  # (cache, victim directory)


def manifest(edit: Callable[[dict, Path], object]) -> Change:
    def change(cache: Path, victim: Path) -> None:
        m = json.loads((cache / MANIFEST).read_text())
        edit(m, victim)
        (cache / MANIFEST).write_text(json.dumps(m))
    return change


def text(content: str) -> Change:
    return lambda cache, victim: (cache / MANIFEST).write_text(content)


def pop(*keys: str | int) -> Change:
    def edit(m: dict, victim: Path) -> None:
        for key in keys[:-1]:
            m = m[key]
        m.pop(keys[-1])
    return manifest(edit)


def put(*keys: str | int, value: object) -> Change:
    def edit(m: dict, victim: Path) -> None:
        for key in keys[:-1]:
            m = m[key]
        m[keys[-1]] = value(victim) if callable(value) else value
    return manifest(edit)


def truncate(name: str, keep: int | None) -> Change:
    def change(cache: Path, victim: Path) -> None:
        data = (cache / name).read_bytes()
        (cache / name).write_bytes(data[:keep] if keep is not None else data[:-100])
    return change


def flip(name: str, offset: int) -> Change:
    def change(cache: Path, victim: Path) -> None:
        data = bytearray((cache / name).read_bytes())
        data[offset] ^= 0x10
        (cache / name).write_bytes(bytes(data))
    return change


def replace_with(name: str, make: Callable[[Path, Path], None]) -> Change:
    def change(cache: Path, victim: Path) -> None:
        path = cache / name
        path.unlink()
        make(path, victim)
    return change


def append(name: str) -> Change:
    def change(cache: Path, victim: Path) -> None:
        with open(cache / name, "ab") as f:
            f.write(b"\0" * 64)
    return change


HUGE = 10**15
CHANGES: dict[str, Change] = {
    "a JSON list": text("[1, 2, 3]"),
    "null": text("null"),
    "empty": text(""),
    "cut JSON": lambda cache, victim: (cache / MANIFEST).write_text((cache / MANIFEST).read_text()[:200]),
    "nested JSON": text("[" * 100_000),
    "int with 5000 digits": put("d_in", value=10**4000),
    "NaN norm": put("mean_squared_norm", value=float("nan")),
    **{f"no {key}": pop(key) for key in ("format", "format_version", "settings", "d_in", "shards", "n_sequences",
                                         "rows_per_sequence", "n_shards", "total_tokens", "mean_squared_norm",
                                         "complete", "special_token_ids", "bos_token_id", "tokenizer")},
    **{f"no settings.{key}": pop("settings", key) for key in ("model", "hook_name", "corpus", "tokens", "context",
                                                              "dtype", "bos_dropped", "shard_sequences")},
    **{f"no shards[1].{key}": pop("shards", 1, key) for key in ("index", "n_tokens", "sum_sq_norm", "sha256",
                                                                "tokens_sha256", "file", "tokens_file")},
    "settings a list": put("settings", value=[]),
    "settings.model a string": put("settings", "model", value="synthetic"),
    "local model without a path": put("settings", "model", value={"kind": "local", "name": "x"}),
    "shards an object": put("shards", value={}),
    "shards[0] a string": put("shards", 0, value="acts-00000.npy"),
    "shards []": put("shards", value=[]),
    "one shard dropped": manifest(lambda m, v: m["shards"].pop()),
    "shards swapped": manifest(lambda m, v: m["shards"].reverse()),
    "complete false": put("complete", value=False),
    "complete 'yes'": put("complete", value="yes"),
    "d_in '8'": put("d_in", value="8"),
    "d_in 8.0": put("d_in", value=8.0),
    "d_in true": put("d_in", value=True),
    "d_in -8": put("d_in", value=-8),
    "d_in 0": put("d_in", value=0),
    "d_in 9": put("d_in", value=9),
    "d_in huge": put("d_in", value=HUGE),
    "context -17": put("settings", "context", value=-17),
    "context huge": put("settings", "context", value=HUGE),
    "context 1": put("settings", "context", value=1),
    "tokens huge": put("settings", "tokens", value=HUGE),
    "tokens 0": put("settings", "tokens", value=0),
    "dtype object": put("settings", "dtype", value="object"),
    "dtype int8": put("settings", "dtype", value="int8"),
    "dtype float64": put("settings", "dtype", value="float64"),
    "dtype nonsense": put("settings", "dtype", value="<f2'; import os"),
    "dtype 5": put("settings", "dtype", value=5),
    "bos_dropped false": put("settings", "bos_dropped", value=False),
    "n_sequences -1": put("n_sequences", value=-1),
    "n_sequences huge": put("n_sequences", value=HUGE),
    "n_sequences 41": put("n_sequences", value=41),
    "rows_per_sequence 0": put("rows_per_sequence", value=0),
    "n_shards 3": put("n_shards", value=3),
    "n_shards huge": put("n_shards", value=HUGE),
    "total_tokens -640": put("total_tokens", value=-640),
    "total_tokens huge": put("total_tokens", value=HUGE),
    "mean_squared_norm null": put("mean_squared_norm", value=None),
    "mean_squared_norm 0": put("mean_squared_norm", value=0),
    "mean_squared_norm -1": put("mean_squared_norm", value=-1.0),
    "mean_squared_norm 'x'": put("mean_squared_norm", value="x"),
    "mean_squared_norm huge": put("mean_squared_norm", value=1e308),
    "special_token_ids '7'": put("special_token_ids", value="7"),
    "special_token_ids [-1]": put("special_token_ids", value=[-1]),
    "special_token_ids huge": put("special_token_ids", value=[HUGE]),
    "bos_token_id 'x'": put("bos_token_id", value="x"),
    "shards[0].index -1": put("shards", 0, "index", value=-1),
    "shards[0].index 1": put("shards", 0, "index", value=1),
    "shards[1].index huge": put("shards", 1, "index", value=HUGE),
    "shards[0].n_tokens -320": put("shards", 0, "n_tokens", value=-SHARD_ROWS),
    "shards[0].n_tokens 336": put("shards", 0, "n_tokens", value=SHARD_ROWS + 16),
    "shards[0].n_tokens huge": put("shards", 0, "n_tokens", value=HUGE),
    "shards[0].n_tokens '320'": put("shards", 0, "n_tokens", value=str(SHARD_ROWS)),
    "shards[0].sum_sq_norm -1": put("shards", 0, "sum_sq_norm", value=-1.0),
    "shards[0].sha256 wrong": put("shards", 0, "sha256", value="0" * 64),
    "shards[0].sha256 short": put("shards", 0, "sha256", value="abc"),
    "shards[1].tokens_sha256 5": put("shards", 1, "tokens_sha256", value=5),
    "file ../victim": put("shards", 0, "file", value="../victim/acts-00000.npy"),
    "file absolute": put("shards", 0, "file", value=lambda victim: str(victim / "acts-00000.npy")),
    "tokens_file ../victim": put("shards", 0, "tokens_file", value="../victim/tokens-00000.npy"),
    "tokens_file absolute": put("shards", 0, "tokens_file", value=lambda victim: str(victim / "tokens-00000.npy")),
    "file in a subfolder": put("shards", 0, "file", value="sub/acts-00000.npy"),
    "file ..": put("shards", 0, "file", value=".."),
    "file empty": put("shards", 0, "file", value=""),
    "file 5": put("shards", 0, "file", value=5),
    "file manifest.json": put("shards", 0, "file", value=MANIFEST),
    "file of the other shard": put("shards", 0, "file", value="acts-00001.npy"),
    "acts truncated": truncate("acts-00000.npy", None),
    "acts cut in its header": truncate("acts-00001.npy", 40),
    "tokens emptied": truncate("tokens-00001.npy", 0),
    "acts byte flipped": flip("acts-00001.npy", -3),
    "acts header flipped": flip("acts-00000.npy", 60),
    "tokens byte flipped": flip("tokens-00000.npy", -1),
    "acts grown": append("acts-00000.npy"),
    "acts missing": lambda cache, victim: (cache / "acts-00000.npy").unlink(),
    "acts a symlink out": replace_with("acts-00000.npy", lambda p, v: p.symlink_to(v / "acts-00000.npy")),
    "tokens a symlink out": replace_with("tokens-00001.npy", lambda p, v: p.symlink_to(v / "tokens-00001.npy")),
    "acts a FIFO": replace_with("acts-00000.npy", lambda p, v: os.mkfifo(p)),
    "acts /dev/zero": replace_with("acts-00000.npy", lambda p, v: p.symlink_to("/dev/zero")),
    "acts a directory": replace_with("acts-00000.npy", lambda p, v: p.mkdir()),
    "manifest a directory": replace_with(MANIFEST, lambda p, v: p.mkdir()),
    "manifest /dev/zero": replace_with(MANIFEST, lambda p, v: p.symlink_to("/dev/zero")),
    "manifest a FIFO": replace_with(MANIFEST, lambda p, v: os.mkfifo(p)),
    "record garbage": lambda cache, victim: (cache / ".verified.json").write_text("[{"),
    "record claims a flipped shard": lambda cache, victim: (
        flip("acts-00000.npy", -7)(cache, victim),
        (cache / ".verified.json").write_text(json.dumps({"format": "vsae-verified", "files": {
            "acts-00000.npy": {"size": (cache / "acts-00000.npy").stat().st_size, "sha256": "forged"}}}))),
    "lock file a symlink to the victim": lambda cache, victim: (cache.parent / ".cache.lock").symlink_to(
        victim / "notes.txt"),
}

# (train, eval) exit codes where not (2, 2), the refusal every other change must get.
HARMLESS = {"no special_token_ids", "no bos_token_id", "no tokenizer", "record garbage"}
EXPECTED = {**{name: (0, 0) for name in HARMLESS},
            "mean_squared_norm 0": (2, 0),  # all-zero activations: nothing to normalise by, still evaluable
            "mean_squared_norm huge": (2, 0)}  # a scale beyond float32: training refuses, evaluation is unscaled


# --- running the commands ----------------------------------------------------------------------------------------


def snapshot(*roots: Path, skip: set[Path]) -> dict[str, tuple]:
    """Every entry under `roots` but those in `skip`: (kind, size, mtime, content hash)."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
            for name in filenames + dirnames:
                path = Path(dirpath, name)
                if path in skip:
                    continue
                st = path.lstat()
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not \
                    path.is_symlink() else os.readlink(path) if path.is_symlink() else None
                seen[str(path)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return seen


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of `vsae ARGV`, failing the test on a traceback or after TIMEOUT_S seconds."""
    def alarm(*_):
        raise Hung()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT_S)
    try:
        code = main(argv)
    except Hung:
        pytest.fail(f"vsae {' '.join(argv)} hung for {TIMEOUT_S} s")
    except SystemExit as e:  # argparse
        code = e.code
    except BaseException as e:  # a traceback the user would see
        pytest.fail(f"vsae {' '.join(argv)} raised {type(e).__name__}: {e}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return code, capsys.readouterr().err.splitlines()


def check_outcome(command: str, code: int, err: list[str]) -> None:
    """Success with a quiet stderr, or exit 2 with exactly one `vsae COMMAND: error:` line."""
    if code == 0:
        assert err == [], f"{command} succeeded but wrote to stderr: {err}"
    elif code == 1 and command == "cache-info":  # its verdict on shard checksums, one line per bad shard
        assert err and all(line.startswith("BAD shard ") for line in err[:-1]), err
    else:
        assert code == 2, f"{command} exited {code}: {err}"
        assert len(err) == 1 and err[0].startswith(f"vsae {command}: error: "), err


@pytest.mark.parametrize("name", list(CHANGES))
def test_changed_cache_gives_success_or_one_line(name, pristine, tmp_path, capsys, monkeypatch):
    cache_src, run = pristine
    monkeypatch.setenv("VSAE_CACHE_DIR", str(tmp_path / "vsae-home"))  # nothing may land in the user's cache dir
    cache, victim, out = tmp_path / "cache", tmp_path / "victim", tmp_path / "train-out"
    shutil.copytree(cache_src, cache, symlinks=True)
    shutil.copytree(cache_src, victim)  # a shard's very bytes, outside the cache
    (victim / "notes.txt").write_text("precious")
    (tmp_path / "victim.npy").write_bytes((cache_src / "acts-00000.npy").read_bytes())
    CHANGES[name](cache, victim)
    skip = {cache, out, tmp_path / ".cache.lock", tmp_path / ".train-out.lock", run}
    before = snapshot(tmp_path, cache_src, skip=skip)
    capsys.readouterr()

    outcomes = {}
    for command, argv in (("cache-info", ["cache-info", str(cache)]),
                          ("train", ["train", "--cache", str(cache), "--out", str(out), *TRAIN]),
                          ("eval", ["eval", str(run), "--cache", str(cache), "--no-progress"])):
        outcomes[command] = code, err = run_cli(argv, capsys)
        check_outcome(command, code, err)

    assert snapshot(tmp_path, cache_src, skip=skip) == before, "a file outside the cache and run changed"
    assert (outcomes["train"][0], outcomes["eval"][0]) == EXPECTED.get(name, (2, 2)), outcomes
