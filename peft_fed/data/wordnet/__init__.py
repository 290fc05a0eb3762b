"""Offline datasets built from the WordNet 3.0 database files.

WordNet ships with Debian (`wordnet-base`, files under `/usr/share/wordnet`) and on most Linux distributions, so
these datasets give a real, non-synthetic text corpus that needs no network access. `reader` reads the database;
three builders use it:

* `wordnet_topic` (`topic.py`, sequence classification): text = gloss definition (+ examples), label =
  lexicographer category (`noun.animal`, `noun.artifact`, ...), balanced over the most frequent categories.
* `wordnet_mc` (`mc.py`, 4-way multiple choice, HellaSwag schema): context `The noun "dog" means`, endings = the
  true definition and 3 distractor definitions from the same lexicographer category; `activity_label` = category.
* `wordnet_define` (`define.py`, instruction tuning): `Define the noun "dog".` -> the definition.
"""

from .define import build_wordnet_define
from .mc import build_wordnet_mc
from .reader import (
    DEFAULT_WORDNET_DIRS,
    POS_FILES,
    WORDNET_LEXNAMES,
    Synset,
    find_wordnet_dir,
    load_wordnet,
    parse_data_line,
    wordnet_available,
)
from .sampling import category_counts
from .topic import build_wordnet_topic

__all__ = [
    "DEFAULT_WORDNET_DIRS",
    "POS_FILES",
    "WORDNET_LEXNAMES",
    "Synset",
    "build_wordnet_define",
    "build_wordnet_mc",
    "build_wordnet_topic",
    "category_counts",
    "find_wordnet_dir",
    "load_wordnet",
    "parse_data_line",
    "wordnet_available",
]
