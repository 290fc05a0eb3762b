"""HellaSwag loader for the schema of the Hub dataset `Rowan/hellaswag`.

Columns (Hub): `ind` (int), `activity_label`, `ctx_a`, `ctx_b`, `ctx`, `endings` (list of 4 strings), `source_id`,
`split`, `split_type` and `label` (a *string* "0".."3", empty on the unlabelled test split). The loader returns the
same columns with `label` as an integer (see `HELLASWAG_FEATURES`), the form every multiple-choice task in
`peft_fed.data.tasks` consumes; `wordnet_mc` produces exactly this form too.
"""

from __future__ import annotations

import logging
import os
import re

import datasets

from .hub import load_raw_dataset

logger = logging.getLogger(__name__)

HELLASWAG_HUB_ID = "Rowan/hellaswag"
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
HELLASWAG_COLUMNS: tuple[str, ...] = tuple(HELLASWAG_FEATURES)
_EVAL_SPLIT_NAMES = ("validation", "val", "eval", "dev")
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def clean_hellaswag_text(text: str) -> str:
    """Remove the WikiHow markup of HellaSwag (`[header]`, `[title]`, `[step]`...), as the reference evaluation does.

    The tags are artefacts of scraping; scoring them as text would reward models for predicting markup.
    """
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return re.sub(r"\s{2,}", " ", text).strip()


def _to_int_label(value) -> int:
    if value is None:
        return -1
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value else -1
    return int(value)


def normalize_hellaswag(
    dataset: datasets.Dataset, *, clean_text: bool = True, drop_unlabeled: bool = True
) -> datasets.Dataset:
    """Bring a dataset of the HellaSwag schema to `HELLASWAG_FEATURES` (integer labels, cleaned text).

    Only `endings`, `label` and either `ctx` or both `ctx_a`/`ctx_b` are required; the other HellaSwag columns are
    filled with neutral values when absent (e.g. `activity_label=""`), so partial exports still load.

    Args:
        clean_text: strip WikiHow markup from `ctx` and the endings (see `clean_hellaswag_text`).
        drop_unlabeled: drop rows with an empty label (the Hub test split), which cannot be trained or scored.
    """
    columns = set(dataset.column_names)
    missing = [c for c in ("endings", "label") if c not in columns]
    if "ctx" not in columns and not {"ctx_a", "ctx_b"} <= columns:
        missing.append("ctx (or ctx_a and ctx_b)")
    if missing:
        raise ValueError(
            f"Dataset is not in the HellaSwag schema: missing column(s) {missing} needed by the multiple-choice "
            f"tasks (available: {sorted(columns)})."
        )
    num_rows = len(dataset)

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        n = len(indices)
        ctx_a = batch.get("ctx_a", [""] * n)
        ctx_b = batch.get("ctx_b", [""] * n)
        if "ctx" in batch:
            ctx = batch["ctx"]
        else:
            ctx = [f"{a} {b[:1].upper() + b[1:]}".strip() for a, b in zip(ctx_a, ctx_b, strict=True)]
        endings = [list(e) for e in batch["endings"]]
        if clean_text:
            ctx = [clean_hellaswag_text(c) for c in ctx]
            endings = [[clean_hellaswag_text(e) for e in row] for row in endings]
        return {
            "ind": batch["ind"] if "ind" in batch else indices,
            "activity_label": batch.get("activity_label", [""] * n),
            "ctx_a": ctx_a,
            "ctx_b": ctx_b,
            "ctx": ctx,
            "endings": endings,
            "source_id": batch.get("source_id", [""] * n),
            "split": batch.get("split", [""] * n),
            "split_type": batch.get("split_type", [""] * n),
            "label": [_to_int_label(v) for v in batch["label"]],
        }

    out = dataset.map(
        convert,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=HELLASWAG_FEATURES,
        desc="Normalising HellaSwag" if num_rows > 10_000 else None,
    )
    if drop_unlabeled:
        out = out.filter(lambda labels: [label >= 0 for label in labels], input_columns="label", batched=True)
    num_choices = {len(e) for e in out["endings"]}
    if len(num_choices) > 1:
        raise ValueError(
            f"All HellaSwag items must have the same number of endings, found {sorted(num_choices)}."
        )
    if num_choices:
        (n_endings,) = num_choices
        bad = sorted({label for label in out["label"] if label >= n_endings})
        if bad:
            raise ValueError(f"Labels {bad} out of range for {n_endings} endings.")
    return out


def load_hellaswag(
    name_or_path: str | os.PathLike = HELLASWAG_HUB_ID,
    *,
    eval_fraction: float = 0.2,
    seed: int = 0,
    clean_text: bool = True,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Load HellaSwag (or any dataset of its schema) as `train` / `validation` with integer labels.

    Args:
        name_or_path: the Hub id (`Rowan/hellaswag`, default; needs network or a warm cache), a local `.jsonl` /
            `.json` / `.parquet` file, or a local folder of such files (split names taken from the file names).
        eval_fraction: used only when the source has no evaluation split and no `split` column marking one: that
            share of the rows becomes `validation` (seeded, deterministic).
        seed: seed of that fallback split.
        clean_text: strip WikiHow markup (see `clean_hellaswag_text`).
        cache_dir: `datasets` cache folder.

    The evaluation split is the source's `validation`/`val`/`eval`/`dev` split; a single-split source (one local
    file) is divided by its `split` column (`train` vs `val`/`validation`) when that column marks both. The Hub's
    `test` split has no labels and is ignored.
    """
    raw = load_raw_dataset(name_or_path, cache_dir, _LOCAL_FORMATS)
    if "train" not in raw:
        raise ValueError(f"No 'train' split in {name_or_path} (found {list(raw)}).")
    eval_name = next((name for name in _EVAL_SPLIT_NAMES if name in raw), None)
    if eval_name is not None:
        train = normalize_hellaswag(raw["train"], clean_text=clean_text)
        evaluation = normalize_hellaswag(raw[eval_name], clean_text=clean_text)
        return datasets.DatasetDict({"train": train, "validation": evaluation})

    full = normalize_hellaswag(raw["train"], clean_text=clean_text)
    split_values = set(full["split"])
    eval_values = split_values & set(_EVAL_SPLIT_NAMES)
    if "train" in split_values and eval_values:
        train = full.filter(lambda s: [v == "train" for v in s], input_columns="split", batched=True)
        evaluation = full.filter(lambda s: [v in eval_values for v in s], input_columns="split", batched=True)
    else:
        logger.info(
            "No evaluation split in %s: holding out %.0f%% of the rows (seed %d).",
            name_or_path,
            100 * eval_fraction,
            seed,
        )
        parts = full.train_test_split(test_size=eval_fraction, seed=seed, shuffle=True)
        train, evaluation = parts["train"], parts["test"]
    return datasets.DatasetDict({"train": train, "validation": evaluation})
