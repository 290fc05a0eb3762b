"""The one round engine every runtime drives (no transformers import): see :mod:`peft_fed.engine.rounds`."""

from .client_store import ClientStateStore
from .rounds import (
    ClientExecutor,
    ClientRecord,
    ClientTask,
    RoundEngine,
    RoundHooks,
    client_seed,
    inter_round_loss_jumps,
    step_loss_summary,
)

__all__ = [
    "ClientExecutor",
    "ClientRecord",
    "ClientStateStore",
    "ClientTask",
    "RoundEngine",
    "RoundHooks",
    "client_seed",
    "inter_round_loss_jumps",
    "step_loss_summary",
]
