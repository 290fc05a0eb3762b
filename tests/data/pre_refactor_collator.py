"""The collator of `peft_fed/data/tasks.py` before the task types became classes (commit ed381e7), kept verbatim.

`test_collators.py` checks that each task type's collator (transformers' collators, or the custom `mc_causal` one)
gives byte-identical batches: same keys, values, padding side and dtype. Do not edit: it is the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

TASK_TYPES: tuple[str, ...] = ("seq_cls", "mc_encoder", "mc_causal", "causal_lm", "image_cls")
IGNORE_INDEX = -100


def _pad(sequences: Sequence[Sequence[int]], value: int, length: int, left: bool) -> list[list[int]]:
    out = []
    for seq in sequences:
        padding = [value] * (length - len(seq))
        out.append(padding + list(seq) if left else list(seq) + padding)
    return out


@dataclass
class TaskCollator:
    """Pads a list of preprocessed rows into tensors.

    Args:
        task_type (`str`): one of `TASK_TYPES`; multiple-choice rows are flattened to `batch * num_choices`
            sequences, padded, and reshaped to `(batch, num_choices, length)`.
        pad_token_id (`int`): padding id for `input_ids`.
        pad_token_type_id (`int`): padding id for `token_type_ids`.
        pad_to_multiple_of (`int`, *optional*): round the padded length up to a multiple of this.

    `mc_causal` is padded on the left so that every ending ends at the last position: the scoring then needs the
    logits of the last `max ending length + 1` positions only (`logits_to_keep`), instead of the full
    `(batch * choices, length, vocab)` tensor. Other tasks are padded on the right; `causal_lm` labels with -100.
    """

    task_type: str
    pad_token_id: int
    pad_token_type_id: int = 0
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"Unknown task_type '{self.task_type}'; choose one of {list(TASK_TYPES)}.")

    def _length(self, sequences: Sequence[Sequence[int]]) -> int:
        length = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty batch.")
        if self.task_type == "image_cls":
            batch = {"pixel_values": torch.stack([torch.as_tensor(f["pixel_values"]) for f in features])}
            if "labels" in features[0]:
                batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
            return batch
        multiple_choice = self.task_type in ("mc_encoder", "mc_causal")
        batch_size = len(features)
        num_choices = len(features[0]["input_ids"]) if multiple_choice else 1

        def flat(key: str) -> list[list[int]]:
            if multiple_choice:
                return [list(seq) for f in features for seq in f[key]]
            return [list(f[key]) for f in features]

        input_ids = flat("input_ids")
        length = self._length(input_ids)
        left = self.task_type == "mc_causal"
        attention = (
            flat("attention_mask") if "attention_mask" in features[0] else [[1] * len(s) for s in input_ids]
        )
        batch: dict[str, torch.Tensor] = {
            "input_ids": torch.tensor(_pad(input_ids, self.pad_token_id, length, left)),
            "attention_mask": torch.tensor(_pad(attention, 0, length, left)),
        }
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = torch.tensor(
                _pad(flat("token_type_ids"), self.pad_token_type_id, length, left)
            )
        if self.task_type == "mc_causal":
            batch["ending_mask"] = torch.tensor(_pad(flat("ending_mask"), 0, length, left))
        if multiple_choice:
            batch = {k: v.view(batch_size, num_choices, length) for k, v in batch.items()}
        if "labels" in features[0]:
            if self.task_type == "causal_lm":
                batch["labels"] = torch.tensor(_pad(flat("labels"), IGNORE_INDEX, length, left))
            else:
                batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


def old_collator(task_type: str, tokenizer, pad_to_multiple_of: int | None = None) -> TaskCollator:
    """What `TaskSpec.collator(tokenizer)` returned before the refactor (verbatim logic)."""
    if task_type == "image_cls":
        return TaskCollator(task_type=task_type, pad_token_id=0)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first.")
    return TaskCollator(
        task_type=task_type,
        pad_token_id=pad_id,
        pad_token_type_id=getattr(tokenizer, "pad_token_type_id", 0) or 0,
        pad_to_multiple_of=pad_to_multiple_of,
    )
