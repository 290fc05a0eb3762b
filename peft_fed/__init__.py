"""peft-fed: federated LoRA fine-tuning for Hugging Face PEFT.

Importing ``peft_fed`` registers its PEFT config types, so ``get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` handle :class:`FedSmoothLoraConfig` and :class:`SubspaceRegLoraConfig`
like any PEFT method.

The import itself is cheap (no torch, PEFT or transformers): the public names below load their module on
first use (PEP 562), and the registration runs at once when PEFT is already imported, otherwise as soon as
anything imports it (a post-import hook on ``peft``). So ``peft-fed --help`` answers in a moment, and
``import peft_fed; from peft import PeftModel`` still loads a saved FedSmoothLoRA adapter with its own type.
"""

from __future__ import annotations

import importlib

import wrapt

from ._lazy import lazy_module_attributes

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "LowRank": ".linalg",
    "Broadcast": ".state",
    "ClientStart": ".state",
    "ClientState": ".state",
    "LayerSpec": ".state",
    "ServerState": ".state",
    "Upload": ".state",
    "STRATEGIES": ".strategies",
    "Strategy": ".strategies",
    "get_strategy": ".strategies",
    "method_hyperparameters": ".strategies",
    "FedSmoothLoraConfig": ".tuners",
    "SubspaceRegLoraConfig": ".tuners",
    "config_from_dict": ".tuners",
    "peft_config_class": ".tuners",
    "register_peft_fed_types": ".tuners",
    "validate_fedsmooth_ranks": ".tuners",
    "validate_subspace_reg_ranks": ".tuners",
    "FederatedTrainer": ".runtime",
    "FederatedTrainingArguments": ".runtime",
}


__getattr__, __dir__ = lazy_module_attributes(__name__, globals(), _LAZY)


def _register_with_peft(_peft_module=None) -> None:
    """Register the PEFT config types (importing ``peft_fed.tuners`` does it; idempotent)."""
    importlib.import_module(".tuners", __name__)


# At once when PEFT is already imported, else right after something imports it (wrapt's post-import hooks,
# the well-kept implementation of exactly this).
wrapt.register_post_import_hook(_register_with_peft, "peft")

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
    "__version__",
    "config_from_dict",
    "get_strategy",
    "method_hyperparameters",
    "peft_config_class",
    "register_peft_fed_types",
    "validate_fedsmooth_ranks",
    "validate_subspace_reg_ranks",
]
