"""`image_cls`: image classification; the "tokenizer" is the model's image processor; loss from the model."""

from __future__ import annotations

from typing import Any, ClassVar

import datasets
from transformers import DefaultDataCollator

from .base import TaskSpec, register_task
from .classification import _ClassificationTask
from .collators import SelectKeys


@register_task("image_cls")
class ImageClassificationTask(_ClassificationTask):
    """Image classification (`AutoModelForImageClassification`, e.g. a ViT with LoRA on its attention).

    The "tokenizer" is the model's image processor, applied on the fly (`Dataset.with_transform`) because resized
    pixel tensors of a whole dataset would not fit in memory.
    """

    model_input_names: ClassVar[tuple[str, ...]] = ("pixel_values", "labels")

    @property
    def required_columns(self) -> list[str]:
        return [self.image_column, self.label_column]

    def _preprocess_batch(self, batch: dict[str, list], image_processor) -> dict[str, Any]:
        images = [image.convert("RGB") if hasattr(image, "convert") else image for image in batch[self.image_column]]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": [self._label_id(v) for v in batch[self.label_column]]}

    def preprocess(
        self, dataset: datasets.Dataset, tokenizer, *, keep_columns=(), num_proc=None, name=None
    ) -> datasets.Dataset:
        self.check_dataset(dataset, name)
        return dataset.with_transform(self.make_preprocess_fn(tokenizer))

    preprocess.__doc__ = TaskSpec.preprocess.__doc__

    def preprocess_partitions(self, partitions, tokenizer) -> list[datasets.Dataset]:
        """Each partition gets its own lazy transform: nothing is computed here, so there is no pass to share."""
        return [self.preprocess(partition, tokenizer, name=f"client {i}") for i, partition in enumerate(partitions)]

    def collator(self, tokenizer=None) -> SelectKeys:
        # Stacks `pixel_values`; `labels` goes in as `label` so that DefaultDataCollator makes it int64.
        return SelectKeys(DefaultDataCollator(return_tensors="pt"), self.model_input_names, {"labels": "label"})
