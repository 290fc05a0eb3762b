from __future__ import annotations

from collections import Counter

import datasets
import pytest

from peft_fed.data.hellaswag import HELLASWAG_FEATURES
from peft_fed.data.wordnet import (
    WORDNET_LEXNAMES,
    build_wordnet_define,
    build_wordnet_mc,
    build_wordnet_topic,
    load_wordnet,
    parse_data_line,
    wordnet_available,
)

requires_wordnet = pytest.mark.skipif(
    not wordnet_available(), reason="WordNet database (wordnet-base) not installed"
)

BREATHE = (
    "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 021 * 00005041 v 0000 * 00004227 v 0000 "
    "+ 03110323 a 0301 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs; "
    '"I can breathe better when the air is clean"; "The patient is respiring"  '
)


def test_parse_data_line():
    synset = parse_data_line(BREATHE)
    assert synset.offset == 1740 and synset.pos == "verb"
    assert synset.lexname == "verb.body" == WORDNET_LEXNAMES[29]
    assert synset.lemmas == ("breathe", "take a breath", "respire", "suspire")
    assert synset.definition == "draw air into, and expel out of, the lungs"
    assert synset.examples == ("I can breathe better when the air is clean", "The patient is respiring")
    assert synset.synset_id == "wordnet-verb-00001740"


def test_parse_adjective_marker_and_unclosed_quote():
    line = (
        "00006885 00 s 02 assimilating(a) 0 assimilative 0 000 | capable of taking gas into a solution; "
        '"an assimilative substance  '
    )
    synset = parse_data_line(line)
    assert synset.lemmas == ("assimilating", "assimilative")
    assert synset.examples == ("an assimilative substance",)


@requires_wordnet
def test_load_wordnet_counts():
    nouns = load_wordnet("noun")
    assert len(nouns) == 82115  # WordNet 3.0
    assert all(s.pos == "noun" and s.lexname.startswith("noun.") for s in nouns[:1000])
    with pytest.raises(ValueError, match="Unknown part"):
        load_wordnet("pronoun")


@pytest.fixture(scope="module")
def topic():
    return build_wordnet_topic(num_categories=4, samples_per_category=25, seed=1)


@requires_wordnet
class TestTopic:
    def test_schema_and_labels(self, topic):
        train, evaluation = topic["train"], topic["validation"]
        assert train.column_names == ["text", "label", "category", "lemma", "synset_id"]
        names = train.features["label"].names
        assert isinstance(train.features["label"], datasets.ClassLabel) and len(names) == 4
        assert names == ["noun.artifact", "noun.person", "noun.plant", "noun.act"]  # the most frequent
        for split in (train, evaluation):
            assert all(0 <= y < 4 for y in split["label"])
            assert all(names[y] == c for y, c in zip(split["label"], split["category"], strict=True))
        # Balanced: 25 per category, 5 (20 %) of each held out.
        assert Counter(train["label"]) == {i: 20 for i in range(4)}
        assert Counter(evaluation["label"]) == {i: 5 for i in range(4)}
        assert not set(train["synset_id"]) & set(evaluation["synset_id"])
        assert all(len(t.split()) >= 3 for t in train["text"])

    def test_deterministic(self, topic):
        again = build_wordnet_topic(num_categories=4, samples_per_category=25, seed=1)
        other = build_wordnet_topic(num_categories=4, samples_per_category=25, seed=2)
        assert list(again["train"]["synset_id"]) == list(topic["train"]["synset_id"])
        assert list(other["train"]["synset_id"]) != list(topic["train"]["synset_id"])

    def test_explicit_categories_and_options(self):
        data = build_wordnet_topic(
            categories=["noun.food", "noun.animal"],
            samples_per_category=6,
            include_lemma=True,
            include_examples=False,
        )
        assert data["train"].features["label"].names == ["noun.food", "noun.animal"]
        row = data["train"][0]
        assert row["text"].startswith(row["lemma"] + ": ")
        with pytest.raises(ValueError, match="Unknown or empty WordNet categories"):
            build_wordnet_topic(categories=["verb.motion"], pos="noun")


@pytest.fixture(scope="module")
def mc():
    return build_wordnet_mc(num_categories=5, samples_per_category=20, seed=0)


@requires_wordnet
class TestMultipleChoice:
    def test_schema(self, mc):
        for split_name, split in (("train", mc["train"]), ("val", mc["validation"])):
            assert split.features == HELLASWAG_FEATURES
            assert set(split["split"]) == {split_name}
            for row in split:
                assert len(row["endings"]) == 4 and 0 <= row["label"] < 4
                assert row["ctx"] == f"{row['ctx_a']} {row['ctx_b']}"
        assert len(mc["train"]) == 80 and len(mc["validation"]) == 20
        inds = list(mc["train"]["ind"]) + list(mc["validation"]["ind"])
        assert len(set(inds)) == len(inds)

    def test_answer_and_distractors(self, mc):
        synsets = load_wordnet(("noun", "verb"))
        by_id = {s.synset_id: s for s in synsets}
        categories_of = {}
        for s in synsets:
            categories_of.setdefault(s.definition.rstrip("."), set()).add(s.lexname)
        for row in list(mc["train"]) + list(mc["validation"]):
            synset = by_id[row["source_id"]]
            endings = row["endings"]
            assert endings[row["label"]].rstrip(".") == synset.definition.rstrip(".")
            assert row["activity_label"] == synset.lexname
            assert f'"{synset.lemma}"' in row["ctx"]
            assert len(set(endings)) == 4  # distinct from the answer and each other
            for j, ending in enumerate(endings):
                if j != row["label"]:
                    # every distractor is the definition of a synset of the same category
                    assert synset.lexname in categories_of[ending.rstrip(".")]

    def test_distractors_are_not_other_senses(self, mc):
        synsets = load_wordnet(("noun", "verb"))
        by_id = {s.synset_id: s for s in synsets}
        senses = {}
        for s in synsets:
            for lemma in s.lemmas:
                senses.setdefault(lemma.lower(), set()).add(s.definition.rstrip("."))
        for row in mc["train"]:
            lemma = by_id[row["source_id"]].lemma.lower()
            others = [e.rstrip(".") for j, e in enumerate(row["endings"]) if j != row["label"]]
            assert not set(others) & senses[lemma]

    def test_labels_spread_and_deterministic(self, mc):
        assert len(set(mc["train"]["label"])) == 4
        again = build_wordnet_mc(num_categories=5, samples_per_category=20, seed=0)
        assert again["train"].to_list() == mc["train"].to_list()
        other = build_wordnet_mc(num_categories=5, samples_per_category=20, seed=1)
        assert other["train"].to_list() != mc["train"].to_list()


@requires_wordnet
def test_define():
    data = build_wordnet_define(num_categories=3, samples_per_category=10, seed=0)
    train = data["train"]
    assert train.column_names == ["instruction", "response", "category", "lemma", "synset_id"]
    assert len(train) == 24 and len(data["validation"]) == 6
    for row in train:
        assert row["instruction"].startswith("Define the ") and f'"{row["lemma"]}"' in row["instruction"]
        assert not row["response"][0].islower() and row["response"].endswith(".")
    again = build_wordnet_define(num_categories=3, samples_per_category=10, seed=0)
    assert again["train"].to_list() == train.to_list()
