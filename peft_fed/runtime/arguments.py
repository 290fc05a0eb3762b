"""Arguments of a federated run: ``transformers.TrainingArguments`` plus the federation's own."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

ROUND_LR_SCHEDULES = ("constant", "cosine", "linear")
PARALLEL_MODES = ("auto", "clients", "data")


@dataclass
class FederatedTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for :class:`~peft_fed.FederatedTrainer`.

    The inherited fields configure each client's *local* training (optimizer, batch size, gradient
    accumulation, mixed precision, gradient checkpointing, DeepSpeed, ``report_to``...). ``learning_rate``
    is the round-0 learning rate; ``round_lr_scheduler`` moves it across rounds while the Trainer's own
    ``lr_scheduler_type`` shapes it within a client's local steps.

    Example:

        >>> args = FederatedTrainingArguments(output_dir="out", method="fedsmoothlora", num_rounds=10,
        ...                                   clients_per_round=3, local_steps=20, learning_rate=5e-4)
    """

    method: str = field(default="fedsmoothlora", metadata={"help": "Federated method (see peft_fed.STRATEGIES)."})
    num_rounds: int = field(default=10, metadata={"help": "Communication rounds."})
    clients_per_round: int | None = field(
        default=None, metadata={"help": "Clients sampled per round (default: all, or client_fraction)."}
    )
    client_fraction: float | None = field(
        default=None, metadata={"help": "Fraction of clients sampled per round, in (0, 1]; exclusive with clients_per_round."}
    )
    local_steps: int | None = field(
        default=10, metadata={"help": "Optimizer steps per client per round (exclusive with local_epochs)."}
    )
    local_epochs: float | None = field(
        default=None, metadata={"help": "Passes over its own data per client per round (exclusive with local_steps)."}
    )
    round_lr_scheduler: str = field(
        default="constant", metadata={"help": f"Learning rate across rounds: one of {ROUND_LR_SCHEDULES}."}
    )
    round_lr_min_ratio: float = field(
        default=0.0, metadata={"help": "Final learning rate as a fraction of learning_rate (cosine, linear)."}
    )
    eval_every: int = field(default=1, metadata={"help": "Evaluate the global model every this many rounds (0: only at the end)."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint the whole federated state every this many rounds (0: never)."})
    resume: bool = field(default=False, metadata={"help": "Resume from the last checkpoint under output_dir/checkpoints."})
    invalid_upload: str = field(
        default="drop", metadata={"help": "'drop' an invalid client upload (NaN, wrong shape) or 'raise'."}
    )
    parallel_mode: str = field(
        default="auto",
        metadata={
            "help": "'clients': each process trains different clients (no gradient sync); 'data': all processes "
            "train each client together (data parallel; required by DeepSpeed ZeRO-3); 'auto': data under "
            "DeepSpeed, clients otherwise."
        },
    )
    gradient_estimation_batches: int | None = field(
        default=None,
        metadata={"help": "FedSmoothLoRA gradient-estimation batches N_ga (default: the PEFT config's, else 8)."},
    )
    method_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Hyperparameters of the method (override the PEFT config's)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if self.clients_per_round is not None and self.client_fraction is not None:
            raise ValueError("give clients_per_round or client_fraction, not both")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {self.clients_per_round}")
        if self.client_fraction is not None and not 0.0 < self.client_fraction <= 1.0:
            raise ValueError(f"client_fraction must be in (0, 1], got {self.client_fraction}")
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("give exactly one of local_steps and local_epochs (set the other to None)")
        if self.local_steps is not None and self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if self.local_epochs is not None and self.local_epochs <= 0:
            raise ValueError(f"local_epochs must be positive, got {self.local_epochs}")
        if self.round_lr_scheduler not in ROUND_LR_SCHEDULES:
            raise ValueError(f"round_lr_scheduler must be one of {ROUND_LR_SCHEDULES}, got {self.round_lr_scheduler!r}")
        if not 0.0 <= self.round_lr_min_ratio <= 1.0:
            raise ValueError(f"round_lr_min_ratio must be in [0, 1], got {self.round_lr_min_ratio}")
        if self.eval_every < 0 or self.save_every < 0:
            raise ValueError("eval_every and save_every must be >= 0")
        if self.invalid_upload not in ("drop", "raise"):
            raise ValueError(f"invalid_upload must be 'drop' or 'raise', got {self.invalid_upload!r}")
        if self.parallel_mode not in PARALLEL_MODES:
            raise ValueError(f"parallel_mode must be one of {PARALLEL_MODES}, got {self.parallel_mode!r}")
        if self.gradient_estimation_batches is not None and self.gradient_estimation_batches < 1:
            raise ValueError("gradient_estimation_batches must be >= 1")

    def round_learning_rate(self, round_index: int) -> float:
        """The learning rate of round ``round_index`` (0-based) under ``round_lr_scheduler``."""
        if self.round_lr_scheduler == "constant" or self.num_rounds == 1:
            return self.learning_rate
        progress = round_index / (self.num_rounds - 1)
        low = self.learning_rate * self.round_lr_min_ratio
        if self.round_lr_scheduler == "cosine":
            return low + 0.5 * (self.learning_rate - low) * (1 + math.cos(math.pi * progress))
        return self.learning_rate - (self.learning_rate - low) * progress
