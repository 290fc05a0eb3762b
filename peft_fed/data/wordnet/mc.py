"""`wordnet_mc` (4-way multiple choice, HellaSwag schema): context `The noun "dog" means`, endings = the true
definition and 3 distractor definitions from the same lexicographer category; `activity_label` = category."""

from __future__ import annotations

import os
from collections.abc import Sequence

import datasets
import numpy as np

from ..hellaswag import HELLASWAG_FEATURES
from .sampling import _lowered, _mentions, _sample_balanced, _sentence, _stratified_split, _usable_by_category


def build_wordnet_mc(
    *,
    num_categories: int | None = 16,
    categories: Sequence[str] | None = None,
    samples_per_category: int = 150,
    pos: str | Sequence[str] = ("noun", "verb"),
    num_choices: int = 4,
    eval_fraction: float = 0.2,
    seed: int = 0,
    wordnet_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict:
    """A HellaSwag-shaped multiple-choice task: pick the definition of a word among same-category distractors.

    Each item has `ctx = 'The <pos> "<lemma>" means'` (`ctx_a = 'The <pos> "<lemma>"'`, `ctx_b = "means"`) and
    `num_choices` endings: the synset's definition and `num_choices - 1` definitions of other synsets drawn from the
    same lexicographer category. Synsets whose definition contains their own lemma are not used as questions (and
    not as distractors mentioning the question's lemma): they would give the answer away. Drawing distractors from the same category removes the easy topical cue (an
    animal word vs. a food definition), so the model has to know the word; distractors never belong to a synset
    that also contains the lemma (that would be another correct sense) and are distinct from the answer and each
    other. The answer position is drawn uniformly by `seed`.

    `activity_label` is the category (the natural non-IID id, like HellaSwag's activity labels), `split` is
    `train`/`val`, `split_type` is `indomain` (all categories are in both splits), `source_id` the synset id.

    Args:
        num_categories / categories / samples_per_category / pos / eval_fraction / seed / wordnet_dir:
            as in `build_wordnet_topic` (one item per sampled synset).
        num_choices: number of endings per item (HellaSwag: 4).

    Returns:
        `DatasetDict` with `train` and `validation`, features `HELLASWAG_FEATURES`.
    """
    if num_choices < 2:
        raise ValueError(f"num_choices must be at least 2, got {num_choices}.")
    pos_list = [pos] if isinstance(pos, str) else list(pos)
    rng = np.random.default_rng(seed)
    chosen, by_category = _usable_by_category(pos_list, wordnet_dir, num_categories, categories)
    too_small = {c: len(v) for c, v in by_category.items() if len(v) < num_choices + 1}
    if too_small:
        raise ValueError(
            f"Categories {too_small} have too few synsets to draw {num_choices - 1} distractors."
        )
    # A definition that names its own word ("a battle ... landed at Inchon") gives the answer away.
    _, questions = _usable_by_category(pos_list, wordnet_dir, None, chosen, exclude_self_mentions=True)
    sampled = _sample_balanced(questions, chosen, samples_per_category, rng)
    train, evaluation = _stratified_split(sampled, eval_fraction, rng)

    ind = 0
    tables = {}
    for split_name, items in (("train", train), ("val", evaluation)):
        rows: dict[str, list] = {name: [] for name in HELLASWAG_FEATURES}
        for category, synset in items:
            pool = by_category[category]
            answer = synset.definition
            lemma = synset.lemma.lower()
            distractors: list[str] = []
            # Rejection sampling: categories hold hundreds to thousands of synsets, so this ends fast.
            while len(distractors) < num_choices - 1:
                other = pool[int(rng.integers(len(pool)))]
                if (
                    other.definition == answer
                    or other.definition in distractors
                    or lemma in _lowered(other.lemmas)
                    or _mentions(other.definition, lemma)
                ):
                    continue
                distractors.append(other.definition)
            label = int(rng.integers(num_choices))
            endings = [_sentence(d) for d in distractors]
            endings.insert(label, _sentence(answer))
            ctx_a = f'The {synset.pos} "{synset.lemma}"'
            rows["ind"].append(ind)
            rows["activity_label"].append(category)
            rows["ctx_a"].append(ctx_a)
            rows["ctx_b"].append("means")
            rows["ctx"].append(f"{ctx_a} means")
            rows["endings"].append(endings)
            rows["source_id"].append(synset.synset_id)
            rows["split"].append(split_name)
            rows["split_type"].append("indomain")
            rows["label"].append(label)
            ind += 1
        tables[split_name] = datasets.Dataset.from_dict(rows, features=HELLASWAG_FEATURES)
    return datasets.DatasetDict({"train": tables["train"], "validation": tables["val"]})
