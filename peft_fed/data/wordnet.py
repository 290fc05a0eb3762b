"""Offline datasets built from the WordNet 3.0 database files.

WordNet ships with Debian (`wordnet-base`, files under `/usr/share/wordnet`) and on most Linux distributions, so
these datasets give a real, non-synthetic text corpus that needs no network access. Three datasets are built:

* `wordnet_topic` (sequence classification): text = gloss definition (+ examples), label = lexicographer category
  (`noun.animal`, `noun.artifact`, ...), balanced over the most frequent categories.
* `wordnet_mc` (4-way multiple choice, HellaSwag schema): context `The noun "dog" means`, endings = the true
  definition and 3 distractor definitions from the same lexicographer category; `activity_label` = category.
* `wordnet_define` (instruction tuning): `Define the noun "dog".` -> the definition.

The database is read directly (no nltk dependency). The format is documented in `wndb(5WN)`: one synset per line,
`offset lex_filenum ss_type w_cnt word lex_id ... p_cnt pointers ... | gloss`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

logger = logging.getLogger(__name__)

# `lexnames` is not part of every packaging of the database (Debian's wordnet-base lacks it), so the WordNet 3.0
# table is embedded; a `lexnames` file found next to the data files takes precedence.
WORDNET_LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip

POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}
_SS_TYPE_TO_POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
DEFAULT_WORDNET_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/WordNet-3.0/dict")

# Lemmas of adjectives carry a syntactic marker such as `(a)`, `(p)` or `(ip)`.
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class Synset:
    """One WordNet synset.

    Args:
        offset (`int`): byte offset of the synset in its data file (its identifier together with `pos`).
        pos (`str`): part of speech, one of `noun`, `verb`, `adj`, `adv`.
        lexname (`str`): lexicographer category, e.g. `noun.animal`.
        lemmas (`tuple[str, ...]`): the synonyms in the synset, with underscores replaced by spaces.
        definition (`str`): the gloss definition (without the examples).
        examples (`tuple[str, ...]`): the quoted usage examples of the gloss.
    """

    offset: int
    pos: str
    lexname: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]

    @property
    def synset_id(self) -> str:
        return f"wordnet-{self.pos}-{self.offset:08d}"

    @property
    def lemma(self) -> str:
        """The first (most representative) lemma of the synset."""
        return self.lemmas[0]


def find_wordnet_dir(wordnet_dir: str | os.PathLike | None = None) -> Path:
    """Locate the WordNet database folder (the one holding `data.noun`).

    Looks at, in order: the given folder, `$WNSEARCHDIR` and `$WNHOME/dict` (the variables the WordNet tools use),
    then the usual install locations.
    """
    candidates: list[Path] = []
    if wordnet_dir is not None:
        candidates.append(Path(wordnet_dir))
    else:
        if os.environ.get("WNSEARCHDIR"):
            candidates.append(Path(os.environ["WNSEARCHDIR"]))
        if os.environ.get("WNHOME"):
            candidates.append(Path(os.environ["WNHOME"]) / "dict")
        candidates.extend(Path(d) for d in DEFAULT_WORDNET_DIRS)
    for candidate in candidates:
        if (candidate / "data.noun").is_file():
            return candidate
    raise FileNotFoundError(
        f"No WordNet database (data.noun) found in {[str(c) for c in candidates]}. Install the WordNet 3.0 "
        "database (Debian/Ubuntu: `apt-get install wordnet-base`) or point `wordnet_dir` / $WNSEARCHDIR at it."
    )


def wordnet_available(wordnet_dir: str | os.PathLike | None = None) -> bool:
    """Whether a WordNet database can be found (see `find_wordnet_dir`)."""
    try:
        find_wordnet_dir(wordnet_dir)
    except FileNotFoundError:
        return False
    return True


def _read_lexnames(wordnet_dir: Path) -> tuple[str, ...]:
    path = wordnet_dir / "lexnames"
    if not path.is_file():
        return WORDNET_LEXNAMES
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2:
            names[int(fields[0])] = fields[1]
    return tuple(names[i] for i in sorted(names))


def _parse_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """Split a gloss into its definition and its quoted examples.

    Examples follow the definition as `; "example one"; "example two"`; a few closing quotes are missing in the
    database, so the split is on the `; "` separators rather than on balanced quotes.
    """
    gloss = gloss.strip()
    start = gloss.find('; "')
    if start < 0:
        if gloss.startswith('"'):  # a handful of glosses consist of examples only
            return "", tuple(e for e in (gloss.strip('"').strip(),) if e)
        return gloss.rstrip(";").strip(), ()
    definition = gloss[:start].rstrip(";").strip()
    rest = gloss[start + 3 :]
    examples = []
    for part in re.split(r'"?\s*;\s*"', rest):
        part = part.strip().strip('"').strip()
        if part:
            examples.append(part)
    return definition, tuple(examples)


def _clean_lemma(word: str) -> str:
    return _ADJ_MARKER.sub("", word).replace("_", " ")


def parse_data_line(line: str, lexnames: Sequence[str] = WORDNET_LEXNAMES) -> Synset:
    """Parse one synset line of a `data.<pos>` file."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset = int(fields[0])
    lex_filenum = int(fields[1])
    pos = _SS_TYPE_TO_POS[fields[2]]
    word_count = int(fields[3], 16)
    lemmas = tuple(_clean_lemma(fields[4 + 2 * i]) for i in range(word_count))
    definition, examples = _parse_gloss(gloss)
    return Synset(
        offset=offset,
        pos=pos,
        lexname=lexnames[lex_filenum],
        lemmas=lemmas,
        definition=definition,
        examples=examples,
    )


