"""PEFT-native config types of peft-fed's federated LoRA methods, and their registration with PEFT.

Importing this package registers the types (idempotent), so a saved FedSmoothLoRA or Subspace-Reg adapter
loads back with its own config class through PEFT's loaders. See docs/design.md (section "Registration with PEFT").
"""

from .base import FederatedLoraConfig
from .fedsmooth_lora import FedSmoothLoraConfig, validate_fedsmooth_ranks
from .layer_shapes import AdaptedLayerShape, find_adapted_layers
from .registration import (
    FEDERATED_METHOD_FIELD,
    PeftFedCompatibilityWarning,
    config_from_dict,
    get_federated_config_class,
    peft_fed_hooks_installed,
    register_federated_config,
    register_peft_fed_types,
    registered_federated_methods,
)
from .subspace_reg_lora import SubspaceRegLoraConfig, validate_subspace_reg_ranks

register_peft_fed_types()


def peft_config_class(method: str) -> type:
    """The PEFT config type of a federated method: its typed config (``FedSmoothLoraConfig``,
    ``SubspaceRegLoraConfig``) where it registered one, ``peft.LoraConfig`` for the others."""
    from peft import LoraConfig

    from ..strategies import canonical_method_name

    return get_federated_config_class(canonical_method_name(method)) or LoraConfig


__all__ = [
    "FEDERATED_METHOD_FIELD",
    "PeftFedCompatibilityWarning",
    "AdaptedLayerShape",
    "FedSmoothLoraConfig",
    "FederatedLoraConfig",
    "SubspaceRegLoraConfig",
    "config_from_dict",
    "find_adapted_layers",
    "get_federated_config_class",
    "peft_config_class",
    "peft_fed_hooks_installed",
    "register_federated_config",
    "register_peft_fed_types",
    "registered_federated_methods",
    "validate_fedsmooth_ranks",
    "validate_subspace_reg_ranks",
]
