"""`TaskSpec`, the base class of the task types, and the registry that maps a task-type name to its class.

`TaskSpec(task_type, ...)` builds the registered subclass for `task_type` (`TaskSpec("mc_causal")` is a
`MultipleChoiceCausalTask`), so callers keep one constructor and no method switches on the task type: each
subclass overrides what differs. A new task type is one subclass decorated with `@register_task("<name>")`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from .metrics import accuracy_metric

IGNORE_INDEX = -100
DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"

TASK_CLASSES: dict[str, type[TaskSpec]] = {}
"""Task-type name -> its `TaskSpec` subclass, in registration order (filled by `register_task`)."""


def register_task(name: str) -> Callable[[type[TaskSpec]], type[TaskSpec]]:
    """Class decorator: register a `TaskSpec` subclass under the task-type name `name`."""

    def decorate(cls: type[TaskSpec]) -> type[TaskSpec]:
        if name in TASK_CLASSES:
            raise ValueError(f"Task type '{name}' is already registered ({TASK_CLASSES[name].__name__}).")
        cls.name = name
        TASK_CLASSES[name] = cls
        return cls

    return decorate


def _unknown_task_type(task_type: Any) -> ValueError:
    return ValueError(f"Unknown task_type '{task_type}'; choose one of {list(TASK_CLASSES)}.")


@dataclass
class TaskSpec:
    """How to turn a raw dataset into model inputs, and model outputs into a loss and predictions.

    `TaskSpec(task_type, ...)` returns the subclass registered for `task_type` (see `TASK_CLASSES`).

    Args:
        task_type (`str`): one of `TASK_TYPES`.
        num_labels (`int`, *optional*): number of classes (`seq_cls`, `image_cls`; defaults to `len(label_names)`).
        num_choices (`int`, defaults to 4): endings per item (`mc_encoder`, `mc_causal`).
        max_length (`int`, defaults to 128): token budget per sequence (per choice for multiple choice).
            `seq_cls`/`mc_encoder` truncate with the tokenizer (longest first for pairs); `mc_causal` keeps the
            ending and drops context tokens from the left; `causal_lm` keeps at least half the budget (or the
            whole response if shorter) for the response and cuts the prompt from the left.
        label_column (`str`, defaults to `"label"`): gold label (class id / name, or index of the correct ending).
        natural_id_column (`str`, *optional*): column for natural-id partitioning (e.g. `activity_label`).
        text_column / text_pair_column (`str`): input text (and optional second segment) for `seq_cls`.
        context_column / endings_column (`str`): context and list of endings for multiple choice
            (HellaSwag: `ctx`, `endings`).
        instruction_column / response_column (`str`): prompt and target for `causal_lm`.
        image_column (`str`): the image (PIL image or `datasets.Image`) for `image_cls` (CIFAR-100: `img`).
        label_names (`list[str]`, *optional*): class names; string labels are mapped through it.
        use_chat_template (`bool`, *optional*): `causal_lm` prompt format: the tokenizer's chat template (`True`),
            `prompt_template` (`False`), or the chat template when the tokenizer has one (`None`).
        prompt_template (`str`): `causal_lm` prompt when not using a chat template; `{instruction}` is replaced.
        pad_to_multiple_of (`int`, *optional*): pad batch lengths to a multiple of this (tensor-core friendly).
    """

    task_type: str
    num_labels: int | None = None
    num_choices: int = 4
    max_length: int = 128
    label_column: str = "label"
    natural_id_column: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    context_column: str = "ctx"
    endings_column: str = "endings"
    instruction_column: str = "instruction"
    response_column: str = "response"
    image_column: str = "image"
    label_names: list[str] | None = field(default=None)
    use_chat_template: bool | None = None
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    pad_to_multiple_of: int | None = None

    # What a subclass declares (class attributes, not fields).
    name: ClassVar[str] = ""
    """The task-type name the class is registered under."""
    peft_task_type: ClassVar[str | None] = None
    """The `peft.TaskType` value for `LoraConfig(task_type=...)` (None: generic `PeftModel`)."""
    is_classification: ClassVar[bool] = False
    """Labels are class ids in `[0, num_labels)` (needs `num_labels >= 2`)."""
    is_multiple_choice: ClassVar[bool] = False
    needs_custom_loss: ClassVar[bool] = False
    """Whether the model's own forward cannot give the task loss, so `compute_loss` must be used (`mc_causal`).
    For the other task types `compute_loss` simply returns the forward's `loss` and `logits`."""
    model_input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "labels")
    """Keys of the batches produced by `collator` (besides `token_type_ids` for tokenizers that emit them)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> TaskSpec:
        if cls is TaskSpec:
            task_type = args[0] if args else kwargs.get("task_type")
            if task_type not in TASK_CLASSES:
                raise _unknown_task_type(task_type)
            cls = TASK_CLASSES[task_type]
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if self.task_type != self.name:
            raise ValueError(
                f"{type(self).__name__} is the task type '{self.name}', got task_type='{self.task_type}'."
            )
        if self.label_names is not None:
            self.label_names = list(self.label_names)
            if self.num_labels is None:
                self.num_labels = len(self.label_names)
            elif self.num_labels != len(self.label_names):
                raise ValueError(
                    f"num_labels={self.num_labels} but {len(self.label_names)} label_names given."
                )
        if self.is_classification and (self.num_labels is None or self.num_labels < 2):
            raise ValueError(f"{self.task_type} needs num_labels >= 2 (or label_names), got {self.num_labels}.")
        if self.num_choices < 2:
            raise ValueError(f"num_choices must be at least 2, got {self.num_choices}.")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {self.max_length}.")

    # ----------------------------------------------------------------------------------------------------------
    # Dataset side
    # ----------------------------------------------------------------------------------------------------------
    @property
    def training_args_overrides(self) -> dict[str, Any]:
        """`TrainingArguments` settings these batches need: keep `ending_mask` (no forward accepts it, so the
        Trainer's `remove_unused_columns` would drop it) and name the label key explicitly (a `PeftModel` forward
        does not expose `labels` in its signature)."""
        return {"remove_unused_columns": False, "label_names": ["labels"]}

    @property
    def required_columns(self) -> list[str]:
        """Raw dataset columns that `preprocess` reads."""
        raise NotImplementedError

    def check_dataset(self, dataset: datasets.Dataset, name: str | None = None) -> None:
        """Raise a `ValueError` naming the columns this task needs and `dataset` lacks."""
        missing = [c for c in self.required_columns if c not in dataset.column_names]
        if missing:
            what = f"Dataset '{name}'" if name else "The dataset"
            raise ValueError(
                f"{what} cannot be used for task '{self.task_type}': missing column(s) {missing} "
                f"(available: {dataset.column_names}). Rename the columns or set the matching TaskSpec "
                f"*_column fields."
            )

    @property
    def _num_label_values(self) -> int:
        """Labels are in `[0, this)`: the index of the correct ending (classification overrides: the classes)."""
        return self.num_choices

    def _label_id(self, value: Any) -> int:
        if isinstance(value, str):
            stripped = value.strip()
            if self.label_names is not None and stripped in self.label_names:
                value = self.label_names.index(stripped)
            elif stripped.lstrip("-").isdigit():
                value = int(stripped)
            else:
                raise ValueError(
                    f"Label '{value}' is neither a class name {self.label_names or '(no label_names given)'} nor "
                    "an integer."
                )
        value = int(value)
        upper = self._num_label_values
        if not 0 <= value < upper:
            raise ValueError(f"Label {value} out of range [0, {upper}) for task '{self.task_type}'.")
        return value

    def _preprocess_batch(self, batch: dict[str, list], tokenizer) -> dict[str, Any]:
        """Raw columns of a batch -> model inputs and `labels` (a batched `datasets.map` function)."""
        raise NotImplementedError

    def make_preprocess_fn(self, tokenizer) -> Callable[[dict[str, list]], dict[str, list]]:
        """A batched `datasets.map` function turning raw columns into token ids and `labels`."""
        return lambda batch: self._preprocess_batch(batch, tokenizer)

    def preprocess(
        self,
        dataset: datasets.Dataset,
        tokenizer,
        *,
        keep_columns: Sequence[str] = (),
        num_proc: int | None = None,
        name: str | None = None,
    ) -> datasets.Dataset:
        """Tokenize `dataset` for this task; raw columns are dropped except `keep_columns`.

        For `image_cls` `tokenizer` is the image processor and nothing is computed here: the returned dataset
        converts rows to `pixel_values` when they are read (`with_transform`), keeping only the compressed images
        in memory; `keep_columns` and `num_proc` do not apply.
        """
        self.check_dataset(dataset, name)
        remove = [c for c in dataset.column_names if c not in keep_columns]
        return dataset.map(
            self.make_preprocess_fn(tokenizer),
            batched=True,
            remove_columns=remove,
            num_proc=num_proc,
            desc=f"Tokenizing for {self.task_type}",
        )

    def preprocess_partitions(self, partitions: Sequence[datasets.Dataset], tokenizer) -> list[datasets.Dataset]:
        """Tokenize the clients' training sets in one pass: the result equals ``preprocess`` of each partition.

        The partitions are concatenated, tokenized by one ``datasets.map`` and cut back into the same row ranges
        (``select`` of a range only adds an indices mapping). One ``map`` per client cost 112 s at 1,000 clients of
        12 rows against 5 s this way (``benchmarks/memory_clients.py``'s data): each ``map`` has a fixed cost
        (fingerprint, cache, progress bar) much larger than tokenizing 12 rows.
        """
        if not partitions:
            return []
        tokenized = self.preprocess(datasets.concatenate_datasets(list(partitions)), tokenizer, name="training set")
        clients, start = [], 0
        for partition in partitions:
            clients.append(tokenized.select(range(start, start + len(partition))))
            start += len(partition)
        return clients

    def collator(self, tokenizer) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Batch collator padding to the longest sequence of the batch (left padding for `mc_causal`; `image_cls`
        stacks `pixel_values`, `tokenizer` may then be the image processor)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------------
    # Model side
    # ----------------------------------------------------------------------------------------------------------
    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Task loss and logits for a collated batch.

        Returns `(loss, logits)`: `logits` is `(batch, num_labels)` for `seq_cls` and `image_cls`, `(batch, num_choices)` for
        multiple choice (for `mc_causal` the length-normalised ending log-likelihoods), and `(batch, length,
        vocab)` for `causal_lm`. `loss` is None when the batch has no `labels`.
        """
        outputs = model(**inputs)
        return outputs.loss, outputs.logits

    def predict(self, logits: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted class / choice per item (`causal_lm`: predicted next token per position)."""
        return _logits_numpy(logits).argmax(axis=-1)

    def scored_pairs(self, preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The `(predictions, references)` that accuracy counts (`causal_lm`: response tokens, shifted)."""
        return preds.reshape(-1), labels.reshape(-1)

    def accuracy(self, logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
        """Accuracy; for `causal_lm` next-token accuracy over the response tokens (labels != -100)."""
        labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        preds, refs = self.scored_pairs(self.predict(logits), labels)
        return _accuracy(preds, refs)

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        """`Trainer(compute_metrics=...)` hook: `{"accuracy": ...}`."""
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        if isinstance(labels, (tuple, list)):
            labels = labels[0]
        return {"accuracy": self.accuracy(predictions, labels)}

    def preprocess_logits_for_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`Trainer(preprocess_logits_for_metrics=...)` hook: keeps only token ids for `causal_lm`.

        Accumulating `(batch, length, vocab)` logits over an eval set would take gigabytes; accuracy needs only the
        argmax.
        """
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return logits

    @torch.no_grad()
    def evaluate(
        self,
        model: torch.nn.Module,
        dataset: datasets.Dataset,
        tokenizer,
        *,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        show_progress: bool | None = None,
    ) -> dict[str, float]:
        """Mean loss and accuracy of `model` on a preprocessed `dataset`, without a Trainer.

        The model is put in eval mode and restored afterwards. Returns `{"loss", "accuracy", "num_samples"}`.
        """
        if device is None:
            device = next(model.parameters()).device
        collate = self.collator(tokenizer)
        was_training = model.training
        model.eval()
        total_loss, total_items = 0.0, 0
        all_preds, all_refs = [], []
        num_batches = math.ceil(len(dataset) / batch_size)
        if show_progress is None:
            show_progress = num_batches > 20
        try:
            for start in tqdm(
                range(0, len(dataset), batch_size),
                total=num_batches,
                disable=not show_progress,
                desc=f"Evaluating {self.task_type}",
            ):
                rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
                batch = {k: v.to(device) for k, v in collate(list(rows)).items()}
                loss, logits = self.compute_loss(model, batch)
                n = batch["labels"].shape[0]
                total_loss += float(loss) * n
                total_items += n
                preds, refs = self.scored_pairs(self.predict(logits), batch["labels"].cpu().numpy())
                all_preds.append(preds)
                all_refs.append(refs)
        finally:
            model.train(was_training)
        preds = np.concatenate(all_preds) if all_preds else np.zeros(0, dtype=np.int64)
        refs = np.concatenate(all_refs) if all_refs else np.zeros(0, dtype=np.int64)
        return {
            "loss": total_loss / max(total_items, 1),
            "accuracy": _accuracy(preds, refs),
            "num_samples": float(total_items),
        }


def _logits_numpy(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits)


def _accuracy(preds: np.ndarray, refs: np.ndarray) -> float:
    """Share of `preds == refs` through the packaged `evaluate` metric; NaN when nothing is scored."""
    if refs.size == 0:
        return math.nan
    return float(accuracy_metric().compute(predictions=preds, references=refs)["accuracy"])
