"""Labelled text sets for the SCR and TPP evals: the offline lists, the generated sets, SAEBench's real ones.

A `LabelledSet` is texts, one integer label array per attribute, and named splits (index arrays into the texts).

The lists an evaluation averages over (each set's description["name"] is unique within its list)
------------------------------------------------------------------------------------------------
- `offline_scr_sets(seed, train_size, test_size, validation_size)`: "shakespeare_scr_comedy_prose"
  (evals/shakespeare_sets.py; left out with a warning where the corpus cannot be had), "generated_scr_war_love_mood"
  and "generated_scr_sea_gold_time" (`hard_scr_set`).
- `offline_tpp_sets(...)`: "shakespeare_tpp_genre" (three Folio genres) and "generated_tpp" (`hard_tpp_set`).
- `real_scr_sets(train_size, test_size)`: SAEBench's eight SCR runs (four Bias in Bios profession pairs with
  gender spurious, four Amazon category pairs with rating spurious); `real_tpp_sets`: Bias in Bios class set 1 and
  Amazon, five classes each.
At the default sizes (train 4000, test 1000) every SCR test split holds 1,000 texts (250 per quadrant) and every
TPP one-vs-rest probe tests on 1,000 rows (500 positives, 500 negatives).

Measured on the embedded model (vsae-tiny; the demo cache's blocks.2.hook_resid_post, mean-pooled; L1 probes
selected on validation; test accuracies; seed 0; default sizes):

SCR (oracle target, oracle spurious; biased probe on target, on spurious):
| set | texts / tokens | clean probe test accuracies |
|---|---|---|
| generated_scr_war_love_mood | 8,000 / 354k | 0.853, 0.927 (mood); 0.619, 0.839 |
| generated_scr_sea_gold_time | 8,000 / 382k | 0.887, 0.899 (time); 0.698, 0.742 |
| shakespeare_scr_comedy_prose | 6,176 / 474k | 0.560, 0.936 (mode); 0.516, 0.942 (a weak target: shakespeare_sets) |
TPP (each one-vs-rest probe):
| set | texts / tokens | clean probe test accuracies |
|---|---|---|
| generated_tpp | 15,000 / 696k | war 0.838, love 0.841, sea 0.866, feast 0.857, prayer 0.853 |
| shakespeare_tpp_genre | 9,000 / 689k | comedy 0.689, history 0.699, tragedy 0.638 |

A bag-of-words probe on the same generated texts: TPP 0.94-0.96, SCR topic 0.93, mood / time 0.97-0.98.
Building a generated set takes 0.8-1.3 s, a Shakespeare one 0.04 s after a 1 s parse of the corpus; the forward
passes are the cost (about 50k tokens/s on the idle 2-core CPU, 2-5k when it is shared), paid once per model,
hook and set with `evals.probes.cached_token_activations`.

Harder generated sets (`hard_scr_set`, `hard_tpp_set`; no download; the same seed gives the same set)
-------------------------------------------------------------------------------------------------
The first generated sets made each concept a token identity (a pronoun, two keywords), which any decoder rows
aligned with the probe erase, and their TPP probes all scored 1.000. Here no word decides a class. A text is 2-4
`FRAMES` (shared by every class: "{S} {v} the {a} {n}.", "The {n} was {a}, and the {m} was {b}.", ...) plus,
half the time, a neutral sentence. Topic slots ({n} noun, {v} verb, {a} adjective) draw from `TOPIC_LEXICON`
(10-15 words a slot and topic, a dozen words shared by two topics), attribute slots ({m} {b} {d}) from
`ATTRIBUTE_LEXICON` (mood: joy / grief; time: night / day). Each slot takes its word from the text's own class
with probability `TOPIC_FIDELITY` / `ATTRIBUTE_FIDELITY` and otherwise from another class (`Mixture`), so every
class's words also appear in every other class's texts and a probe must weigh many words. The subject's gender
(noun phrase, then he / she) is a nuisance, independent of everything. The fidelities were set from the task:
a bag-of-words probe (tests/test_labelled.py) between 0.75 and 0.97 and, for SCR, the spurious attribute more
salient than the target (METRICS.md section 6), then checked on the embedded model's clean probes (below), never
against an SAE's score.
- `hard_scr_set`: target "topic" (pair[0] = 1 vs pair[1] = 0, fidelity 0.78; the other word always the paired
  topic's), spurious attribute pair[2] (first value = 1, fidelity 0.96); `HARD_SCR_PAIRS` = (war, love, mood),
  (sea, gold, time): disjoint vocabularies, two independent pairs. SAEBench's quadrant layout (`scr_split_layout`):
  with q = train_size // 4, "train" = 2q PP + 2q NN (rho = 1, the biased probe's set), "train_balanced" = the first
  q of each quadrant (rho = 0; oracle and spurious probes, latent attribution), "validation" and "test" balanced
  with validation_size // 4 and test_size // 4 texts per quadrant.
- `hard_tpp_set`: five classes "topic" (war, love, sea, feast, prayer; fidelity 0.72, the other word from any
  of the other four), attribute slots filled from all four attribute values at random (background words shared by
  every class), nuisance "gender" balanced within every class and split; per class train_size // 2 training texts
  (SAEBench's 2000), validation_size // 2 and test_size // 2 (SAEBench's 500).
Texts run 18-89 tokens of the embedded tokenizer (median 46), so BOS and right padding are exercised.

The first generated sets (`offline_scr_set`, `offline_tpp_set`; kept for tests and comparison)
----------------------------------------------------------------------------------------------
A text is 2 to 4 sentences drawn from one topic's template list (`TOPIC_TEMPLATES`, or for SCR two keywords per
topic set into `KEYWORD_PATTERNS`), plus half the time a neutral sentence; the subject carries the gender.
`offline_scr_set`: target "gender" (male = 1), spurious "topic" (topics[0] = 1). `offline_tpp_set`: five topics,
gender balanced. Measured on the embedded model (blocks.2.hook_resid_post, default sizes, seed 0): gender probe
1.000, topic probe 0.997, biased probe 0.627 on gender and 0.873 on topic (war/love); every TPP probe 1.000. A
bag-of-words probe also scores 1.000 on gender: these sets are saturated, which is why the harder ones exist.

Real sets (as SAEBench 0.4 builds them, via `datasets.load_dataset`; they need the Hugging Face hub or its cache)
--------------------------------------------------------------------------------------------------------------
- `load_bias_in_bios`: `LabHC/bias_in_bios`, text `hard_text`, column 1 `profession`, column 2 `gender`.
- `load_amazon_reviews`: `canrager/amazon_reviews_mcauley_1and5`, text `text`, column 1 `category`,
  column 2 `rating` (1.0 plays SAEBench's "male", 5.0 its "female").
Train and test rows are SAEBench's (HF `train` and `test`); the validation split, which SAEBench lacks (it
selects probes on the test set), takes further rows of HF `train` that follow the training rows (in dataset order
for SCR, in the seeded sampling order for TPP), so it never overlaps them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BIAS_IN_BIOS = "LabHC/bias_in_bios"
AMAZON_REVIEWS = "canrager/amazon_reviews_mcauley_1and5"

# SAEBench's dataset_info (0.4): label ids as stored in the HF datasets.
PROFESSIONS = (
    "accountant", "architect", "attorney", "chiropractor", "comedian", "composer", "dentist", "dietitian", "dj",
    "filmmaker", "interior_designer", "journalist", "model", "nurse", "painter", "paralegal", "pastor",
    "personal_trainer", "photographer", "physician", "poet", "professor", "psychologist", "rapper",
    "software_engineer", "surgeon", "teacher", "yoga_teacher",
)
AMAZON_CATEGORIES = (
    "All_Beauty", "Toys_and_Games", "Cell_Phones_and_Accessories", "Industrial_and_Scientific", "Gift_Cards",
    "Musical_Instruments", "Electronics", "Handmade_Products", "Arts_Crafts_and_Sewing", "Baby_Products",
    "Health_and_Household", "Office_Products", "Digital_Music", "Grocery_and_Gourmet_Food", "Sports_and_Outdoors",
    "Home_and_Kitchen", "Subscription_Boxes", "Tools_and_Home_Improvement", "Pet_Supplies", "Video_Games",
    "Kindle_Store", "Clothing_Shoes_and_Jewelry", "Patio_Lawn_and_Garden", "Unknown", "Books", "Automotive",
    "CDs_and_Vinyl", "Beauty_and_Personal_Care", "Amazon_Fashion", "Magazine_Subscriptions", "Software",
    "Health_and_Personal_Care", "Appliances", "Movies_and_TV",
)
# SCR pairs (column 1 positive, negative) and TPP classes, SAEBench's defaults (METRICS.md sections 4 and 5).
BIOS_SCR_PAIRS = (("professor", "nurse"), ("architect", "journalist"), ("surgeon", "psychologist"),
                  ("attorney", "teacher"))
AMAZON_SCR_PAIRS = (("Books", "CDs_and_Vinyl"), ("Software", "Electronics"), ("Pet_Supplies", "Office_Products"),
                    ("Industrial_and_Scientific", "Toys_and_Games"))
BIOS_TPP_CLASSES = ("accountant", "architect", "attorney", "dentist", "filmmaker")
AMAZON_TPP_CLASSES = ("Toys_and_Games", "Cell_Phones_and_Accessories", "Industrial_and_Scientific",
                      "Musical_Instruments", "Electronics")


class LabelledSetError(RuntimeError):
    """A labelled set that cannot be built or loaded; the message names the dataset and the problem."""


@dataclass
class LabelledSet:
    """Texts with integer labels per attribute, and named splits of them.

    `labels[attr][i]` is text i's value of `attr`; `class_names[attr][v]` names value v. `splits[name]` holds
    indices into `texts`. `roles` says which attribute plays which part: an SCR set has "target" and "spurious"
    (binary; 1 = SAEBench's positive, e.g. professor / male), a TPP set "classes" and optionally "nuisance".
    """

    texts: list[str]
    labels: dict[str, np.ndarray]
    splits: dict[str, np.ndarray]
    class_names: dict[str, tuple[str, ...]]
    roles: dict[str, str]
    description: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.texts)
        self.labels = {k: np.asarray(v, dtype=np.int64) for k, v in self.labels.items()}
        self.splits = {k: np.asarray(v, dtype=np.int64) for k, v in self.splits.items()}
        for attr, values in self.labels.items():
            if values.shape != (n,):
                raise ValueError(f"labels[{attr!r}] has shape {values.shape}, expected ({n},)")
            names = self.class_names.get(attr)
            if names is None or n and not 0 <= values.min() <= values.max() < len(names):
                raise ValueError(f"labels[{attr!r}] must be ids into class_names[{attr!r}]")
        for name, rows in self.splits.items():
            if rows.ndim != 1 or rows.size and not 0 <= rows.min() <= rows.max() < n:
                raise ValueError(f"split {name!r} must be a 1-d array of indices into the {n} texts")
        for role, attr in self.roles.items():
            if attr not in self.labels:
                raise ValueError(f"role {role!r} names attribute {attr!r}, which has no labels")


# ---------------------------------------------------------------------------------------------------------------
# Offline sets

GENDERS = ("female", "male")  # label 1 = male, as SAEBench's positive "male" (bias_in_bios gender 0)
GENDER_NOUNS = {
    "male": ("king", "lord", "duke", "prince", "father", "brother", "son", "knight", "husband", "gentleman"),
    "female": ("queen", "lady", "duchess", "princess", "mother", "sister", "daughter", "maid", "wife", "gentlewoman"),
}
PRONOUNS = {"male": {"s": "he", "p": "his", "o": "him"}, "female": {"s": "she", "p": "her", "o": "her"}}
DETERMINERS = ("the", "my", "our", "the good", "the noble")

# {S}: the subject (noun phrase or pronoun); {p}: possessive; {o}: object pronoun. No gendered word besides these.
TOPIC_TEMPLATES = {
    "war": (
        "{S} drew {p} sword and rode to the war.",
        "{S} led the soldiers against the enemy, and the drums did beat.",
        "{S} fought upon the bloody field until the foe was slain.",
        "{S} took up arms, and {p} blade was red with blood.",
        "{S} would not yield, though the battle went hard with {o}.",
        "{S} called for {p} horse, {p} armour and {p} spear.",
        "{S} hath slain a hundred men in the wars.",
        "{S} marched with ten thousand soldiers to besiege the town.",
    ),
    "love": (
        "{S} gave {p} heart to a gentle love.",
        "{S} sighed for love, and wept sweet tears.",
        "{S} wrote sweet verses of {p} dear love.",
        "{S} did vow with a kiss to love for ever.",
        "{S} spoke of beauty and of the fair rose, for love was in {p} eyes.",
        "{S} was made sweet and gentle by love, and {p} heart was full.",
        "{S} longed to embrace {p} love, so fair and so dear.",
        "{S} dreamed all night of kisses and of a true lover.",
    ),
    "sea": (
        "{S} set sail upon the sea, and the wind blew high.",
        "{S} saw the storm drive {p} ship upon the rocks.",
        "{S} stood upon the shore and watched the waves.",
        "{S} crossed the salt sea in a little boat.",
        "{S} heard the sailors cry, for the tempest rose upon the deep.",
        "{S} was wrecked at sea and swam to the island.",
        "{S} bade the master of the ship hoist the sails.",
        "{S} feared the waters, the waves and the wild wind.",
    ),
    "feast": (
        "{S} called for wine, and bread, and meat upon the table.",
        "{S} did eat and drink until the supper was done.",
        "{S} filled {p} cup with wine at the feast.",
        "{S} gave a great feast, with cakes and ale for all.",
        "{S} was hungry, and asked the cook for meat and bread.",
        "{S} drank a health to all the guests at dinner.",
        "{S} tasted the good wine and the roasted meat.",
        "{S} sat at the table and ate the bread and the fish.",
    ),
    "prayer": (
        "{S} knelt down to pray to heaven.",
        "{S} prayed to God to save {p} soul.",
        "{S} went to church and heard the holy bells.",
        "{S} asked the saints in heaven for grace.",
        "{S} bowed {p} head in prayer before the altar.",
        "{S} read the holy book and prayed for mercy.",
        "{S} begged the heavens to forgive {p} sins.",
        "{S} called on God and all the angels.",
    ),
    "gold": (
        "{S} counted {p} gold and ducats in a purse.",
        "{S} paid the merchant a thousand ducats.",
        "{S} would sell all {p} land for money.",
        "{S} kept {p} gold and silver in a chest.",
        "{S} borrowed three thousand ducats at interest.",
        "{S} was rich, with coin and jewels and a fat purse.",
        "{S} must pay the debt, or lose {p} wealth.",
        "{S} bought and sold, for {p} trade was in gold.",
    ),
}
NEUTRAL_SENTENCES = (
    "It was a cold night, and the moon was up.",
    "The clock struck twelve.",
    "So it was, in the old days.",
    "Now the morning came, and all the town awoke.",
    "This was long ago, in another country.",
    "The rain fell all day upon the roofs.",
    "No one knew what the next day would bring.",
    "And so the time went by.",
)
# SCR's spurious attribute should live in few directions (METRICS.md section 6), so its topics are told by two
# keywords each, set into shared sentence patterns ({k}: first keyword, {K}: capitalised, {w}: second keyword).
# Measured with the embedded model's demo SAEs: on the rich TOPIC_TEMPLATES the topic is spread over so many
# latents that SCR stayed within about +-0.1 up to N = 50; with keywords TopK reaches 0.29 / 0.53 at N = 10 / 20.
KEYWORD_PATTERNS = (
    "{S} spoke of {k}.",
    "{S} thought of {k} all day.",
    "{S} dreamed of {k} and of {p} {w}.",
    "{S} gave {p} {w} to {p} friend.",
    "{K} came, and {s} thought of {p} {w}.",
    "{S} would give {p} life for {k}.",
    "{S} looked upon {p} {w}.",
    "All {p} days were {k}, and {p} {w}.",
)
SCR_KEYWORDS = {"war": ("war", "sword"), "love": ("love", "heart"), "sea": ("sea", "ship"), "gold": ("gold", "purse")}
SCR_TEMPLATES = {
    topic: tuple(p.replace("{k}", k).replace("{K}", k.capitalize()).replace("{w}", w) for p in KEYWORD_PATTERNS)
    for topic, (k, w) in SCR_KEYWORDS.items()
}
SCR_PAIRS = (("war", "love"), ("sea", "gold"))  # independent topic pairs, (spurious = 1, spurious = 0)
TPP_TOPICS = ("war", "love", "sea", "feast", "prayer")


def _sentence(rng: np.random.Generator, templates: Sequence[str], gender: str, first: bool) -> str:
    template = templates[rng.integers(len(templates))]
    pron = PRONOUNS[gender]
    if first or rng.random() < 0.5:  # a text opens with a noun phrase, later sentences may say he / she
        nouns = GENDER_NOUNS[gender]
        subject = f"{DETERMINERS[rng.integers(len(DETERMINERS))]} {nouns[rng.integers(len(nouns))]}"
    else:
        subject = pron["s"]
    text = template.format(S=subject, s=pron["s"], p=pron["p"], o=pron["o"])
    return text[0].upper() + text[1:]


def generate_text(rng: np.random.Generator, templates: Sequence[str], gender: str) -> str:
    """2-4 sentences from `templates` (one topic) whose subject has `gender`; half the time one neutral sentence."""
    sentences = [_sentence(rng, templates, gender, first=i == 0) for i in range(int(rng.integers(2, 5)))]
    if rng.random() < 0.5:
        sentences.insert(int(rng.integers(len(sentences) + 1)), NEUTRAL_SENTENCES[rng.integers(len(NEUTRAL_SENTENCES))])
    return " ".join(sentences)


def _check_topics(topics: Sequence[str], known: dict, minimum: int) -> None:
    unknown = [t for t in topics if t not in known]
    if unknown or len(set(topics)) != len(topics) or len(topics) < minimum:
        raise ValueError(f"topics must be >= {minimum} distinct names from {sorted(known)}, got {topics}")


QUADRANTS = ((1, 1), (1, 0), (0, 1), (0, 0))  # (target, spurious): PP, AN, NP, NN


def scr_split_layout(train: dict[tuple[int, int], np.ndarray], validation: dict[tuple[int, int], np.ndarray],
                     test: dict[tuple[int, int], np.ndarray], q: int, rng: np.random.Generator
                     ) -> dict[str, np.ndarray]:
    """SAEBench's SCR splits from rows per quadrant (`QUADRANTS`): `train[quad]` holds 2q rows on the diagonal
    and q off it. "train" (the biased probe's, rho = 1) is all diagonal training rows; "train_balanced" the first
    q of every quadrant (rho = 0); "validation" and "test" everything given for them. Each split is shuffled."""
    splits = {
        "train": np.concatenate([train[(1, 1)], train[(0, 0)]]),
        "train_balanced": np.concatenate([train[quad][:q] for quad in QUADRANTS]),
        "validation": np.concatenate([validation[quad] for quad in QUADRANTS]),
        "test": np.concatenate([test[quad] for quad in QUADRANTS]),
    }
    return {name: rng.permutation(rows) for name, rows in splits.items()}  # SAEBench shuffles each list too


def scr_quadrant_sizes(train_size: int, test_size: int, validation_size: int | None) -> tuple[int, int, int]:
    """(q, q_val, q_test): texts per quadrant, train_size // 4 etc. as in SAEBench; validation defaults to test."""
    validation_size = test_size if validation_size is None else validation_size
    sizes = train_size // 4, validation_size // 4, test_size // 4
    if min(sizes) < 1:
        raise ValueError("train_size, validation_size and test_size must each be >= 4 (one text per quadrant)")
    return sizes


def _generated_scr(rng: np.random.Generator, make: Callable[[int, int], str], q: int, q_val: int, q_test: int
                   ) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Texts `make(target, spurious)` in SAEBench's quadrant layout: (texts, target, spurious, splits)."""
    texts: list[str] = []
    labels: list[tuple[int, int]] = []

    def add(n: int, quad: tuple[int, int]) -> np.ndarray:
        start = len(texts)
        texts.extend(make(*quad) for _ in range(n))
        labels.extend([quad] * n)
        return np.arange(start, start + n)

    # The biased set takes 2q texts from each diagonal quadrant, the balanced ones the first q of every quadrant.
    train = {quad: add(2 * q if quad[0] == quad[1] else q, quad) for quad in QUADRANTS}
    validation = {quad: add(q_val, quad) for quad in QUADRANTS}
    test = {quad: add(q_test, quad) for quad in QUADRANTS}
    target, spurious = np.array(labels, dtype=np.int64).reshape(-1, 2).T
    return texts, target, spurious, scr_split_layout(train, validation, test, q, rng)


def offline_scr_set(
    seed: int = 0,
    train_size: int = 4000,
    test_size: int = 1000,
    validation_size: int | None = None,
    topics: tuple[str, str] = SCR_PAIRS[0],
) -> LabelledSet:
    """The easy generated SCR set (module docstring): target "gender" (male = 1), spurious "topic" (topics[0] = 1).

    Splits: "train" (biased, rho = 1: 2q PP + 2q NN), "train_balanced" (q per quadrant), "validation" and
    "test" (balanced, size // 4 per quadrant), with q = train_size // 4 as in SAEBench.
    """
    _check_topics(topics, SCR_TEMPLATES, 2)
    if len(topics) != 2:
        raise ValueError(f"SCR needs exactly two topics, got {topics}")
    q, q_val, q_test = scr_quadrant_sizes(train_size, test_size, validation_size)
    rng = np.random.default_rng(seed)
    texts, gender, topic, splits = _generated_scr(
        rng, lambda g, t: generate_text(rng, SCR_TEMPLATES[topics[1 - t]], GENDERS[g]), q, q_val, q_test)
    return LabelledSet(
        texts=texts,
        labels={"gender": gender, "topic": topic},
        splits=splits,
        class_names={"gender": GENDERS, "topic": (topics[1], topics[0])},
        roles={"target": "gender", "spurious": "topic"},
        description={
            "name": "offline_scr", "source": "generated by vsae.evals.labelled (templates, see module docstring)",
            "seed": seed, "topics": list(topics), "quadrant_size": {"train": q, "validation": q_val, "test": q_test},
            "train_correlation": "gender == topic in split 'train' (rho = 1); all other splits balanced",
        },
    )


def _tpp_layout(rng: np.random.Generator, make: Callable[[int, int], str], n_classes: int, train_size: int,
                test_size: int, validation_size: int | None
                ) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """Texts `make(class, gender)`, size // 4 per (class, gender) in each split ("train", "validation", "test"):
    (texts, class labels, gender labels, splits, texts per class in each split)."""
    validation_size = test_size if validation_size is None else validation_size
    sizes = {"train": train_size // 4, "validation": validation_size // 4, "test": test_size // 4}
    if min(sizes.values()) < 1:
        raise ValueError("train_size, validation_size and test_size must each be >= 4 (one text per class x gender)")
    texts: list[str] = []
    labels: list[tuple[int, int]] = []
    splits: dict[str, np.ndarray] = {}
    for split, per_quadrant in sizes.items():
        start = len(texts)
        for c in range(n_classes):
            for g in range(len(GENDERS)):
                texts.extend(make(c, g) for _ in range(per_quadrant))
                labels.extend([(c, g)] * per_quadrant)
        splits[split] = rng.permutation(np.arange(start, len(texts)))
    category, gender = np.array(labels, dtype=np.int64).reshape(-1, 2).T
    return texts, category, gender, splits, {k: 2 * v for k, v in sizes.items()}


def offline_tpp_set(
    seed: int = 0,
    train_size: int = 4000,
    test_size: int = 1000,
    validation_size: int | None = None,
    topics: Sequence[str] = TPP_TOPICS,
) -> LabelledSet:
    """The easy generated TPP set (module docstring): "category" = index into `topics`, nuisance "gender" balanced.

    Per class, train_size // 2 training texts (SAEBench's 2q = 2000), validation_size // 2 and test_size // 2
    (SAEBench's 500) for the other splits; half of each male.
    """
    topics = tuple(topics)
    _check_topics(topics, TOPIC_TEMPLATES, 2)
    rng = np.random.default_rng(seed)
    texts, category, gender, splits, per_class = _tpp_layout(
        rng, lambda c, g: generate_text(rng, TOPIC_TEMPLATES[topics[c]], GENDERS[g]), len(topics),
        train_size, test_size, validation_size)
    return LabelledSet(
        texts=texts,
        labels={"category": category, "gender": gender},
        splits=splits,
        class_names={"category": topics, "gender": GENDERS},
        roles={"classes": "category", "nuisance": "gender"},
        description={
            "name": "offline_tpp", "source": "generated by vsae.evals.labelled (templates, see module docstring)",
            "seed": seed, "topics": list(topics), "per_class": per_class,
        },
    )


# ---------------------------------------------------------------------------------------------------------------
# Harder generated sets: every concept spread over many words, classes sharing vocabulary

# Topic lexicons by slot: {n} noun, {v} past-tense verb taking "the ...", {a} adjective. Ten or more words a slot,
# so no keyword decides a class, and some words stand in two topics (heart, storm, blood, tears, salt, fish, wine,
# sweet, rich, faithful, dear, golden) so the classes share vocabulary.
TOPIC_LEXICON = {
    "war": {
        "n": ("sword", "battle", "soldier", "army", "spear", "shield", "drum", "enemy", "siege", "banner", "camp",
              "trumpet", "blood", "storm", "heart"),
        "v": ("fought", "besieged", "struck", "defended", "conquered", "armed", "wounded", "charged", "routed",
              "ambushed"),
        "a": ("bloody", "brave", "fierce", "valiant", "victorious", "bold", "iron", "warlike", "mighty", "wounded"),
    },
    "love": {
        "n": ("heart", "kiss", "lover", "rose", "embrace", "beauty", "ring", "bride", "letter", "flower", "sonnet",
              "wedding", "tears", "sigh", "darling"),
        "v": ("kissed", "embraced", "adored", "cherished", "courted", "wooed", "praised", "desired", "missed",
              "caressed"),
        "a": ("sweet", "tender", "fair", "gentle", "dear", "beloved", "faithful", "lovely", "true", "amorous"),
    },
    "sea": {
        "n": ("ship", "wave", "sail", "shore", "sailor", "tide", "anchor", "island", "mast", "harbour", "deck",
              "voyage", "salt", "storm", "fish"),
        "v": ("sailed", "steered", "anchored", "rowed", "crossed", "launched", "rigged", "wrecked", "boarded",
              "navigated"),
        "a": ("stormy", "deep", "wild", "salty", "windy", "wet", "tossing", "briny", "foaming", "seaworthy"),
    },
    "feast": {
        "n": ("bread", "meat", "table", "cup", "supper", "cake", "ale", "cook", "dish", "guest", "banquet", "cheese",
              "wine", "salt", "fish"),
        "v": ("ate", "drank", "tasted", "served", "roasted", "poured", "carved", "baked", "devoured", "shared"),
        "a": ("roasted", "hungry", "full", "fat", "spiced", "savoury", "delicious", "plentiful", "sweet", "rich"),
    },
    "prayer": {
        "n": ("altar", "church", "saint", "angel", "soul", "bell", "candle", "sin", "grace", "priest", "psalm",
              "chapel", "blood", "tears", "wine"),
        "v": ("blessed", "worshipped", "confessed", "hallowed", "sanctified", "forgave", "glorified", "revered",
              "praised", "kissed"),
        "a": ("holy", "blessed", "sacred", "humble", "pious", "devout", "heavenly", "penitent", "faithful", "solemn"),
    },
    "gold": {
        "n": ("gold", "coin", "purse", "ducat", "merchant", "chest", "jewel", "debt", "silver", "treasure", "price",
              "wealth", "ring", "cup", "crown"),
        "v": ("counted", "paid", "sold", "bought", "borrowed", "lent", "hoarded", "weighed", "spent", "bargained"),
        "a": ("golden", "costly", "precious", "wealthy", "poor", "greedy", "thrifty", "rich", "dear", "silver"),
    },
}
# Attribute lexicons ({m} noun, {b} adjective, {d} adverbial): the SCR sets' spurious attributes, and background
# words (drawn at random, independent of the class) in the TPP set.
ATTRIBUTE_LEXICON = {
    "mood": {
        "joy": {
            "m": ("laughter", "mirth", "joy", "delight", "song", "music", "dancing", "cheer", "merriment", "jest"),
            "b": ("merry", "glad", "joyful", "cheerful", "happy", "blithe", "jolly", "jocund", "gay", "light"),
            "d": ("gladly", "merrily", "happily", "cheerfully", "with a smile", "with laughter", "joyfully",
                  "in high spirits", "with delight", "singing"),
        },
        "grief": {
            "m": ("sorrow", "grief", "mourning", "woe", "weeping", "sighing", "lament", "sadness", "despair", "pain"),
            "b": ("sad", "sorrowful", "heavy", "mournful", "woeful", "doleful", "grieved", "weary", "wretched",
                  "forlorn"),
            "d": ("sadly", "heavily", "mournfully", "with a sigh", "in tears", "sorrowfully", "wearily",
                  "in despair", "with a groan", "weeping"),
        },
    },
    "time": {
        "night": {
            "m": ("moon", "darkness", "midnight", "stars", "owl", "dream", "shadow", "night", "nightingale", "dusk"),
            "b": ("dark", "silent", "starry", "moonlit", "sleeping", "black", "cold", "still", "dim", "drowsy"),
            "d": ("at night", "by moonlight", "at midnight", "in the dark", "by candlelight", "under the stars",
                  "in the small hours", "before sleep", "after dusk", "in the night"),
        },
        "day": {
            "m": ("sun", "morning", "noon", "daylight", "dawn", "sunshine", "lark", "day", "sunrise", "afternoon"),
            "b": ("bright", "sunny", "golden", "shining", "waking", "clear", "warm", "still", "radiant", "hot"),
            "d": ("at noon", "by day", "in the morning", "at dawn", "in the sunshine", "under the sun",
                  "in broad daylight", "after breakfast", "at sunrise", "in the day"),
        },
    },
}
# Sentence frames: topic slots {n} {v} {a}, attribute slots {m} {b} {d}, subject {S} / {s} / {p} as in
# TOPIC_TEMPLATES. The same frames serve every class and attribute, so the words in the slots tell them apart.
FRAMES = (
    "{S} {v} the {a} {n}.",
    "{S} {v} the {n} and the {n}.",
    "{S} spoke {d} of the {n} and of the {a} {n}.",
    "The {n} was {a}, and the {m} was {b}.",
    "{S} thought {d} of {p} {a} {n}.",
    "{S} was {b}, for the {n} was near.",
    "In the {m}, {s} {v} the {n}.",
    "{S} sat {d} beside the {a} {n}.",
    "All {p} days were full of {n} and {m}.",
    "{S} {v} the {n}, and the {m} was {b}.",
    "The {b} {m} came, and {s} {v} the {a} {n}.",
    "{S} looked {d} upon the {n}.",
)
TOPIC_SLOTS, ATTRIBUTE_SLOTS = frozenset("nva"), frozenset("mbd")
_SLOT = re.compile(r"\{(\w)\}")
# Probability that a topic slot takes its word from the text's own topic (else from another class's lexicon), and
# likewise for attribute slots. With 2-4 frames (about 2 topic and 1.5 attribute slots each) these put a
# bag-of-words probe at 0.94-0.96 (TPP) and 0.93 / 0.97 (SCR target / spurious), and the embedded model's clean
# probes, some 10 points lower, near 0.85-0.9 (module docstring): neither saturated nor weak, the spurious
# attribute more salient than the target. Set from clean accuracies only, never from an SAE's score.
TOPIC_FIDELITY = {"tpp": 0.72, "scr": 0.78}
ATTRIBUTE_FIDELITY = 0.96
HARD_SCR_PAIRS = (("war", "love", "mood"), ("sea", "gold", "time"))  # (target topic 1, topic 0, spurious)


@dataclass(frozen=True)
class Mixture:
    """Where a text's slot words come from: `own` with probability `fidelity`, else uniformly from `others`."""

    own: dict[str, tuple[str, ...]]
    others: tuple[dict[str, tuple[str, ...]], ...]
    fidelity: float

    def word(self, rng: np.random.Generator, slot: str) -> str:
        lexicon = self.own if rng.random() < self.fidelity else self.others[rng.integers(len(self.others))]
        words = lexicon[slot]
        return words[rng.integers(len(words))]


def mixed_text(rng: np.random.Generator, topic: Mixture, attribute: Mixture, gender: str) -> str:
    """2-4 `FRAMES` with topic slots from `topic`, attribute slots from `attribute`, a subject of `gender` (a noun
    phrase first, then that or a pronoun); half the time one neutral sentence at a random place."""
    pron = PRONOUNS[gender]
    sentences = []
    for i in range(int(rng.integers(2, 5))):
        if i == 0 or rng.random() < 0.5:
            nouns = GENDER_NOUNS[gender]
            subject = f"{DETERMINERS[rng.integers(len(DETERMINERS))]} {nouns[rng.integers(len(nouns))]}"
        else:
            subject = pron["s"]

        def fill(m: re.Match, subject: str = subject) -> str:
            slot = m.group(1)
            if slot in TOPIC_SLOTS:
                return topic.word(rng, slot)
            if slot in ATTRIBUTE_SLOTS:
                return attribute.word(rng, slot)
            return subject if slot == "S" else pron[slot]

        text = _SLOT.sub(fill, FRAMES[rng.integers(len(FRAMES))])
        sentences.append(text[0].upper() + text[1:])
    if rng.random() < 0.5:
        sentences.insert(int(rng.integers(len(sentences) + 1)), NEUTRAL_SENTENCES[rng.integers(len(NEUTRAL_SENTENCES))])
    return " ".join(sentences)


def _background() -> Mixture:
    """Attribute words that say nothing about the class: any value of any attribute, uniformly."""
    values = tuple(lex for attr in ATTRIBUTE_LEXICON.values() for lex in attr.values())
    return Mixture(values[0], values, 0.0)


def hard_scr_set(
    seed: int = 0,
    train_size: int = 4000,
    test_size: int = 1000,
    validation_size: int | None = None,
    pair: tuple[str, str, str] = HARD_SCR_PAIRS[0],
) -> LabelledSet:
    """The harder generated SCR set: target "topic" (pair[0] = 1, pair[1] = 0, each topic slot true to the text's
    topic with probability TOPIC_FIDELITY["scr"], else the other topic's word) and spurious attribute pair[2]
    (its first value = 1, ATTRIBUTE_FIDELITY), subject gender random; SAEBench's quadrant layout."""
    (t1, t0, attr) = pair
    _check_topics((t1, t0), TOPIC_LEXICON, 2)
    if attr not in ATTRIBUTE_LEXICON:
        raise ValueError(f"pair[2] must be an attribute of {sorted(ATTRIBUTE_LEXICON)}, got {attr!r}")
    values = tuple(ATTRIBUTE_LEXICON[attr])  # (label 1, label 0)
    q, q_val, q_test = scr_quadrant_sizes(train_size, test_size, validation_size)
    rng = np.random.default_rng(seed)
    topics = {1: TOPIC_LEXICON[t1], 0: TOPIC_LEXICON[t0]}
    lexicons = {1: ATTRIBUTE_LEXICON[attr][values[0]], 0: ATTRIBUTE_LEXICON[attr][values[1]]}

    def make(t: int, s: int) -> str:
        topic = Mixture(topics[t], (topics[1 - t],), TOPIC_FIDELITY["scr"])
        attribute = Mixture(lexicons[s], (lexicons[1 - s],), ATTRIBUTE_FIDELITY)
        return mixed_text(rng, topic, attribute, GENDERS[int(rng.integers(2))])

    texts, target, spurious, splits = _generated_scr(rng, make, q, q_val, q_test)
    return LabelledSet(
        texts=texts,
        labels={"topic": target, attr: spurious},
        splits=splits,
        class_names={"topic": (t0, t1), attr: (values[1], values[0])},
        roles={"target": "topic", "spurious": attr},
        description={
            "name": f"generated_scr_{t1}_{t0}_{attr}", "source": "generated by vsae.evals.labelled (mixed lexicons)",
            "seed": seed, "pair": list(pair), "topic_fidelity": TOPIC_FIDELITY["scr"],
            "attribute_fidelity": ATTRIBUTE_FIDELITY,
            "quadrant_size": {"train": q, "validation": q_val, "test": q_test},
            "train_correlation": f"topic == {attr} in split 'train' (rho = 1); all other splits balanced",
        },
    )


def hard_tpp_set(
    seed: int = 0,
    train_size: int = 4000,
    test_size: int = 1000,
    validation_size: int | None = None,
    topics: Sequence[str] = TPP_TOPICS,
) -> LabelledSet:
    """The harder generated TPP set: "topic" = index into `topics`, each topic slot true to the text's topic with
    probability TOPIC_FIDELITY["tpp"], else a word of another class; attribute slots background; nuisance "gender"
    balanced. Per class train_size // 2, validation_size // 2, test_size // 2 texts (SAEBench's 2000 / 500)."""
    topics = tuple(topics)
    _check_topics(topics, TOPIC_LEXICON, 2)
    lexicons = [TOPIC_LEXICON[t] for t in topics]
    background = _background()
    mixtures = [Mixture(lex, tuple(o for o in lexicons if o is not lex), TOPIC_FIDELITY["tpp"]) for lex in lexicons]
    rng = np.random.default_rng(seed)
    texts, category, gender, splits, per_class = _tpp_layout(
        rng, lambda c, g: mixed_text(rng, mixtures[c], background, GENDERS[g]), len(topics),
        train_size, test_size, validation_size)
    return LabelledSet(
        texts=texts,
        labels={"topic": category, "gender": gender},
        splits=splits,
        class_names={"topic": topics, "gender": GENDERS},
        roles={"classes": "topic", "nuisance": "gender"},
        description={
            "name": "generated_tpp", "source": "generated by vsae.evals.labelled (mixed lexicons)", "seed": seed,
            "topics": list(topics), "topic_fidelity": TOPIC_FIDELITY["tpp"],
            "per_class": per_class,
        },
    )


# ---------------------------------------------------------------------------------------------------------------
# Real sets (Hugging Face hub)


def _load_hf(name: str) -> tuple[dict[str, np.ndarray | list], dict[str, np.ndarray | list]]:
    """HF `train` and `test` splits of `name` as column dicts; one clear error when the hub cannot serve them."""
    import datasets

    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 (offline, the datasets library raises many types: connection, not found)
        raise LabelledSetError(
            f"cannot load the dataset {name!r}: the Hugging Face hub is unreachable and the dataset is not in the "
            f"local datasets cache ({type(e).__name__}: {e}). Download it where the hub is reachable, or use the "
            f"offline sets (offline_scr_set / offline_tpp_set)"
        ) from e
    return ds["train"].to_dict(), ds["test"].to_dict()


def _quadrant_rows(col1: np.ndarray, col2: np.ndarray, a: Any, b: Any) -> np.ndarray:
    return np.flatnonzero((col1 == a) & (col2 == b))


def _scr_from_columns(
    name: str, train: dict, test: dict, text_col: str, col1: str, col2: str,
    pair_ids: tuple[Any, Any], spurious_ids: tuple[Any, Any], names: dict[str, tuple[str, ...]],
    train_size: int, test_size: int, validation_size: int, seed: int,
) -> LabelledSet:
    """SAEBench's `get_spurious_corr_data` on both splits, plus validation rows from HF train after the train rows."""
    q, q_val, q_test = train_size // 4, validation_size // 4, test_size // 4
    texts: list[str] = []
    target: list[int] = []
    spurious: list[int] = []
    split_rows: dict[str, list[int]] = {"train": [], "train_balanced": [], "validation": [], "test": []}

    def add(source: dict, rows: np.ndarray, t: int, s: int) -> list[int]:
        first = len(texts)
        texts.extend(source[text_col][r] for r in rows)
        target.extend([t] * len(rows))
        spurious.extend([s] * len(rows))
        return list(range(first, len(texts)))

    c1, c2 = np.asarray(train[col1]), np.asarray(train[col2])
    t1, t2 = np.asarray(test[col1]), np.asarray(test[col2])
    for t, s in ((1, 1), (1, 0), (0, 1), (0, 0)):  # (target, spurious): PP, AN, NP, NN
        a, b = pair_ids[1 - t], spurious_ids[1 - s]
        n_train = 2 * q if t == s else q  # the biased set takes 2q from each diagonal quadrant
        rows, test_rows = _quadrant_rows(c1, c2, a, b), _quadrant_rows(t1, t2, a, b)  # dataset order, as SAEBench
        for got, need, split in ((len(rows), n_train + q_val, "train"), (len(test_rows), q_test, "test")):
            if got < need:
                raise LabelledSetError(
                    f"{name}: quadrant ({col1}={a!r}, {col2}={b!r}) has {got} rows in HF {split!r}, fewer than the "
                    f"{need} needed; lower train_size / test_size"
                )
        idx = add(train, rows[:n_train], t, s)
        split_rows["train_balanced"] += idx[:q]
        if t == s:
            split_rows["train"] += idx
        split_rows["validation"] += add(train, rows[n_train : n_train + q_val], t, s)
        split_rows["test"] += add(test, test_rows[:q_test], t, s)
    rng = np.random.default_rng(seed)
    return LabelledSet(
        texts=texts,
        labels={col1: np.array(target), col2: np.array(spurious)},
        splits={k: rng.permutation(np.array(v, dtype=np.int64)) for k, v in split_rows.items()},
        class_names=names,
        roles={"target": col1, "spurious": col2},
        description={"name": name, "source": f"datasets.load_dataset({name!r})", "seed": seed,
                     "quadrant_size": {"train": q, "validation": q_val, "test": q_test}},
    )


def _tpp_from_columns(
    name: str, train: dict, test: dict, text_col: str, col1: str, col2: str, class_ids: Sequence[Any],
    class_names: tuple[str, ...], nuisance: tuple[Any, ...], nuisance_names: tuple[str, ...],
    train_size: int, test_size: int, validation_size: int, seed: int,
) -> LabelledSet:
    """SAEBench's `get_balanced_dataset`: q = size // 4 rows per (class, column-2 value), pandas-sample order."""
    q, q_val, q_test = train_size // 4, validation_size // 4, test_size // 4
    texts: list[str] = []
    category: list[int] = []
    nuis: list[int] = []
    split_rows: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for source, parts in ((train, (("train", q), ("validation", q_val))), (test, (("test", q_test),))):
        c1, c2 = np.asarray(source[col1]), np.asarray(source[col2])
        for c, cid in enumerate(class_ids):
            for g, gid in enumerate(nuisance):
                rows = _quadrant_rows(c1, c2, cid, gid)
                need = sum(n for _, n in parts)
                if len(rows) < need:
                    raise LabelledSetError(
                        f"{name}: ({col1}={cid!r}, {col2}={gid!r}) has {len(rows)} rows, fewer than {need}"
                    )
                # pandas `sample(n, random_state=seed)` draws RandomState(seed).permutation(len)[:n]; a longer
                # draw starts with the same rows, so train matches SAEBench and validation follows it.
                rows = rows[np.random.RandomState(seed).permutation(len(rows))[:need]]
                start = 0
                for part, n in parts:
                    for r in rows[start : start + n]:
                        split_rows[part].append(len(texts))
                        texts.append(source[text_col][r])
                        category.append(c)
                        nuis.append(g)
                    start += n
    rng = np.random.default_rng(seed)
    return LabelledSet(
        texts=texts,
        labels={col1: np.array(category), col2: np.array(nuis)},
        splits={k: rng.permutation(np.array(v, dtype=np.int64)) for k, v in split_rows.items()},
        class_names={col1: class_names, col2: nuisance_names},
        roles={"classes": col1, "nuisance": col2},
        description={"name": name, "source": f"datasets.load_dataset({name!r})", "seed": seed,
                     "per_class": {"train": 2 * q, "validation": 2 * q_val, "test": 2 * q_test}},
    )


def load_bias_in_bios(
    task: str = "scr",
    pair: tuple[str, str] = BIOS_SCR_PAIRS[0],
    classes: Sequence[str] = BIOS_TPP_CLASSES,
    train_size: int = 4000,
    test_size: int = 1000,
    validation_size: int | None = None,
    seed: int = 42,
    hf_splits: tuple[dict, dict] | None = None,
) -> LabelledSet:
    """`LabHC/bias_in_bios` as SAEBench uses it: task "scr" (one profession `pair`, gender spurious, male = 1)
    or "tpp" (`classes`, gender-balanced). Raises `LabelledSetError` when the hub is unreachable.
    `hf_splits`: the dataset's (train, test) columns when already loaded (several pairs from one load)."""
    validation_size = test_size if validation_size is None else validation_size
    train, test = hf_splits or _load_hf(BIAS_IN_BIOS)
    if task == "scr":
        ids = tuple(PROFESSIONS.index(p) for p in pair)
        names = {"profession": (pair[1], pair[0]), "gender": GENDERS}
        # bias_in_bios stores gender 0 = male, 1 = female; SAEBench's positive (label 1) is male.
        data = _scr_from_columns(BIAS_IN_BIOS, train, test, "hard_text", "profession", "gender", ids, (0, 1),
                                 names, train_size, test_size, validation_size, seed)
        return _named(data, f"{BIAS_IN_BIOS}_scr_{pair[0]}_{pair[1]}", pair=list(pair))
    if task == "tpp":
        ids = [PROFESSIONS.index(c) for c in classes]
        data = _tpp_from_columns(BIAS_IN_BIOS, train, test, "hard_text", "profession", "gender", ids,
                                 tuple(classes), (0, 1), ("male", "female"), train_size, test_size,
                                 validation_size, seed)
        return _named(data, f"{BIAS_IN_BIOS}_tpp", classes=list(classes))
    raise ValueError(f"task must be 'scr' or 'tpp', got {task!r}")


def load_amazon_reviews(
    task: str = "tpp",
    pair: tuple[str, str] = AMAZON_SCR_PAIRS[0],
    classes: Sequence[str] = AMAZON_TPP_CLASSES,
    train_size: int = 4000,
    test_size: int = 1000,
    validation_size: int | None = None,
    seed: int = 42,
    hf_splits: tuple[dict, dict] | None = None,
) -> LabelledSet:
    """`canrager/amazon_reviews_mcauley_1and5` as SAEBench uses it: task "tpp" (`classes`, rating-balanced; the
    default, as DESIGN.md pairs Amazon with TPP) or "scr" (one category `pair`, rating spurious with 1.0 = label 1).
    Raises `LabelledSetError` when the hub is unreachable. `hf_splits` as in `load_bias_in_bios`."""
    validation_size = test_size if validation_size is None else validation_size
    train, test = hf_splits or _load_hf(AMAZON_REVIEWS)
    if task == "scr":
        ids = tuple(AMAZON_CATEGORIES.index(c) for c in pair)
        names = {"category": (pair[1], pair[0]), "rating": ("5.0", "1.0")}
        data = _scr_from_columns(AMAZON_REVIEWS, train, test, "text", "category", "rating", ids, (1.0, 5.0),
                                 names, train_size, test_size, validation_size, seed)
        return _named(data, f"{AMAZON_REVIEWS}_scr_{pair[0]}_{pair[1]}", pair=list(pair))
    if task == "tpp":
        ids = [AMAZON_CATEGORIES.index(c) for c in classes]
        data = _tpp_from_columns(AMAZON_REVIEWS, train, test, "text", "category", "rating", ids, tuple(classes),
                                 (1.0, 5.0), ("1.0", "5.0"), train_size, test_size, validation_size, seed)
        return _named(data, f"{AMAZON_REVIEWS}_tpp", classes=list(classes))
    raise ValueError(f"task must be 'scr' or 'tpp', got {task!r}")


def _named(data: LabelledSet, name: str, **extra: Any) -> LabelledSet:
    """`data` with a set name unique among the real sets (SAEBench's run name) and what picked its rows."""
    data.description = {**data.description, "name": name, "dataset": data.description["name"], **extra}
    return data


# ---------------------------------------------------------------------------------------------------------------
# The sets an evaluation averages over


def real_scr_sets(train_size: int = 4000, test_size: int = 1000, validation_size: int | None = None,
                  seed: int = 42) -> list[LabelledSet]:
    """SAEBench's eight SCR runs: the four Bias in Bios profession pairs (gender spurious) and the four Amazon
    category pairs (rating spurious), each dataset loaded once. SAEBench defines SCR pairs only on Bias in Bios
    class set 1 (its sets 2 and 3 are sparse-probing class sets). Raises `LabelledSetError` naming the hub when
    it is unreachable."""
    sizes = {"train_size": train_size, "test_size": test_size, "validation_size": validation_size, "seed": seed}
    bios, amazon = _load_hf(BIAS_IN_BIOS), _load_hf(AMAZON_REVIEWS)
    return ([load_bias_in_bios("scr", pair=p, hf_splits=bios, **sizes) for p in BIOS_SCR_PAIRS]
            + [load_amazon_reviews("scr", pair=p, hf_splits=amazon, **sizes) for p in AMAZON_SCR_PAIRS])


def real_tpp_sets(train_size: int = 4000, test_size: int = 1000, validation_size: int | None = None,
                  seed: int = 42) -> list[LabelledSet]:
    """SAEBench's two TPP runs: Bias in Bios class set 1 (five professions, gender-balanced) and Amazon (five
    categories, rating-balanced). Raises `LabelledSetError` naming the hub when it is unreachable."""
    sizes = {"train_size": train_size, "test_size": test_size, "validation_size": validation_size, "seed": seed}
    return [load_bias_in_bios("tpp", **sizes), load_amazon_reviews("tpp", **sizes)]


def offline_scr_sets(seed: int = 0, train_size: int = 4000, test_size: int = 1000,
                     validation_size: int | None = None) -> list[LabelledSet]:
    """The offline SCR pairs to average over: the Shakespeare comedy-vs-prose pair (`evals.shakespeare_sets`; left
    out with a warning when the corpus cannot be had) and the two harder generated pairs (`HARD_SCR_PAIRS`)."""
    sizes = {"seed": seed, "train_size": train_size, "test_size": test_size, "validation_size": validation_size}
    from evals import shakespeare_sets  # it builds on this module

    return (_optional_corpus_set(shakespeare_sets.shakespeare_scr_set, sizes)
            + [hard_scr_set(pair=pair, **sizes) for pair in HARD_SCR_PAIRS])


def offline_tpp_sets(seed: int = 0, train_size: int = 4000, test_size: int = 1000,
                     validation_size: int | None = None) -> list[LabelledSet]:
    """The offline TPP sets: the Shakespeare genre set (three Folio genres; left out with a warning when the
    corpus cannot be had) and the harder generated set (five topics)."""
    sizes = {"seed": seed, "train_size": train_size, "test_size": test_size, "validation_size": validation_size}
    from evals import shakespeare_sets

    return _optional_corpus_set(shakespeare_sets.shakespeare_tpp_set, sizes) + [hard_tpp_set(**sizes)]


def _optional_corpus_set(build: Callable[..., LabelledSet], sizes: dict[str, Any]) -> list[LabelledSet]:
    """[build(**sizes)], or [] with a warning when the Shakespeare corpus is neither cached nor downloadable."""
    from evals.shakespeare_sets import CorpusUnavailableError

    try:
        return [build(**sizes)]
    except CorpusUnavailableError as e:
        warnings.warn(f"{e}; the offline scores average over the generated sets only", stacklevel=3)
        return []
