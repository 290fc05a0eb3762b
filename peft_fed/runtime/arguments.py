"""Arguments of a federated run: ``transformers.TrainingArguments`` plus the federation's own.

The federation's fields are declared once, in :class:`~peft_fed.runtime.run_arguments.FederatedArguments`
(importable without transformers, so the command line checks them before loading anything heavy);
:class:`FederatedTrainingArguments` inherits them. The model, data, LoRA and export settings of a whole run
are the other dataclasses of :mod:`peft_fed.runtime.run_arguments`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType

from .run_arguments import PARALLEL_MODES, ROUND_LR_SCHEDULES, FederatedArguments

__all__ = ["FederatedTrainingArguments", "PARALLEL_MODES", "ROUND_LR_SCHEDULES"]


@dataclass
class FederatedTrainingArguments(FederatedArguments, TrainingArguments):
    """``TrainingArguments`` for :class:`~peft_fed.FederatedTrainer`.

    The inherited fields configure each client's *local* training (optimizer, batch size, gradient
    accumulation, mixed precision, gradient checkpointing, DeepSpeed, ``report_to``...). ``learning_rate``
    is the round-0 learning rate; ``round_lr_scheduler`` moves it across rounds while the Trainer's own
    ``lr_scheduler_type`` shapes it within a client's local steps (``constant`` by default: a client's local
    schedule restarts every round, so a decaying one would mostly train at its start).

    The defaults are those of ``peft-fed train`` (the offline default run), so the Python API and the command
    line agree: 10 rounds, 3 clients per round, 8 local steps, learning rate 1e-3, batch 8 (eval 32).

    Example:

        >>> args = FederatedTrainingArguments(output_dir="out", method="fedsmoothlora", num_rounds=10,
        ...                                   clients_per_round=3, local_steps=20, learning_rate=5e-4)
    """

    # TrainingArguments fields whose default differs for federated LoRA (one default, here)
    output_dir: str | None = field(default="runs/default", metadata={"help": "Where metrics, checkpoints and final/ go."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of round 0 (AdamW by default)."})
    lr_scheduler_type: SchedulerType | str = field(
        default="constant",
        metadata={
            "help": "Schedule within each client's local steps. Default constant: a client's local schedule "
            "restarts every round; use round_lr_scheduler to decay across rounds."
        },
    )
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Batch size of the global evaluation."})
    # saving, logging and evaluation happen once per round (save_every, eval_every, one log per round), never
    # inside a client's local steps
    save_strategy: SaveStrategy | str = field(
        default="no", metadata={"help": "Per-step checkpoints do not apply; use save_every (rounds)."}
    )
    logging_strategy: IntervalStrategy | str = field(
        default="no", metadata={"help": "Per-step logs do not apply: one log per round goes to report_to."}
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep the dataset columns the task collators read (the model's signature does not name them)."},
    )

    def __post_init__(self) -> None:
        self.validate_federation()  # our checks first: one-line errors before transformers' own
        TrainingArguments.__post_init__(self)
        import torch

        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs a GPU (torch warns on every loader otherwise)

    def round_learning_rate(self, round_index: int) -> float:
        """The learning rate of round ``round_index`` (0-based) under ``round_lr_scheduler``."""
        if self.round_lr_scheduler == "constant" or self.num_rounds == 1:
            return self.learning_rate
        progress = round_index / (self.num_rounds - 1)
        low = self.learning_rate * self.round_lr_min_ratio
        if self.round_lr_scheduler == "cosine":
            return low + 0.5 * (self.learning_rate - low) * (1 + math.cos(math.pi * progress))
        return self.learning_rate - (self.learning_rate - low) * progress
