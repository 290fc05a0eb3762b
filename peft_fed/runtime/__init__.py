"""Runtimes that drive the strategies: the Accelerate-driven FederatedTrainer and its helpers."""

from .arguments import FederatedTrainingArguments
from .client import ClientRoundResult, run_client_round
from .trainer import FederatedTrainer

__all__ = ["ClientRoundResult", "FederatedTrainer", "FederatedTrainingArguments", "run_client_round"]
