"""`causal_lm`: instruction tuning (`AutoModelForCausalLM`); the loss covers the response tokens only."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from transformers import DataCollatorForSeq2Seq

from .base import IGNORE_INDEX, TaskSpec, _logits_numpy, register_task
from .collators import SelectKeys, right_padding


@register_task("causal_lm")
class CausalLanguageModelingTask(TaskSpec):
    """Prompt (chat template or `prompt_template`) + response; prompt tokens get the label -100."""

    peft_task_type: ClassVar[str | None] = "CAUSAL_LM"

    def __post_init__(self) -> None:
        super().__post_init__()
        if "{instruction}" not in self.prompt_template:
            raise ValueError("prompt_template must contain the '{instruction}' placeholder.")

    @property
    def required_columns(self) -> list[str]:
        return [self.instruction_column, self.response_column]

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

    def _preprocess_batch(self, batch: dict[str, list], tokenizer) -> dict[str, list]:
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

    def collator(self, tokenizer) -> SelectKeys:
        # DataCollatorForSeq2Seq pads per-token `labels` with -100 to the padded input length (works for decoder-only
        # batches too); DataCollatorForLanguageModeling(mlm=False) would relabel the prompt tokens.
        keys = (*self.model_input_names, "token_type_ids")
        return right_padding(
            DataCollatorForSeq2Seq,
            tokenizer,
            keys,
            pad_to_multiple_of=self.pad_to_multiple_of,
            label_pad_token_id=IGNORE_INDEX,
        )

    def predict(self, logits: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted next token per position (`logits` may already be token ids, see
        `preprocess_logits_for_metrics`)."""
        logits = _logits_numpy(logits)
        if logits.ndim == 2 and np.issubdtype(logits.dtype, np.integer):
            return logits
        return logits.argmax(axis=-1)

    def scored_pairs(self, preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Position t predicts token t + 1; only response tokens (labels != -100) count.
        preds, labels = preds[:, :-1], labels[:, 1:]
        mask = labels != IGNORE_INDEX
        return preds[mask], labels[mask]

    def preprocess_logits_for_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().preprocess_logits_for_metrics(logits, labels).argmax(dim=-1)

    preprocess_logits_for_metrics.__doc__ = TaskSpec.preprocess_logits_for_metrics.__doc__
