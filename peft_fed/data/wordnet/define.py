"""`wordnet_define` (instruction tuning): `Define the noun "dog".` -> the definition."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import datasets
import numpy as np

from .reader import Synset, load_wordnet
from .sampling import _sample_balanced, _sentence, _stratified_split, _usable_by_category


def build_wordnet_define(
    *,
    num_categories: int | None = 10,
    categories: Sequence[str] | None = None,
    samples_per_category: int = 100,
    pos: str | Sequence[str] = ("noun", "verb"),
    monosemous_only: bool = True,
    include_examples: bool = False,
    eval_fraction: float = 0.2,
    seed: int = 0,
    wordnet_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict:
    """A small instruction-tuning set: `Define the <pos> "<lemma>".` -> `<Definition>.`

    Args:
        monosemous_only: keep only lemmas with a single sense in their part of speech, so that the instruction has
            one correct answer (a polysemous word like "bank" would have several).
        include_examples: append `Example: "<first example>"` to the response when the gloss has one.
        Others: as in `build_wordnet_topic`.

    Returns:
        `DatasetDict` with `train` and `validation`; columns `instruction`, `response`, `category` (natural id),
        `lemma`, `synset_id`.
    """
    pos_list = [pos] if isinstance(pos, str) else list(pos)
    rng = np.random.default_rng(seed)
    chosen, by_category = _usable_by_category(pos_list, wordnet_dir, num_categories, categories)
    if monosemous_only:
        senses = Counter(
            (s.pos, lemma.lower()) for s in load_wordnet(pos_list, wordnet_dir) for lemma in s.lemmas
        )
        by_category = {
            c: [s for s in items if senses[(s.pos, s.lemma.lower())] == 1] for c, items in by_category.items()
        }
    sampled = _sample_balanced(by_category, chosen, samples_per_category, rng)
    train, evaluation = _stratified_split(sampled, eval_fraction, rng)

    def rows(items: list[tuple[str, Synset]]) -> dict[str, list]:
        out: dict[str, list] = {
            "instruction": [],
            "response": [],
            "category": [],
            "lemma": [],
            "synset_id": [],
        }
        for c, s in items:
            response = _sentence(s.definition[:1].upper() + s.definition[1:])
            if include_examples and s.examples:
                response += f' Example: "{s.examples[0]}"'
            out["instruction"].append(f'Define the {s.pos} "{s.lemma}".')
            out["response"].append(response)
            out["category"].append(c)
            out["lemma"].append(s.lemma)
            out["synset_id"].append(s.synset_id)
        return out

    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows(train)),
            "validation": datasets.Dataset.from_dict(rows(evaluation)),
        }
    )
