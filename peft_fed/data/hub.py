"""Datasets that live on the Hugging Face Hub, read from the Hub or from a local copy of the same schema.

The presets of the papers' settings (`examples/configs/presets/`) train on Hub datasets: CIFAR-100
(`uoft-cs/cifar100`: `img`, `fine_label`, `coarse_label`) and MetaMathQA (`meta-math/MetaMathQA`: `query`,
`response`, `type`). Offline machines (and the tests) pass `path=` a local file or folder with the same columns
instead: a `.parquet` file keeps `datasets.Image` / `ClassLabel` features, so a local CIFAR-100 subset saved with
`Dataset.to_parquet` loads exactly like the Hub one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets

logger = logging.getLogger(__name__)

CIFAR100_HUB_ID = "uoft-cs/cifar100"
METAMATHQA_HUB_ID = "meta-math/MetaMathQA"
LOCAL_FORMATS: Mapping[str, str] = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_SPLIT_NAMES: tuple[str, ...] = ("validation", "val", "eval", "dev", "test")


def load_raw_dataset(
    name_or_path: str | os.PathLike,
    cache_dir: str | None = None,
    formats: Mapping[str, str] = LOCAL_FORMATS,
) -> datasets.DatasetDict:
    """A local file (one `train` split), a local folder (splits from the file names) or a Hub id."""
    path = Path(name_or_path)
    if path.is_file():
        fmt = formats.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"Unsupported file type '{path.suffix}' ({path}); use one of {sorted(formats)}.")
        return datasets.load_dataset(fmt, data_files={"train": str(path)}, cache_dir=cache_dir)
    if path.is_dir():
        return datasets.load_dataset(str(path), cache_dir=cache_dir)
    # Not a local path: a Hub dataset id (needs network access or a populated HF cache).
    return datasets.load_dataset(str(name_or_path), cache_dir=cache_dir)


def load_train_eval(
    name_or_path: str | os.PathLike,
    *,
    required_columns: Sequence[str],
    eval_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """`train` and `validation` splits of a Hub dataset or a local copy, checked for `required_columns`.

    The evaluation split is the source's first of `EVAL_SPLIT_NAMES` (CIFAR-100's `test`); a source with only a
    `train` split (MetaMathQA, one local file) has `eval_fraction` of its rows held out (seeded).
    """
    raw = load_raw_dataset(name_or_path, cache_dir)
    if "train" not in raw:
        raise ValueError(f"No 'train' split in {name_or_path} (found {list(raw)}).")
    missing = [c for c in required_columns if c not in raw["train"].column_names]
    if missing:
        raise ValueError(
            f"{name_or_path} lacks column(s) {missing} of its schema (has {raw['train'].column_names})."
        )
    eval_name = next((name for name in EVAL_SPLIT_NAMES if name in raw), None)
    if eval_name is not None:
        return datasets.DatasetDict({"train": raw["train"], "validation": raw[eval_name]})
    logger.info("No evaluation split in %s: holding out %.0f%% of the rows (seed %d).", name_or_path,
                100 * eval_fraction, seed)  # fmt: skip
    parts = raw["train"].train_test_split(test_size=eval_fraction, seed=seed, shuffle=True)
    return datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})


def load_cifar100(
    path: str | os.PathLike = CIFAR100_HUB_ID,
    *,
    seed: int = 0,
    eval_fraction: float = 0.2,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """CIFAR-100 (`img`, `fine_label` of 100 classes, `coarse_label`): train and test (as `validation`)."""
    return load_train_eval(path, required_columns=("img", "fine_label"), eval_fraction=eval_fraction, seed=seed,
                           cache_dir=cache_dir)  # fmt: skip


def load_metamathqa(
    path: str | os.PathLike = METAMATHQA_HUB_ID,
    *,
    seed: int = 0,
    eval_fraction: float = 0.02,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """MetaMathQA (`query` -> `response`, `type` the augmentation family): 2% held out by default."""
    return load_train_eval(path, required_columns=("query", "response"), eval_fraction=eval_fraction, seed=seed,
                           cache_dir=cache_dir)  # fmt: skip
