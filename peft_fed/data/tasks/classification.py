"""`seq_cls`: sequence classification (and the base of the classification task types); loss from the model."""

from __future__ import annotations

from typing import ClassVar

from transformers import DataCollatorWithPadding

from .base import TaskSpec, register_task
from .collators import SelectKeys, right_padding


class _ClassificationTask(TaskSpec):
    """Labels are class ids (or names in `label_names`) in `[0, num_labels)`."""

    is_classification: ClassVar[bool] = True

    @property
    def _num_label_values(self) -> int:
        return self.num_labels


@register_task("seq_cls")
class SequenceClassificationTask(_ClassificationTask):
    """Sequence classification (`AutoModelForSequenceClassification`): text (and an optional second segment) -> class."""

    peft_task_type: ClassVar[str | None] = "SEQ_CLS"

    @property
    def required_columns(self) -> list[str]:
        cols = [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])
        return cols + [self.label_column]

    def _preprocess_batch(self, batch: dict[str, list], tokenizer) -> dict[str, list]:
        pairs = batch[self.text_pair_column] if self.text_pair_column else None
        encoded = tokenizer(batch[self.text_column], pairs, truncation=True, max_length=self.max_length)
        out = {k: list(v) for k, v in encoded.items()}
        out["labels"] = [self._label_id(v) for v in batch[self.label_column]]
        return out

    def collator(self, tokenizer) -> SelectKeys:
        keys = (*self.model_input_names, "token_type_ids")
        return right_padding(DataCollatorWithPadding, tokenizer, keys, pad_to_multiple_of=self.pad_to_multiple_of)
