"""`wordnet_topic` (sequence classification): text = gloss definition (+ examples), label = lexicographer category
(`noun.animal`, `noun.artifact`, ...), balanced over the most frequent categories."""

from __future__ import annotations

import os
from collections.abc import Sequence

import datasets
import numpy as np

from .reader import Synset
from .sampling import _sample_balanced, _sentence, _stratified_split, _usable_by_category


def build_wordnet_topic(
    *,
    num_categories: int | None = 10,
    categories: Sequence[str] | None = None,
    samples_per_category: int = 300,
    pos: str | Sequence[str] = "noun",
    include_lemma: bool = False,
    include_examples: bool = True,
    eval_fraction: float = 0.2,
    seed: int = 0,
    wordnet_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict:
    """Topic classification of WordNet glosses into lexicographer categories.

    Args:
        num_categories: keep the `num_categories` most frequent categories of `pos` (ignored if `categories`).
        categories: explicit list of categories (e.g. `["noun.animal", "noun.food"]`); its order fixes label ids.
        samples_per_category: synsets drawn per category (balanced classes); fewer if a category is smaller.
        pos: part(s) of speech whose synsets are used; nouns give the cleanest topical categories.
        include_lemma: prefix the text with `"<lemma>: "` (makes the task easier: the word itself is a strong cue).
        include_examples: append the usage examples of the gloss to the definition.
        eval_fraction: share of each category held out for the `validation` split (stratified).
        seed: seeds category sampling, the split and the row order.
        wordnet_dir: folder of the WordNet database (see `find_wordnet_dir`).

    Returns:
        `DatasetDict` with `train` and `validation`; columns `text`, `label` (a `ClassLabel` whose names are the
        categories), `category`, `lemma`, `synset_id`.
    """
    pos_list = [pos] if isinstance(pos, str) else list(pos)
    rng = np.random.default_rng(seed)
    chosen, by_category = _usable_by_category(pos_list, wordnet_dir, num_categories, categories)
    sampled = _sample_balanced(by_category, chosen, samples_per_category, rng)
    train, evaluation = _stratified_split(sampled, eval_fraction, rng)
    label_of = {c: i for i, c in enumerate(chosen)}

    def rows(items: list[tuple[str, Synset]]) -> dict[str, list]:
        out: dict[str, list] = {"text": [], "label": [], "category": [], "lemma": [], "synset_id": []}
        for c, s in items:
            text = _sentence(s.definition)
            if include_examples and s.examples:
                text += " " + " ".join(_sentence(e) for e in s.examples)
            if include_lemma:
                text = f"{s.lemma}: {text}"
            out["text"].append(text)
            out["label"].append(label_of[c])
            out["category"].append(c)
            out["lemma"].append(s.lemma)
            out["synset_id"].append(s.synset_id)
        return out

    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(chosen)),
            "category": datasets.Value("string"),
            "lemma": datasets.Value("string"),
            "synset_id": datasets.Value("string"),
        }
    )
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows(train), features=features),
            "validation": datasets.Dataset.from_dict(rows(evaluation), features=features),
        }
    )
