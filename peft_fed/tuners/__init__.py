"""PEFT-native config types of peft-fed's federated LoRA methods, and their registration with PEFT.

Importing this package registers the types (idempotent), so a saved FedSmoothLoRA or Subspace-Reg adapter
loads back with its own config class through PEFT's loaders. See docs/design.md (section "Registration with PEFT").
"""

from .base import FederatedLoraConfig
from .fedsmooth_lora import FedSmoothLoraConfig, validate_fedsmooth_ranks
from .layer_shapes import AdaptedLayerShape, find_adapted_layers
from .registration import (
    FEDERATED_METHOD_FIELD,
    config_from_dict,
    get_federated_config_class,
    peft_fed_hooks_installed,
    register_federated_config,
    register_peft_fed_types,
    registered_federated_methods,
)
from .subspace_reg_lora import SubspaceRegLoraConfig, validate_subspace_reg_ranks

register_peft_fed_types()

__all__ = [
    "FEDERATED_METHOD_FIELD",
    "AdaptedLayerShape",
    "FedSmoothLoraConfig",
    "FederatedLoraConfig",
    "SubspaceRegLoraConfig",
    "config_from_dict",
    "find_adapted_layers",
    "get_federated_config_class",
    "peft_fed_hooks_installed",
    "register_federated_config",
    "register_peft_fed_types",
    "registered_federated_methods",
    "validate_fedsmooth_ranks",
    "validate_subspace_reg_ranks",
]
