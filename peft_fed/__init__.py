"""peft-fed: federated LoRA fine-tuning for Hugging Face PEFT.

Importing ``peft_fed`` registers its PEFT config types, so ``get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` handle :class:`FedSmoothLoraConfig` and :class:`SubspaceRegLoraConfig`
like any PEFT method.
"""

from .linalg import LowRank
from .state import Broadcast, ClientStart, ClientState, LayerSpec, ServerState, Upload
from .strategies import STRATEGIES, Strategy, get_strategy
from .tuners import (
    FedSmoothLoraConfig,
    SubspaceRegLoraConfig,
    config_from_dict,
    register_peft_fed_types,
    validate_fedsmooth_ranks,
    validate_subspace_reg_ranks,
)

register_peft_fed_types()  # idempotent; importing peft_fed.tuners already ran it

__version__ = "0.1.0"


def __getattr__(name: str):
    # The runtime pulls in transformers' Trainer; load it only when asked for.
    if name in ("FederatedTrainer", "FederatedTrainingArguments"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'peft_fed' has no attribute {name!r}")


__all__ = [
    "Broadcast",
    "ClientStart",
    "ClientState",
    "FedSmoothLoraConfig",
    "FederatedTrainer",
    "FederatedTrainingArguments",
    "LayerSpec",
    "LowRank",
    "STRATEGIES",
    "ServerState",
    "Strategy",
    "SubspaceRegLoraConfig",
    "Upload",
    "config_from_dict",
    "get_strategy",
    "register_peft_fed_types",
    "validate_fedsmooth_ranks",
    "validate_subspace_reg_ranks",
]
