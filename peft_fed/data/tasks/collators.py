"""Batch collators of the task types: transformers' collators where one fits, one custom collator for `mc_causal`.

Every text collator pads to the longest sequence of the batch (rounded up to `pad_to_multiple_of`), on a fixed side
whatever `tokenizer.padding_side` says: right for `seq_cls`, `mc_encoder`, `causal_lm`; left for `mc_causal`. The
transformers collators read the side from the tokenizer, so they get a `FixedSidePadding` view of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


class FixedSidePadding:
    """A tokenizer whose `pad` always pads on `padding_side` and always returns an `attention_mask`.

    Everything else is the wrapped tokenizer's (the tokenizer itself is not modified: a copy would share its
    special-token state).
    """

    def __init__(self, tokenizer, padding_side: str) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token first (e.g. to its EOS token).")
        self.tokenizer = tokenizer
        self.padding_side = padding_side

    def pad(self, *args: Any, **kwargs: Any):
        kwargs["padding_side"] = self.padding_side
        kwargs.setdefault("return_attention_mask", True)
        return self.tokenizer.pad(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "tokenizer":  # unpickling probes these before __init__ state exists
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


@dataclass
class SelectKeys:
    """Keep only `keys` of each row (extra columns, e.g. `keep_columns`, are not model inputs), optionally renamed,
    then call `collate`; returns a plain dict without `None` values.

    Args:
        collate: the collator to call on the selected rows.
        keys: row keys to keep (missing ones are skipped).
        rename: `{row key: key the collator expects}`.
    """

    collate: Callable[[list[dict[str, Any]]], Any]
    keys: Sequence[str]
    rename: dict[str, str] | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty batch.")
        rename = self.rename or {}
        rows = [{rename.get(k, k): f[k] for k in self.keys if k in f} for f in features]
        return {k: v for k, v in self.collate(rows).items() if v is not None}


def right_padding(collator_cls: type, tokenizer, keys: Sequence[str], **kwargs: Any) -> SelectKeys:
    """`collator_cls` (a transformers collator taking a tokenizer) padding on the right, on rows cut to `keys`."""
    return SelectKeys(collator_cls(FixedSidePadding(tokenizer, "right"), return_tensors="pt", **kwargs), keys)


def _pad(sequences: Sequence[Sequence[int]], value: int, length: int) -> list[list[int]]:
    return [[value] * (length - len(seq)) + list(seq) for seq in sequences]


@dataclass
class MultipleChoiceCausalCollator:
    """Left-pads `mc_causal` rows into `(batch, num_choices, length)` tensors, `ending_mask` included.

    Custom because no transformers collator fits: `tokenizer.pad` pads only the tokenizer's own keys, not
    `ending_mask`, and `DataCollatorForMultipleChoice` cannot carry it either. Left padding puts every ending at the
    last positions, so scoring needs the logits of the last `max ending length + 1` positions only
    (`logits_to_keep`) instead of the full `(batch * choices, length, vocab)` tensor.

    Args:
        pad_token_id (`int`): padding id for `input_ids`.
        pad_token_type_id (`int`): padding id for `token_type_ids`.
        pad_to_multiple_of (`int`, *optional*): round the padded length up to a multiple of this.
    """

    pad_token_id: int
    pad_token_type_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty batch.")
        batch_size, num_choices = len(features), len(features[0]["input_ids"])

        def flat(key: str) -> list[list[int]]:
            return [list(seq) for f in features for seq in f[key]]

        input_ids = flat("input_ids")
        length = max(len(s) for s in input_ids)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        attention = (
            flat("attention_mask") if "attention_mask" in features[0] else [[1] * len(s) for s in input_ids]
        )
        batch = {
            "input_ids": torch.tensor(_pad(input_ids, self.pad_token_id, length)),
            "attention_mask": torch.tensor(_pad(attention, 0, length)),
        }
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = torch.tensor(_pad(flat("token_type_ids"), self.pad_token_type_id, length))
        batch["ending_mask"] = torch.tensor(_pad(flat("ending_mask"), 0, length))
        batch = {k: v.view(batch_size, num_choices, length) for k, v in batch.items()}
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch
