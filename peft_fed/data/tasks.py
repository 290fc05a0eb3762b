"""Task definitions: preprocessing, collation, loss and accuracy for the five task types of peft-fed.

* `seq_cls`: sequence classification (`AutoModelForSequenceClassification`), loss from the model.
* `mc_encoder`: multiple choice with an encoder head (`AutoModelForMultipleChoice`, e.g. RoBERTa on HellaSwag);
  inputs of shape `(batch, num_choices, length)`, one `(context, ending)` pair per choice, loss from the model.
* `mc_causal`: multiple choice with a causal LM. Each ending is scored by its length-normalised log-likelihood, the
  mean log-probability of its tokens given the context; the loss is the cross-entropy over the `num_choices`
  scores and the prediction their argmax (`multiple_choice_scores`).
* `causal_lm`: instruction tuning (`AutoModelForCausalLM`); the loss covers the response tokens only (prompt
  tokens get the label -100).
* `image_cls`: image classification (`AutoModelForImageClassification`, e.g. a ViT with LoRA on its attention);
  the "tokenizer" is the model's image processor, applied on the fly (`Dataset.with_transform`) because
  resized pixel tensors of a whole dataset would not fit in memory; loss from the model.

A `TaskSpec` bundles everything a training loop needs. With a `transformers.Trainer` subclass::

    spec = TaskSpec("mc_causal", num_choices=4, max_length=128)
    train = spec.preprocess(raw_train, tokenizer)

    class TaskTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, logits = spec.compute_loss(model, inputs)
            return (loss, {"logits": logits}) if return_outputs else loss

    trainer = TaskTrainer(model=model, args=TrainingArguments(..., remove_unused_columns=False,
                          label_names=["labels"]), train_dataset=train, data_collator=spec.collator(tokenizer),
                          compute_metrics=spec.compute_metrics,
                          preprocess_logits_for_metrics=spec.preprocess_logits_for_metrics)

`remove_unused_columns=False` is needed because `mc_causal` batches carry `ending_mask`, which no model forward
accepts (preprocessing already removes the raw text columns); `model` may be a `PeftModel`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

TASK_TYPES: tuple[str, ...] = ("seq_cls", "mc_encoder", "mc_causal", "causal_lm", "image_cls")
CLASSIFICATION_TASK_TYPES: tuple[str, ...] = ("seq_cls", "image_cls")
IGNORE_INDEX = -100
DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"

# PEFT task type per task (`peft.TaskType` value); PEFT has none for multiple choice or images, so `mc_encoder` and
# `image_cls` use the generic `PeftModel` (task_type=None) and rely on `modules_to_save` for their head.
PEFT_TASK_TYPES: dict[str, str | None] = {
    "seq_cls": "SEQ_CLS",
    "mc_encoder": None,
    "mc_causal": "CAUSAL_LM",
    "causal_lm": "CAUSAL_LM",
    "image_cls": None,
}


@dataclass
class TaskSpec:
    """How to turn a raw dataset into model inputs, and model outputs into a loss and predictions.

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

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"Unknown task_type '{self.task_type}'; choose one of {list(TASK_TYPES)}.")
        if self.label_names is not None:
            self.label_names = list(self.label_names)
            if self.num_labels is None:
                self.num_labels = len(self.label_names)
            elif self.num_labels != len(self.label_names):
                raise ValueError(
                    f"num_labels={self.num_labels} but {len(self.label_names)} label_names given."
                )
        if self.task_type in CLASSIFICATION_TASK_TYPES and (self.num_labels is None or self.num_labels < 2):
            raise ValueError(f"{self.task_type} needs num_labels >= 2 (or label_names), got {self.num_labels}.")
        if self.num_choices < 2:
            raise ValueError(f"num_choices must be at least 2, got {self.num_choices}.")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {self.max_length}.")
        if self.task_type == "causal_lm" and "{instruction}" not in self.prompt_template:
            raise ValueError("prompt_template must contain the '{instruction}' placeholder.")

    # ----------------------------------------------------------------------------------------------------------
    # Dataset side
    # ----------------------------------------------------------------------------------------------------------
    @property
    def is_multiple_choice(self) -> bool:
        return self.task_type in ("mc_encoder", "mc_causal")

    @property
    def peft_task_type(self) -> str | None:
        """The `peft.TaskType` value for `LoraConfig(task_type=...)` (None: generic `PeftModel`)."""
        return PEFT_TASK_TYPES[self.task_type]

    @property
    def needs_custom_loss(self) -> bool:
        """Whether the model's own forward cannot give the task loss, so `compute_loss` must be used (`mc_causal`).

        For the other task types `compute_loss` simply returns the forward's `loss` and `logits`.
        """
        return self.task_type == "mc_causal"

    @property
    def training_args_overrides(self) -> dict[str, Any]:
        """`TrainingArguments` settings these batches need: keep `ending_mask` (no forward accepts it, so the
        Trainer's `remove_unused_columns` would drop it) and name the label key explicitly (a `PeftModel` forward
        does not expose `labels` in its signature)."""
        return {"remove_unused_columns": False, "label_names": ["labels"]}

    @property
    def required_columns(self) -> list[str]:
        """Raw dataset columns that `preprocess` reads."""
        if self.task_type == "seq_cls":
            cols = [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])
            return cols + [self.label_column]
        if self.is_multiple_choice:
            return [self.context_column, self.endings_column, self.label_column]
        if self.task_type == "image_cls":
            return [self.image_column, self.label_column]
        return [self.instruction_column, self.response_column]

    @property
    def model_input_names(self) -> list[str]:
        """Keys of the batches produced by `collator` (besides `token_type_ids` for tokenizers that emit them)."""
        if self.task_type == "mc_causal":
            return ["input_ids", "attention_mask", "ending_mask", "labels"]
        if self.task_type == "image_cls":
            return ["pixel_values", "labels"]
        return ["input_ids", "attention_mask", "labels"]

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
        upper = self.num_labels if self.task_type in CLASSIFICATION_TASK_TYPES else self.num_choices
        if not 0 <= value < upper:
            raise ValueError(f"Label {value} out of range [0, {upper}) for task '{self.task_type}'.")
        return value

    def make_preprocess_fn(self, tokenizer) -> Callable[[dict[str, list]], dict[str, list]]:
        """A batched `datasets.map` function turning raw columns into token ids and `labels`."""
        if self.task_type == "seq_cls":
            return lambda batch: self._preprocess_seq_cls(batch, tokenizer)
        if self.task_type == "mc_encoder":
            return lambda batch: self._preprocess_mc_encoder(batch, tokenizer)
        if self.task_type == "mc_causal":
            return lambda batch: self._preprocess_mc_causal(batch, tokenizer)
        if self.task_type == "image_cls":
            return lambda batch: self._preprocess_image_cls(batch, tokenizer)
        return lambda batch: self._preprocess_causal_lm(batch, tokenizer)

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
        if self.task_type == "image_cls":
            return dataset.with_transform(self.make_preprocess_fn(tokenizer))
        remove = [c for c in dataset.column_names if c not in keep_columns]
        return dataset.map(
            self.make_preprocess_fn(tokenizer),
            batched=True,
            remove_columns=remove,
            num_proc=num_proc,
            desc=f"Tokenizing for {self.task_type}",
        )

    def _preprocess_seq_cls(self, batch: dict[str, list], tokenizer) -> dict[str, list]:
        pairs = batch[self.text_pair_column] if self.text_pair_column else None
        encoded = tokenizer(batch[self.text_column], pairs, truncation=True, max_length=self.max_length)
        out = {k: list(v) for k, v in encoded.items()}
        out["labels"] = [self._label_id(v) for v in batch[self.label_column]]
        return out

    def _preprocess_image_cls(self, batch: dict[str, list], image_processor) -> dict[str, Any]:
        images = [image.convert("RGB") if hasattr(image, "convert") else image for image in batch[self.image_column]]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": [self._label_id(v) for v in batch[self.label_column]]}

    def _endings(self, batch: dict[str, list]) -> list[list[str]]:
        endings = [list(e) for e in batch[self.endings_column]]
        wrong = {len(e) for e in endings if len(e) != self.num_choices}
        if wrong:
            raise ValueError(
                f"Items with {sorted(wrong)} endings; this task expects num_choices={self.num_choices}."
            )
        return endings

    def _preprocess_mc_encoder(self, batch: dict[str, list], tokenizer) -> dict[str, list]:
        contexts = batch[self.context_column]
        endings = self._endings(batch)
        n, c = len(contexts), self.num_choices
        first = [ctx for ctx in contexts for _ in range(c)]
        second = [e for row in endings for e in row]
        encoded = tokenizer(first, second, truncation=True, max_length=self.max_length)
        out = {k: [list(v[i * c : (i + 1) * c]) for i in range(n)] for k, v in encoded.items()}
        out["labels"] = [self._label_id(v) for v in batch[self.label_column]]
        return out

    def _preprocess_mc_causal(self, batch: dict[str, list], tokenizer) -> dict[str, list]:
        contexts = [ctx.rstrip() for ctx in batch[self.context_column]]
        endings = self._endings(batch)
        c = self.num_choices
        # As in lm-evaluation-harness: encode context + " " + ending as one string and take the tokens past the
        # context as the ending, so the ending is tokenized the way the model sees it in running text.
        continuations, whole_texts = [], []
        for ctx, row in zip(contexts, endings, strict=True):
            for ending in row:
                if not ending.strip():
                    raise ValueError(f"Empty ending in multiple-choice item with context {ctx!r}.")
                continuation = " " + ending.strip() if ctx else ending.strip()
                continuations.append(continuation)
                whole_texts.append(ctx + continuation)
        ctx_ids = tokenizer(contexts, add_special_tokens=True)["input_ids"]
        whole_ids = tokenizer(whole_texts, add_special_tokens=True)["input_ids"]
        alone_ids = tokenizer(continuations, add_special_tokens=False)["input_ids"]
        fallback_ctx = [tid for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id) if tid is not None][
            :1
        ]
        input_ids, ending_mask = [], []
        for i, context in enumerate(ctx_ids):
            # The first ending token needs a preceding position to be predicted from.
            context = list(context) or fallback_ctx
            if not context:
                raise ValueError("mc_causal needs a non-empty context or a tokenizer with a BOS/EOS token.")
            row_ids, row_mask = [], []
            for j in range(c):
                k = i * c + j
                whole = whole_ids[k]
                if len(whole) > len(context) and list(whole[: len(context)]) == context:
                    ending = list(whole[len(context) :])
                else:  # the tokenizer merged across the boundary: fall back to separate encodings
                    ending = list(alone_ids[k])
                ending = ending[: self.max_length - 1]
                kept_context = context[-(self.max_length - len(ending)) :]
                row_ids.append(kept_context + ending)
                row_mask.append([0] * len(kept_context) + [1] * len(ending))
            input_ids.append(row_ids)
            ending_mask.append(row_mask)
        return {
            "input_ids": input_ids,
            "ending_mask": ending_mask,
            "labels": [self._label_id(v) for v in batch[self.label_column]],
        }

    def _uses_chat_template(self, tokenizer) -> bool:
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if self.use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template.")
        return has_template if self.use_chat_template is None else self.use_chat_template

    def format_prompt(self, instruction: str, tokenizer) -> str:
        """The prompt text the model is conditioned on (chat template or `prompt_template`)."""
        if self._uses_chat_template(tokenizer):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
            )
        return self.prompt_template.format(instruction=instruction)

    def _preprocess_causal_lm(self, batch: dict[str, list], tokenizer) -> dict[str, list]:
        chat = self._uses_chat_template(tokenizer)
        prompts = [self.format_prompt(x, tokenizer) for x in batch[self.instruction_column]]
        # A chat-template string already contains its special tokens.
        prompt_ids = tokenizer(prompts, add_special_tokens=not chat)["input_ids"]
        response_ids = tokenizer([r.strip() for r in batch[self.response_column]], add_special_tokens=False)[
            "input_ids"
        ]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        budget = self.max_length
        input_ids, labels = [], []
        for prompt, response in zip(prompt_ids, response_ids, strict=True):
            prompt, response = list(prompt), list(response) + eos
            if len(prompt) + len(response) > budget:
                reserve = min(len(response), budget // 2)
                prompt = prompt[-(budget - reserve) :] if len(prompt) > budget - reserve else prompt
                response = response[: budget - len(prompt)]
            input_ids.append(prompt + response)
            labels.append([IGNORE_INDEX] * len(prompt) + response)
        return {"input_ids": input_ids, "labels": labels}

    def collator(self, tokenizer) -> TaskCollator:
        """Batch collator padding to the longest sequence of the batch (left padding for `mc_causal`; `image_cls`
        stacks `pixel_values`, `tokenizer` may then be the image processor)."""
        if self.task_type == "image_cls":
            return TaskCollator(task_type=self.task_type, pad_token_id=0)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError(
                "The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first."
            )
        return TaskCollator(
            task_type=self.task_type,
            pad_token_id=pad_id,
            pad_token_type_id=getattr(tokenizer, "pad_token_type_id", 0) or 0,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )

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
        if self.task_type == "mc_causal":
            scores = multiple_choice_scores(
                model, inputs["input_ids"], inputs["attention_mask"], inputs["ending_mask"]
            )
            loss = F.cross_entropy(scores, inputs["labels"]) if "labels" in inputs else None
            return loss, scores
        outputs = model(**inputs)
        return outputs.loss, outputs.logits

    def predict(self, logits: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted class / choice per item (`causal_lm`: predicted next token per position)."""
        if isinstance(logits, torch.Tensor):
            logits = logits.detach().float().cpu().numpy()
        logits = np.asarray(logits)
        if self.task_type == "causal_lm" and logits.ndim == 2 and np.issubdtype(logits.dtype, np.integer):
            return logits  # already token ids (see `preprocess_logits_for_metrics`)
        return logits.argmax(axis=-1)

    def accuracy(self, logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
        """Accuracy; for `causal_lm` next-token accuracy over the response tokens (labels != -100)."""
        preds = self.predict(logits)
        labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if self.task_type == "causal_lm":
            # Position t predicts token t + 1.
            preds, labels = preds[:, :-1], labels[:, 1:]
            mask = labels != IGNORE_INDEX
            return float((preds[mask] == labels[mask]).mean()) if mask.any() else math.nan
        return float((preds == labels).mean()) if labels.size else math.nan

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
        if self.task_type == "causal_lm":
            return logits.argmax(dim=-1)
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
        total_loss, total_items, correct, counted = 0.0, 0, 0, 0
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
                preds = self.predict(logits)
                labels = batch["labels"].cpu().numpy()
                if self.task_type == "causal_lm":
                    shifted, target = preds[:, :-1], labels[:, 1:]
                    mask = target != IGNORE_INDEX
                    correct += int((shifted[mask] == target[mask]).sum())
                    counted += int(mask.sum())
                else:
                    correct += int((preds == labels).sum())
                    counted += n
        finally:
            model.train(was_training)
        return {
            "loss": total_loss / max(total_items, 1),
            "accuracy": correct / counted if counted else math.nan,
            "num_samples": float(total_items),
        }


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


def _innermost_model(model: torch.nn.Module) -> torch.nn.Module:
    # DDP / DeepSpeed engines keep the model in `.module`, torch.compile in `._orig_mod`, and a PeftModel forwards
    # **kwargs to the transformers model returned by `get_base_model()`.
    inner = model
    for _ in range(8):
        if isinstance(getattr(inner, "_orig_mod", None), torch.nn.Module):
            inner = inner._orig_mod
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
        elif hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        else:
            break
    return inner


def _forward_accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(_innermost_model(model).forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters


def multiple_choice_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    ending_mask: torch.Tensor,
) -> torch.Tensor:
    """Length-normalised log-likelihood of each ending under a causal LM.

    Args:
        input_ids, attention_mask, ending_mask: `(batch, num_choices, length)` tensors, left-padded (as produced
            by `TaskCollator` for `mc_causal`); `ending_mask` is 1 on the ending tokens.

    Returns:
        `(batch, num_choices)` float32 scores: for each choice, the mean over its ending tokens of
        `log p(token | all previous tokens)`.
    """
    batch_size, num_choices, length = input_ids.shape
    ids = input_ids.reshape(-1, length)
    attention = attention_mask.reshape(-1, length)
    endings = ending_mask.reshape(-1, length).bool()
    num_scored = int(endings.sum(dim=-1).max())
    if num_scored == 0:
        raise ValueError("ending_mask selects no token.")
    if num_scored >= length:
        raise ValueError("Every ending needs at least one context token before it.")
    kwargs: dict[str, Any] = {}
    if _forward_accepts(model, "position_ids"):
        # With left padding, positions must start at 0 on the first real token, as without padding.
        kwargs["position_ids"] = (attention.long().cumsum(dim=-1) - 1).clamp(min=0)
    elif not bool(attention.all()):
        warnings.warn(
            f"{type(_innermost_model(model)).__name__}.forward takes no position_ids: left-padded choices are "
            "scored with shifted positions.",
            stacklevel=2,
        )
    if _forward_accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = num_scored + 1
    logits = model(input_ids=ids, attention_mask=attention, **kwargs).logits
    # Endings are right-aligned: logits at positions [L-K-1, L-1) predict the tokens at [L-K, L).
    logits = logits[:, -(num_scored + 1) : -1].float()
    targets = ids[:, -num_scored:]
    mask = endings[:, -num_scored:]
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # masked_fill (not a product) so that any non-finite value at a padded position cannot leak into the sum.
    token_logp = token_logp.masked_fill(~mask, 0.0)
    scores = token_logp.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    return scores.view(batch_size, num_choices)
