"""Labelled sets for SCR / TPP: the generated offline sets and the hub loaders (faked here, never downloaded)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evals import labelled
from evals.labelled import LabelledSet, LabelledSetError, offline_scr_set, offline_tpp_set


def _same(a: LabelledSet, b: LabelledSet) -> bool:
    return (
        a.texts == b.texts
        and all(np.array_equal(a.labels[k], b.labels[k]) for k in a.labels)
        and all(np.array_equal(a.splits[k], b.splits[k]) for k in a.splits)
    )


def test_offline_sets_are_deterministic_per_seed():
    def scr(seed):
        return offline_scr_set(seed=seed, train_size=40, test_size=20)

    assert _same(scr(3), scr(3))
    assert not _same(scr(3), scr(4))
    assert _same(offline_tpp_set(seed=1, train_size=20), offline_tpp_set(seed=1, train_size=20))


def test_scr_train_split_is_fully_correlated_and_the_others_balanced():
    data = offline_scr_set(train_size=80, test_size=40, validation_size=20)
    target, spurious = data.roles["target"], data.roles["spurious"]
    assert (target, spurious) == ("gender", "topic")
    t, s = data.labels[target], data.labels[spurious]
    train = data.splits["train"]
    assert len(train) == 80 and np.array_equal(t[train], s[train])  # rho = 1
    assert np.bincount(t[train]).tolist() == [40, 40]
    for split, per_quadrant in (("train_balanced", 20), ("validation", 5), ("test", 10)):
        rows = data.splits[split]
        quadrants = np.bincount(2 * t[rows] + s[rows], minlength=4)
        assert quadrants.tolist() == [per_quadrant] * 4, split
    # Probes never see test or validation texts in training.
    held_out = set(data.splits["test"]) | set(data.splits["validation"])
    assert not held_out & (set(train) | set(data.splits["train_balanced"]))
    assert not set(data.splits["test"]) & set(data.splits["validation"])
    # Each text carries its own gender's words and topic's keywords, and none of the other's.
    words = {
        ("gender", 1): {"he", "his", "him", *labelled.GENDER_NOUNS["male"]},
        ("gender", 0): {"she", "her", *labelled.GENDER_NOUNS["female"]},
        ("topic", 1): set(labelled.SCR_KEYWORDS["war"]),
        ("topic", 0): set(labelled.SCR_KEYWORDS["love"]),
    }
    for i in range(len(data.texts)):
        tokens = set(data.texts[i].lower().replace(".", " ").replace(",", " ").split())
        for attr, value in (("gender", t[i]), ("topic", s[i])):
            assert tokens & words[attr, value] and not tokens & words[attr, 1 - value], data.texts[i]


def test_tpp_set_has_five_balanced_classes_balanced_by_gender():
    data = offline_tpp_set(train_size=40, test_size=20)
    classes = data.roles["classes"]
    assert len(data.class_names[classes]) >= 5
    for split, per_class in (("train", 20), ("validation", 10), ("test", 10)):
        rows = data.splits[split]
        y, g = data.labels[classes][rows], data.labels["gender"][rows]
        assert np.bincount(y).tolist() == [per_class] * 5
        assert np.bincount(2 * y + g).tolist() == [per_class // 2] * 10
    assert len(set(data.texts)) > 0.9 * len(data.texts)  # texts vary


def test_labelled_set_checks_its_arrays():
    with pytest.raises(ValueError, match="shape"):
        LabelledSet(["a", "b"], {"x": [0]}, {"test": [0]}, {"x": ("n", "y")}, {"target": "x"})
    with pytest.raises(ValueError, match="split"):
        LabelledSet(["a"], {"x": [0]}, {"test": [3]}, {"x": ("n", "y")}, {"target": "x"})
    with pytest.raises(ValueError, match="class_names"):
        LabelledSet(["a"], {"x": [2]}, {"test": [0]}, {"x": ("n", "y")}, {"target": "x"})


@pytest.mark.parametrize("loader, name", [
    (labelled.load_bias_in_bios, "LabHC/bias_in_bios"),
    (labelled.load_amazon_reviews, "canrager/amazon_reviews_mcauley_1and5"),
])
def test_real_sets_offline_raise_one_clear_error(monkeypatch, loader, name):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'huggingface.co' (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(LabelledSetError, match="unreachable") as info:
        loader()
    assert name in str(info.value)


class _FakeSplit:
    def __init__(self, columns: dict):
        self.columns = columns

    def to_dict(self) -> dict:
        return self.columns


def _fake_bios(n: int, seed: int) -> _FakeSplit:
    rng = np.random.default_rng(seed)
    profession = rng.choice([labelled.PROFESSIONS.index(p) for p in ("professor", "nurse", "dentist")], n)
    gender = rng.integers(0, 2, n)
    texts = [f"bio {seed}-{i} p{p} g{g}" for i, (p, g) in enumerate(zip(profession, gender, strict=True))]
    return _FakeSplit({"hard_text": texts, "profession": profession.tolist(), "gender": gender.tolist()})


def test_bias_in_bios_scr_follows_saebench_quadrants(monkeypatch):
    import datasets

    fake = {"train": _fake_bios(600, 0), "test": _fake_bios(200, 1)}
    monkeypatch.setattr(datasets, "load_dataset", lambda name: fake)
    data = labelled.load_bias_in_bios("scr", pair=("professor", "nurse"), train_size=80, test_size=40)
    t, s = data.labels["profession"], data.labels["gender"]
    assert data.class_names["profession"] == ("nurse", "professor")
    for i in range(len(data.texts)):  # label 1 = professor (id 21) and male (gender 0), as SAEBench's positives
        p, g = data.texts[i].split()[2:]
        assert (p == "p21") == bool(t[i]) and (g == "g0") == bool(s[i])
    train = data.splits["train"]
    assert len(train) == 80 and np.array_equal(t[train], s[train])
    assert np.bincount(2 * t[data.splits["test"]] + s[data.splits["test"]]).tolist() == [10] * 4
    assert all(data.texts[i].startswith("bio 1-") for i in data.splits["test"])  # HF test rows only
    assert not {data.texts[i] for i in data.splits["validation"]} & {data.texts[i] for i in train}


def test_bias_in_bios_tpp_is_balanced(monkeypatch):
    import datasets

    fake = {"train": _fake_bios(600, 0), "test": _fake_bios(300, 1)}
    monkeypatch.setattr(datasets, "load_dataset", lambda name: fake)
    data = labelled.load_bias_in_bios("tpp", classes=("professor", "nurse", "dentist"), train_size=40, test_size=40)
    for split, per_class in (("train", 20), ("validation", 20), ("test", 20)):
        rows = data.splits[split]
        y, g = data.labels["profession"][rows], data.labels["gender"][rows]
        assert np.bincount(2 * y + g).tolist() == [per_class // 2] * 6


def test_amazon_reviews_tpp_by_default_balanced_over_rating(monkeypatch):
    import datasets

    def split(n: int, seed: int) -> _FakeSplit:
        rng = np.random.default_rng(seed)
        category = rng.choice([labelled.AMAZON_CATEGORIES.index(c) for c in labelled.AMAZON_TPP_CLASSES], n)
        rating = rng.choice([1.0, 5.0], n)
        return _FakeSplit({"text": [f"r{c} {r}" for c, r in zip(category, rating, strict=True)],
                           "category": category.tolist(), "rating": rating.tolist()})

    fake = {"train": split(800, 0), "test": split(400, 1)}
    monkeypatch.setattr(datasets, "load_dataset", lambda name: fake)
    data = labelled.load_amazon_reviews(train_size=40, test_size=40)
    assert data.roles == {"classes": "category", "nuisance": "rating"}
    assert data.class_names["category"] == labelled.AMAZON_TPP_CLASSES
    for i, text in enumerate(data.texts):
        c = labelled.AMAZON_CATEGORIES[int(text.split()[0][1:])]
        assert data.class_names["category"][data.labels["category"][i]] == c
        assert data.class_names["rating"][data.labels["rating"][i]] == text.split()[1]
    rows = data.splits["test"]
    assert np.bincount(2 * data.labels["category"][rows] + data.labels["rating"][rows]).tolist() == [10] * 10


# ---------------------------------------------------------------------------------------------------------------
# The harder generated sets and the lists an evaluation averages over


def _bow_accuracy(data: LabelledSet, attr: str, positive: int, train: str = "train") -> float:
    """Cheap proxy of a clean probe: bag-of-words logistic regression, `attr == positive` vs the rest, trained on
    split `train` and scored on "test" with as many negatives as positives (as TPP's one-vs-rest rows)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    X = CountVectorizer(token_pattern=r"[a-z]+").fit_transform([t.lower() for t in data.texts])
    y = (data.labels[attr] == positive).astype(int)
    rng = np.random.default_rng(0)

    def balanced(rows: np.ndarray) -> np.ndarray:
        pos, neg = rows[y[rows] == 1], rows[y[rows] == 0]
        return np.concatenate([pos, rng.permutation(neg)[: len(pos)]])

    tr, te = balanced(data.splits[train]), balanced(data.splits["test"])
    clf = LogisticRegression(C=0.3, max_iter=2000).fit(X[tr], y[tr])
    return float((clf.predict(X[te]) == y[te]).mean())


@pytest.mark.parametrize("build", [
    lambda: labelled.hard_tpp_set(train_size=2000, test_size=1000),
    pytest.param(lambda: labelled.offline_tpp_set(train_size=2000, test_size=1000),
                 marks=pytest.mark.xfail(strict=True, reason="the old set is saturated: one keyword decides")),
])
def test_harder_tpp_set_is_neither_saturated_nor_weak_for_a_bag_of_words_probe(build):
    data = build()
    attr = data.roles["classes"]
    accs = [_bow_accuracy(data, attr, c) for c in range(len(data.class_names[attr]))]
    assert all(0.75 < a < 0.97 for a in accs), accs


@pytest.mark.parametrize("pair", labelled.HARD_SCR_PAIRS)
def test_harder_scr_set_target_is_learnable_and_spurious_more_salient(pair):
    data = labelled.hard_scr_set(train_size=2000, test_size=1000, pair=pair)
    target, spurious = data.roles["target"], data.roles["spurious"]
    a_target = _bow_accuracy(data, target, 1, "train_balanced")
    a_spurious = _bow_accuracy(data, spurious, 1, "train_balanced")
    assert 0.75 < a_target < 0.97 and 0.75 < a_spurious < 0.99
    assert a_spurious > a_target  # METRICS.md section 6: the biased probe must lean on the spurious attribute


def test_the_old_scr_set_fails_the_harder_sets_bound():
    data = offline_scr_set(train_size=2000, test_size=1000)
    assert _bow_accuracy(data, "gender", 1, "train_balanced") >= 0.97  # a pronoun decides: why it was replaced


def test_harder_sets_spread_each_class_over_many_words():
    data = labelled.hard_tpp_set(train_size=400, test_size=200)
    for c, topic in enumerate(data.class_names["topic"]):
        own = " ".join(data.texts[i] for i in np.flatnonzero(data.labels["topic"] == c)).lower()
        words = set(own.replace(".", " ").replace(",", " ").split())
        lexicon = {w for slot in labelled.TOPIC_LEXICON[topic].values() for w in slot}
        assert len(words & lexicon) > 20  # dozens of the class's own words, no single keyword
        # Every lexicon word is also found in other classes' texts (fidelity < 1, and shared words).
        others = " ".join(data.texts[i] for i in np.flatnonzero(data.labels["topic"] != c)).lower()
        assert len(lexicon & set(others.replace(".", " ").replace(",", " ").split())) > 0.8 * len(lexicon)


def test_harder_sets_layout_and_determinism():
    scr = labelled.hard_scr_set(seed=5, train_size=80, test_size=40, validation_size=20)
    assert _same(scr, labelled.hard_scr_set(seed=5, train_size=80, test_size=40, validation_size=20))
    assert not _same(scr, labelled.hard_scr_set(seed=6, train_size=80, test_size=40, validation_size=20))
    t, s = scr.labels["topic"], scr.labels["mood"]
    assert len(scr.splits["train"]) == 80 and np.array_equal(t[scr.splits["train"]], s[scr.splits["train"]])
    for split, per_quadrant in (("train_balanced", 20), ("validation", 5), ("test", 10)):
        rows = scr.splits[split]
        assert np.bincount(2 * t[rows] + s[rows], minlength=4).tolist() == [per_quadrant] * 4
        assert abs(np.corrcoef(t[rows], s[rows])[0, 1]) < 1e-9
    tpp = labelled.hard_tpp_set(seed=5, train_size=40, test_size=20)
    assert _same(tpp, labelled.hard_tpp_set(seed=5, train_size=40, test_size=20))
    for split, per_class in (("train", 20), ("validation", 10), ("test", 10)):
        rows = tpp.splits[split]
        y, g = tpp.labels["topic"][rows], tpp.labels["gender"][rows]
        assert np.bincount(2 * y + g).tolist() == [per_class // 2] * 10
    all_rows = np.concatenate(list(tpp.splits.values()))
    assert len(all_rows) == len(set(all_rows.tolist())) == len(tpp.texts)  # splits disjoint


def test_offline_lists_have_unique_names_and_enough_test_texts_per_probe():
    from evals.scr_tpp import one_vs_rest_rows
    from evals.shakespeare_sets import corpus_available

    scr = labelled.offline_scr_sets()
    names = [d.description["name"] for d in scr]
    assert len(names) == len(set(names)) and len(scr) >= 2 + corpus_available()
    assert all(len(d.splits["test"]) >= 1000 for d in scr)
    tpp = labelled.offline_tpp_sets()
    assert len({d.description["name"] for d in tpp}) == len(tpp) == 1 + corpus_available()
    rng = np.random.default_rng(0)
    for data in tpp:
        attr = data.roles["classes"]
        n = len(data.class_names[attr])
        for c in range(n):
            pos, neg = one_vs_rest_rows(data.labels[attr], data.splits["test"], c, n, rng)
            assert len(pos) + len(neg) >= 1000, (data.description["name"], c)
    for data in scr + tpp:
        json.dumps(data.description)  # a plain JSON key for the activation store


def test_offline_lists_leave_out_the_shakespeare_sets_with_a_warning_when_the_corpus_is_missing(monkeypatch):
    from evals import shakespeare_sets

    def missing():
        raise shakespeare_sets.CorpusUnavailableError("the corpus is not here")

    monkeypatch.setattr(shakespeare_sets, "shakespeare_passages", missing)
    with pytest.warns(UserWarning, match="generated sets only"):
        sets = labelled.offline_scr_sets(train_size=40, test_size=20)
    expected = [f"generated_scr_{a}_{b}_{c}" for a, b, c in labelled.HARD_SCR_PAIRS]
    assert [d.description["name"] for d in sets] == expected
    with pytest.warns(UserWarning, match="generated sets only"):
        assert [d.description["name"] for d in labelled.offline_tpp_sets(train_size=40, test_size=20)] == [
            "generated_tpp"]


def test_real_lists_are_saebench_runs_with_unique_names(monkeypatch):
    import datasets

    def bios(n, seed):
        rng = np.random.default_rng(seed)
        wanted = {p for pair in labelled.BIOS_SCR_PAIRS for p in pair} | set(labelled.BIOS_TPP_CLASSES)
        profession = rng.choice([labelled.PROFESSIONS.index(p) for p in sorted(wanted)], n)
        gender = rng.integers(0, 2, n)
        return _FakeSplit({"hard_text": [f"b{i}" for i in range(n)], "profession": profession.tolist(),
                           "gender": gender.tolist()})

    def amazon(n, seed):
        rng = np.random.default_rng(seed)
        wanted = {c for pair in labelled.AMAZON_SCR_PAIRS for c in pair} | set(labelled.AMAZON_TPP_CLASSES)
        category = rng.choice([labelled.AMAZON_CATEGORIES.index(c) for c in sorted(wanted)], n)
        return _FakeSplit({"text": [f"a{i}" for i in range(n)], "category": category.tolist(),
                           "rating": rng.choice([1.0, 5.0], n).tolist()})

    loads = []
    fake = {labelled.BIAS_IN_BIOS: {"train": bios(6000, 0), "test": bios(2000, 1)},
            labelled.AMAZON_REVIEWS: {"train": amazon(6000, 2), "test": amazon(2000, 3)}}
    monkeypatch.setattr(datasets, "load_dataset", lambda name: loads.append(name) or fake[name])
    scr = labelled.real_scr_sets(train_size=40, test_size=40)
    assert len(scr) == 8 and loads == [labelled.BIAS_IN_BIOS, labelled.AMAZON_REVIEWS]  # each dataset loaded once
    names = [d.description["name"] for d in scr]
    assert len(set(names)) == 8 and f"{labelled.BIAS_IN_BIOS}_scr_professor_nurse" in names
    tpp = labelled.real_tpp_sets(train_size=40, test_size=40)
    assert [d.description["name"] for d in tpp] == [f"{labelled.BIAS_IN_BIOS}_tpp", f"{labelled.AMAZON_REVIEWS}_tpp"]


def test_real_lists_offline_raise_one_error_naming_the_hub(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'huggingface.co'")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    for make in (labelled.real_scr_sets, labelled.real_tpp_sets):
        with pytest.raises(LabelledSetError, match="Hugging Face hub is unreachable"):
            make(train_size=40, test_size=40)
