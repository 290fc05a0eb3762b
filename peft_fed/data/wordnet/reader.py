"""Reader of the WordNet 3.0 database files (no nltk dependency).

WordNet ships with Debian (`wordnet-base`, files under `/usr/share/wordnet`) and on most Linux distributions. The
format is documented in `wndb(5WN)`: one synset per line,
`offset lex_filenum ss_type w_cnt word lex_id ... p_cnt pointers ... | gloss`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
