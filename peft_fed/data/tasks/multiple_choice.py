"""Multiple-choice task types: `mc_encoder` (an encoder with a multiple-choice head) and `mc_causal` (a causal LM
scoring each ending by its length-normalised log-likelihood)."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import DataCollatorForMultipleChoice

from .base import TaskSpec, register_task
from .collators import MultipleChoiceCausalCollator, SelectKeys, right_padding


class _MultipleChoiceTask(TaskSpec):
    """A context and `num_choices` endings per item; the label is the index of the correct ending."""

    is_multiple_choice: ClassVar[bool] = True

    @property
    def required_columns(self) -> list[str]:
        return [self.context_column, self.endings_column, self.label_column]

    def _endings(self, batch: dict[str, list]) -> list[list[str]]:
        endings = [list(e) for e in batch[self.endings_column]]
        wrong = {len(e) for e in endings if len(e) != self.num_choices}
        if wrong:
            raise ValueError(
                f"Items with {sorted(wrong)} endings; this task expects num_choices={self.num_choices}."
            )
        return endings


@register_task("mc_encoder")
class MultipleChoiceEncoderTask(_MultipleChoiceTask):
    """`AutoModelForMultipleChoice` (e.g. RoBERTa on HellaSwag): inputs of shape `(batch, num_choices, length)`, one
    `(context, ending)` pair per choice; loss from the model. PEFT has no task type for it (generic `PeftModel`,
    the head in `modules_to_save`)."""

    def _preprocess_batch(self, batch: dict[str, list], tokenizer) -> dict[str, list]:
        contexts = batch[self.context_column]
        endings = self._endings(batch)
        n, c = len(contexts), self.num_choices
        first = [ctx for ctx in contexts for _ in range(c)]
        second = [e for row in endings for e in row]
        encoded = tokenizer(first, second, truncation=True, max_length=self.max_length)
        out = {k: [list(v[i * c : (i + 1) * c]) for i in range(n)] for k, v in encoded.items()}
        out["labels"] = [self._label_id(v) for v in batch[self.label_column]]
        return out

    def collator(self, tokenizer) -> SelectKeys:
        keys = (*self.model_input_names, "token_type_ids")
        return right_padding(DataCollatorForMultipleChoice, tokenizer, keys, pad_to_multiple_of=self.pad_to_multiple_of)


@register_task("mc_causal")
class MultipleChoiceCausalTask(_MultipleChoiceTask):
    """Multiple choice with a causal LM: each ending is scored by the mean log-probability of its tokens given the
    context (`multiple_choice_scores`); the loss is the cross-entropy over the `num_choices` scores and the
    prediction their argmax."""

    peft_task_type: ClassVar[str | None] = "CAUSAL_LM"
    needs_custom_loss: ClassVar[bool] = True
    model_input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "ending_mask", "labels")

    def _preprocess_batch(self, batch: dict[str, list], tokenizer) -> dict[str, list]:
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

    def collator(self, tokenizer) -> MultipleChoiceCausalCollator:
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError(
                "The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first."
            )
        return MultipleChoiceCausalCollator(
            pad_token_id=pad_id,
            pad_token_type_id=getattr(tokenizer, "pad_token_type_id", 0) or 0,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = multiple_choice_scores(model, inputs["input_ids"], inputs["attention_mask"], inputs["ending_mask"])
        loss = F.cross_entropy(scores, inputs["labels"]) if "labels" in inputs else None
        return loss, scores

    compute_loss.__doc__ = TaskSpec.compute_loss.__doc__


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
            by `MultipleChoiceCausalCollator` for `mc_causal`); `ending_mask` is 1 on the ending tokens.

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