@functools.lru_cache(maxsize=16)
def _load_pos(wordnet_dir: Path, pos: str) -> tuple[Synset, ...]:
    lexnames = _read_lexnames(wordnet_dir)
    path = wordnet_dir / POS_FILES[pos]
    synsets = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            # The file starts with a license header whose lines begin with two spaces.
            if line.startswith("  ") or not line.strip():
                continue
            synsets.append(parse_data_line(line.rstrip("\n"), lexnames))
    return tuple(synsets)


def load_wordnet(
    pos: str | Sequence[str] = ("noun", "verb", "adj", "adv"), wordnet_dir: str | os.PathLike | None = None
) -> list[Synset]:
    """Read the synsets of the given parts of speech (parsed once per process, then cached)."""
    pos_list = [pos] if isinstance(pos, str) else list(pos)
    unknown = [p for p in pos_list if p not in POS_FILES]
    if unknown:
        raise ValueError(f"Unknown part(s) of speech {unknown}; choose from {list(POS_FILES)}.")
    root = find_wordnet_dir(wordnet_dir).resolve()
    out: list[Synset] = []
    for p in pos_list:
        out.extend(_load_pos(root, p))
    return out


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


HELLASWAG_FEATURES = datasets.Features(
    {
        "ind": datasets.Value("int64"),
        "activity_label": datasets.Value("string"),
        "ctx_a": datasets.Value("string"),
        "ctx_b": datasets.Value("string"),
        "ctx": datasets.Value("string"),
        "endings": datasets.Sequence(datasets.Value("string")),
        "source_id": datasets.Value("string"),
        "split": datasets.Value("string"),
        "split_type": datasets.Value("string"),
        "label": datasets.Value("int64"),
    }
)
"""Normalised HellaSwag schema: the Hub columns of `Rowan/hellaswag`, with `label` as an integer."""


def _lowered(lemmas: Sequence[str]) -> set[str]:
    return {lemma.lower() for lemma in lemmas}


def _mentions(text: str, lemma: str) -> bool:
    """Whether `text` contains the lemma, or one of the longer words (4+ letters) of a multi-word lemma."""
    lemma_words = _WORD.findall(lemma.lower())
    words = [w for w in lemma_words if len(w) >= 4] or lemma_words
    text_words = set(_WORD.findall(text.lower()))
    return any(w in text_words for w in words)


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
