"""Labelled sets for SCR / TPP: the generated offline sets and the hub loaders (faked here, never downloaded)."""

from __future__ import annotations

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
