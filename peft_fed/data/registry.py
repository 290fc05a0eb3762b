"""One entry point for every dataset: `load_task_dataset(name_or_path, ...) -> (train, eval, info)`.

Built-in names (all offline except the Hub path of `hellaswag`):

| name             | task types               | source                                         |
|------------------|--------------------------|------------------------------------------------|
| `wordnet_topic`  | `seq_cls`                | WordNet glosses -> lexicographer category      |
| `wordnet_mc`     | `mc_encoder`, `mc_causal`| WordNet, HellaSwag schema                      |
| `wordnet_define` | `causal_lm`              | WordNet, `Define the noun "x".` -> definition  |
| `hellaswag`      | `mc_encoder`, `mc_causal`| Hub `Rowan/hellaswag` or a local file (`path=`)|
| `cifar100`       | `image_cls`              | Hub `uoft-cs/cifar100` or a local copy (`path=`)|
| `metamathqa`     | `causal_lm`              | Hub `meta-math/MetaMathQA` or a local copy (`path=`)|

Anything else is read as a local `.json` / `.jsonl` / `.csv` / `.parquet` file (or a folder of them) and needs
`task_type`; its columns are checked against the task (`TaskSpec.required_columns`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .hellaswag import HELLASWAG_HUB_ID, load_hellaswag, normalize_hellaswag
from .hub import CIFAR100_HUB_ID, METAMATHQA_HUB_ID, load_cifar100, load_metamathqa
from .tasks import CLASSIFICATION_TASK_TYPES, TASK_TYPES, TaskSpec
from .wordnet import build_wordnet_define, build_wordnet_mc, build_wordnet_topic

logger = logging.getLogger(__name__)

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class TaskDatasetInfo:
    """What a training loop needs to know about a loaded dataset.

    Args:
        name (`str`): registry name or file path.
        task_type (`str`): the task the splits are meant for (one of `TASK_TYPES`).
        label_column (`str`): gold label column (class id, or index of the correct ending).
        natural_id_column (`str`, *optional*): column for `natural_id` partitioning.
        num_labels (`int`, *optional*): classes (`seq_cls`).
        num_choices (`int`, *optional*): endings per item (multiple choice).
        label_names (`list[str]`, *optional*): class names (`seq_cls`).
        columns (`dict[str, str]`): TaskSpec column fields for this dataset (e.g. `{"text_column": "text"}`).
        num_train / num_eval (`int`): split sizes.
        description (`str`): one-line description.
    """

    name: str
    task_type: str
    label_column: str = "label"
    natural_id_column: str | None = None
    num_labels: int | None = None
    num_choices: int | None = None
    label_names: list[str] | None = None
    columns: dict[str, str] = field(default_factory=dict)
    num_train: int = 0
    num_eval: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"Unknown task_type '{self.task_type}'; choose one of {list(TASK_TYPES)}.")

    def task_spec(self, max_length: int = 128, **overrides: Any) -> TaskSpec:
        """A `TaskSpec` configured for this dataset (keyword arguments override its fields)."""
        kwargs: dict[str, Any] = {
            "task_type": self.task_type,
            "max_length": max_length,
            "label_column": self.label_column,
            "natural_id_column": self.natural_id_column,
            **self.columns,
        }
        if self.task_type in CLASSIFICATION_TASK_TYPES:
            kwargs["num_labels"] = self.num_labels
            kwargs["label_names"] = self.label_names
        if self.num_choices is not None:
            kwargs["num_choices"] = self.num_choices
        kwargs.update(overrides)
        return TaskSpec(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., datasets.DatasetDict]
    task_types: tuple[str, ...]
    natural_id_column: str | None
    columns: Mapping[str, str]
    description: str
    label_column: str = "label"


def _hellaswag_builder(
    *, path: str | os.PathLike = HELLASWAG_HUB_ID, seed: int = 0, **kwargs
) -> datasets.DatasetDict:
    return load_hellaswag(path, seed=seed, **kwargs)


def _cifar100_builder(*, path: str | os.PathLike = CIFAR100_HUB_ID, seed: int = 0, **kwargs) -> datasets.DatasetDict:
    return load_cifar100(path, seed=seed, **kwargs)


def _metamathqa_builder(
    *, path: str | os.PathLike = METAMATHQA_HUB_ID, seed: int = 0, **kwargs
) -> datasets.DatasetDict:
    return load_metamathqa(path, seed=seed, **kwargs)


DATASET_REGISTRY: dict[str, _Entry] = {
    "wordnet_topic": _Entry(
        build_wordnet_topic, ("seq_cls",), None, {"text_column": "text"},
        "WordNet gloss (definition + examples) -> lexicographer category",
    ),
    "wordnet_mc": _Entry(
        build_wordnet_mc, ("mc_encoder", "mc_causal"), "activity_label",
        {"context_column": "ctx", "endings_column": "endings"},
        "WordNet word -> its definition among 3 same-category distractors (HellaSwag schema)",
    ),
    "wordnet_define": _Entry(
        build_wordnet_define, ("causal_lm",), "category",
        {"instruction_column": "instruction", "response_column": "response"},
        'WordNet instruction tuning: Define the noun "x". -> definition',
    ),
    "hellaswag": _Entry(
        _hellaswag_builder, ("mc_encoder", "mc_causal"), "activity_label",
        {"context_column": "ctx", "endings_column": "endings"},
        "HellaSwag commonsense sentence completion (Rowan/hellaswag schema)",
    ),
    "cifar100": _Entry(
        _cifar100_builder, ("image_cls",), "coarse_label", {"image_column": "img"},
        "CIFAR-100 image classification over fine_label (uoft-cs/cifar100 schema)", label_column="fine_label",
    ),
    "metamathqa": _Entry(
        _metamathqa_builder, ("causal_lm",), "type",
        {"instruction_column": "query", "response_column": "response"},
        "MetaMathQA math instruction tuning: query -> worked response (meta-math/MetaMathQA schema)",
    ),
}  # fmt: skip


def available_datasets() -> dict[str, tuple[str, ...]]:
    """Registry names and the task types each supports (the first is the default)."""
    return {name: entry.task_types for name, entry in DATASET_REGISTRY.items()}


def _subsample(dataset: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"Sample limits must be positive, got {limit}.")
    return dataset.shuffle(seed=seed).select(range(limit)).flatten_indices()


def _load_local(path: Path, cache_dir: str | None) -> datasets.DatasetDict:
    if path.is_dir():
        return datasets.load_dataset(str(path), cache_dir=cache_dir)
    fmt = _LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"Unsupported file type '{path.suffix}' ({path}); use one of {sorted(_LOCAL_FORMATS)}."
        )
    return datasets.load_dataset(fmt, data_files={"train": str(path)}, cache_dir=cache_dir)


def _encode_string_labels(
    train: datasets.Dataset, evaluation: datasets.Dataset, column: str
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    names = sorted({str(v) for v in train[column]})
    unseen = sorted({str(v) for v in evaluation[column]} - set(names))
    if unseen:
        raise ValueError(f"Eval labels {unseen} do not occur in the training data (classes: {names}).")
    feature = datasets.ClassLabel(names=names)

    def encode(ds: datasets.Dataset) -> datasets.Dataset:
        ds = ds.map(
            lambda v: {column: [feature.str2int(str(x)) for x in v]}, input_columns=column, batched=True
        )
        return ds.cast_column(column, feature)

    return encode(train), encode(evaluation), names


def load_task_dataset(
    name_or_path: str | os.PathLike,
    task_type: str | None = None,
    *,
    seed: int = 0,
    eval_fraction: float = 0.2,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    eval_path: str | os.PathLike | None = None,
    label_column: str = "label",
    natural_id_column: str | None = None,
    column_mapping: Mapping[str, str] | None = None,
    cache_dir: str | None = None,
    **builder_kwargs: Any,
) -> tuple[datasets.Dataset, datasets.Dataset, TaskDatasetInfo]:
    """Load the train and eval splits of a registered dataset or a local file, checked for `task_type`.

    Args:
        name_or_path: a registry name (`available_datasets()`) or a local data file / folder.
        task_type: the task to prepare for; defaults to the registry entry's first task type, required for files.
        seed: seeds the builders, the fallback eval split and subsampling.
        eval_fraction: share held out for eval when the source has no eval split.
        max_train_samples / max_eval_samples: keep a seeded random subset of that many rows.
        eval_path: local files only: a separate eval file (otherwise `eval_fraction` of the file is held out).
        label_column: local files only (registered datasets name their own): the label column (string labels are encoded to class ids, sorted).
        natural_id_column: override the natural-id column (registry default: `activity_label` / `category`).
        column_mapping: local files only: rename columns to the task's names first, e.g. `{"sentence": "text"}`.
        cache_dir: `datasets` cache folder for file / Hub loading.
        **builder_kwargs: passed to the builder (`build_wordnet_topic`, `build_wordnet_mc`,
            `build_wordnet_define`, `load_hellaswag` (`path=` a local HellaSwag file)).

    Returns:
        `(train, eval, info)`: raw (untokenized) splits and a `TaskDatasetInfo`; `info.task_spec()` gives the
        matching `TaskSpec`.
    """
    name = str(name_or_path)
    if name in DATASET_REGISTRY:
        entry = DATASET_REGISTRY[name]
        task_type = task_type or entry.task_types[0]
        if task_type not in entry.task_types:
            raise ValueError(
                f"Dataset '{name}' supports task types {list(entry.task_types)}, not '{task_type}'."
            )
        builder_kwargs.setdefault("eval_fraction", eval_fraction)
        if name in ("hellaswag", "cifar100", "metamathqa"):
            builder_kwargs.setdefault("cache_dir", cache_dir)
        splits = entry.builder(seed=seed, **builder_kwargs)
        train, evaluation = splits["train"], splits["validation"]
        columns = dict(entry.columns)
        label_column = entry.label_column
        natural_id = natural_id_column or entry.natural_id_column
        description = entry.description
    else:
        if task_type is None:
            raise ValueError(
                f"'{name}' is not a registered dataset ({sorted(DATASET_REGISTRY)}); to load it as a local file "
                f"pass task_type (one of {list(TASK_TYPES)})."
            )
        if task_type not in TASK_TYPES:
            raise ValueError(f"Unknown task_type '{task_type}'; choose one of {list(TASK_TYPES)}.")
        path = Path(name_or_path)
        if not path.exists():
            raise FileNotFoundError(f"No registered dataset or local file named '{name}'.")
        if builder_kwargs:
            raise TypeError(f"Unexpected arguments for a local dataset: {sorted(builder_kwargs)}.")
        raw = _load_local(path, cache_dir)
        if eval_path is not None:
            train = raw["train"]
            evaluation = _load_local(Path(eval_path), cache_dir)["train"]
        elif "validation" in raw or "test" in raw:
            train, evaluation = raw["train"], raw["validation" if "validation" in raw else "test"]
        else:
            parts = raw["train"].train_test_split(test_size=eval_fraction, seed=seed, shuffle=True)
            train, evaluation = parts["train"], parts["test"]
        if column_mapping:
            train = train.rename_columns(dict(column_mapping))
            evaluation = evaluation.rename_columns(dict(column_mapping))
        columns = {}
        natural_id = natural_id_column
        description = f"local file {path.name}"

    spec = TaskSpec(
        task_type=task_type,
        num_labels=2 if task_type in CLASSIFICATION_TASK_TYPES else None,  # placeholder until the labels are known
        label_column=label_column,
        **columns,
    )
    for split_name, split in (("train", train), ("eval", evaluation)):
        spec.check_dataset(split, f"{name} ({split_name})")
    if natural_id is not None and natural_id not in train.column_names:
        raise ValueError(
            f"natural_id_column '{natural_id}' not in the columns of '{name}': {train.column_names}."
        )

    num_labels = num_choices = label_names = None
    if task_type in CLASSIFICATION_TASK_TYPES:
        feature = train.features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            label_names = list(feature.names)
        elif getattr(feature, "dtype", None) in ("string", "large_string"):
            train, evaluation, label_names = _encode_string_labels(train, evaluation, label_column)
        else:
            values = set(train[label_column]) | set(evaluation[label_column])
            if min(values) < 0:
                raise ValueError(
                    f"Negative class ids in '{label_column}': {sorted(v for v in values if v < 0)}."
                )
            label_names = [str(i) for i in range(max(values) + 1)]
        num_labels = len(label_names)
    elif task_type in ("mc_encoder", "mc_causal"):
        if name not in DATASET_REGISTRY and label_column == "label":
            # Local multiple-choice files get the HellaSwag normalisation (integer labels, markup removed, the
            # same number of endings everywhere), so they behave like the built-in datasets.
            train, evaluation = normalize_hellaswag(train), normalize_hellaswag(evaluation)
        num_choices = len(train[0][spec.endings_column])

    train = _subsample(train, max_train_samples, seed)
    evaluation = _subsample(evaluation, max_eval_samples, seed)
    info = TaskDatasetInfo(
        name=name,
        task_type=task_type,
        label_column=label_column,
        natural_id_column=natural_id,
        num_labels=num_labels,
        num_choices=num_choices,
        label_names=label_names,
        columns=columns,
        num_train=len(train),
        num_eval=len(evaluation),
        description=description,
    )
    logger.info("Loaded %s for %s: %d train / %d eval rows.", name, task_type, len(train), len(evaluation))
    return train, evaluation, info
