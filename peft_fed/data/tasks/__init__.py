"""Task definitions: preprocessing, collation, loss and accuracy for the task types of peft-fed.

One class per task type, registered by name in `TASK_CLASSES`; `TaskSpec(task_type, ...)` builds the right one:

* `seq_cls` (`SequenceClassificationTask`): sequence classification (`AutoModelForSequenceClassification`), loss
  from the model.
* `mc_encoder` (`MultipleChoiceEncoderTask`): multiple choice with an encoder head (`AutoModelForMultipleChoice`,
  e.g. RoBERTa on HellaSwag); inputs of shape `(batch, num_choices, length)`, one `(context, ending)` pair per
  choice, loss from the model.
* `mc_causal` (`MultipleChoiceCausalTask`): multiple choice with a causal LM. Each ending is scored by its
  length-normalised log-likelihood, the mean log-probability of its tokens given the context; the loss is the
  cross-entropy over the `num_choices` scores and the prediction their argmax (`multiple_choice_scores`).
* `causal_lm` (`CausalLanguageModelingTask`): instruction tuning (`AutoModelForCausalLM`); the loss covers the
  response tokens only (prompt tokens get the label -100).
* `image_cls` (`ImageClassificationTask`): image classification (`AutoModelForImageClassification`, e.g. a ViT
  with LoRA on its attention); the "tokenizer" is the model's image processor, applied on the fly
  (`Dataset.with_transform`) because resized pixel tensors of a whole dataset would not fit in memory; loss from
  the model.

Adding a task type is one subclass of `TaskSpec` decorated with `@register_task("<name>")` (see `base.py`) in a
module imported below.

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

from .base import DEFAULT_PROMPT_TEMPLATE, IGNORE_INDEX, TASK_CLASSES, TaskSpec, register_task
from .collators import MultipleChoiceCausalCollator

# Importing a task module registers its classes; the import order is the order of TASK_TYPES.
# isort: off
from .classification import SequenceClassificationTask
from .multiple_choice import MultipleChoiceCausalTask, MultipleChoiceEncoderTask, multiple_choice_scores
from .causal_lm import CausalLanguageModelingTask
from .image import ImageClassificationTask

# isort: on

# The task-type tables are derived from the registered classes.
TASK_TYPES: tuple[str, ...] = tuple(TASK_CLASSES)
CLASSIFICATION_TASK_TYPES: tuple[str, ...] = tuple(t for t in TASK_TYPES if TASK_CLASSES[t].is_classification)
# PEFT task type per task (`peft.TaskType` value); PEFT has none for multiple choice or images, so `mc_encoder` and
# `image_cls` use the generic `PeftModel` (task_type=None) and rely on `modules_to_save` for their head.
PEFT_TASK_TYPES: dict[str, str | None] = {t: TASK_CLASSES[t].peft_task_type for t in TASK_TYPES}

__all__ = [
    "CLASSIFICATION_TASK_TYPES",
    "DEFAULT_PROMPT_TEMPLATE",
    "IGNORE_INDEX",
    "PEFT_TASK_TYPES",
    "TASK_CLASSES",
    "TASK_TYPES",
    "CausalLanguageModelingTask",
    "ImageClassificationTask",
    "MultipleChoiceCausalCollator",
    "MultipleChoiceCausalTask",
    "MultipleChoiceEncoderTask",
    "SequenceClassificationTask",
    "TaskSpec",
    "multiple_choice_scores",
    "register_task",
]
