"""Choosing WordNet synsets for the dataset builders: usable definitions, categories, balanced samples, splits."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .reader import Synset, find_wordnet_dir, load_wordnet

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z0-9']+")


def category_counts(
    pos: str | Sequence[str] = "noun", wordnet_dir: str | os.PathLike | None = None
) -> Counter:
    """Number of usable synsets (with a definition of at least 3 words) per lexicographer category."""
    return Counter(s.lexname for s in load_wordnet(pos, wordnet_dir) if _usable(s))


def _usable(synset: Synset, min_words: int = 3) -> bool:
    return len(synset.definition.split()) >= min_words


def _select_categories(
    synsets: Sequence[Synset], num_categories: int | None, categories: Sequence[str] | None
) -> list[str]:
    counts = Counter(s.lexname for s in synsets)
    if categories is not None:
        unknown = [c for c in categories if c not in counts]
        if unknown:
            raise ValueError(
                f"Unknown or empty WordNet categories {unknown}; available: {sorted(counts)} "
                "(restrict the `pos` argument accordingly)."
            )
        return list(categories)
    # noun.Tops holds the ~50 unique beginners of the hierarchy: never a sensible class.
    ranked = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c != "noun.Tops"]
    if num_categories is None:
        return ranked
    if not 2 <= num_categories <= len(ranked):
        raise ValueError(
            f"num_categories must be in [2, {len(ranked)}] for these parts of speech, got {num_categories}."
        )
    return ranked[:num_categories]


@functools.lru_cache(maxsize=8)
def _usable_synsets(pos: tuple[str, ...], root: Path) -> tuple[Synset, ...]:
    return tuple(s for s in load_wordnet(pos, root) if _usable(s))


@functools.lru_cache(maxsize=64)
def _category_pool(
    pos: tuple[str, ...], root: Path, category: str, exclude_self_mentions: bool
) -> tuple[Synset, ...]:
    """Usable synsets of one category with distinct definitions (optionally without self-mentioning ones)."""
    pool, seen = [], set()
    for s in _usable_synsets(pos, root):
        # Identical definitions within a category would make a classification/MC item ambiguous: keep the first.
        if s.lexname == category and s.definition not in seen:
            seen.add(s.definition)
            if not (exclude_self_mentions and _mentions(s.definition, s.lemma)):
                pool.append(s)
    return tuple(pool)


def _usable_by_category(
    pos: Sequence[str],
    wordnet_dir,
    num_categories: int | None,
    categories: Sequence[str] | None,
    exclude_self_mentions: bool = False,
) -> tuple[list[str], dict[str, tuple[Synset, ...]]]:
    # Pools are cached: builders are called repeatedly (tests, sweeps) with the same categories.
    root = find_wordnet_dir(wordnet_dir).resolve()
    pos = tuple(pos)
    chosen = _select_categories(_usable_synsets(pos, root), num_categories, categories)
    return chosen, {c: _category_pool(pos, root, c, exclude_self_mentions) for c in chosen}


def _sample_balanced(
    by_category: dict[str, list[Synset]],
    categories: Sequence[str],
    per_category: int,
    rng: np.random.Generator,
) -> dict[str, list[Synset]]:
    if per_category < 2:
        raise ValueError(
            f"samples_per_category must be at least 2 (one train and one eval item), got {per_category}."
        )
    sampled = {}
    short = {}
    for c in categories:
        pool = by_category[c]
        n = min(per_category, len(pool))
        if n < per_category:
            short[c] = len(pool)
        idx = rng.permutation(len(pool))[:n]
        sampled[c] = [pool[i] for i in sorted(idx)]
    if short:
        logger.warning(
            "WordNet categories with fewer usable synsets than samples_per_category=%d (all taken, classes are "
            "unbalanced): %s",
            per_category,
            short,
        )
    return sampled


def _stratified_split(
    sampled: dict[str, list[Synset]], eval_fraction: float, rng: np.random.Generator
) -> tuple[list[tuple[str, Synset]], list[tuple[str, Synset]]]:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
    train, evaluation = [], []
    for c, items in sampled.items():
        order = rng.permutation(len(items))
        n_eval = min(len(items) - 1, max(1, round(eval_fraction * len(items))))
        evaluation.extend((c, items[i]) for i in order[:n_eval])
        train.extend((c, items[i]) for i in order[n_eval:])
    # Interleave categories so that contiguous shards (e.g. IID partitioning without shuffling) stay mixed.
    train = [train[i] for i in rng.permutation(len(train))]
    evaluation = [evaluation[i] for i in rng.permutation(len(evaluation))]
    return train, evaluation


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _lowered(lemmas: Sequence[str]) -> set[str]:
    return {lemma.lower() for lemma in lemmas}


def _mentions(text: str, lemma: str) -> bool:
    """Whether `text` contains the lemma, or one of the longer words (4+ letters) of a multi-word lemma."""
    lemma_words = _WORD.findall(lemma.lower())
    words = [w for w in lemma_words if len(w) >= 4] or lemma_words
    text_words = set(_WORD.findall(text.lower()))
    return any(w in text_words for w in words)
