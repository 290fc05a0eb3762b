"""Name -> strategy class, and the one function that builds a strategy by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..state import LayerSpec
from .base import Strategy
from .fedex_lora import FedExLoRA
from .fedit import FedIT
from .fedsa_lora import FedSALoRA
from .fedsmoothlora import FedSmoothLoRA
from .fedsvd import FedSVD
from .ffa_lora import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .frlora import FRLoRA
from .subspace_reg import SubspaceReg

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedIT, FFALoRA, FedSALoRA, FLoRA, FedExLoRA, FlexLoRA, FedSVD, FRLoRA, FedSmoothLoRA, SubspaceReg)
}

# Spellings users type; the canonical names are the keys of STRATEGIES.
ALIASES = {"fedavg": "fedit", "fedavg_lora": "fedit", "svd": "flexlora", "fedsmooth": "fedsmoothlora"}


def canonical_method_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in STRATEGIES:
        raise ValueError(f"unknown federated method {name!r}; choose one of {sorted(STRATEGIES)}")
    return key


def method_hyperparameters(name: str) -> type:
    """The dataclass of method ``name``'s hyperparameters (fields, defaults, help; validation on construction)."""
    return STRATEGIES[canonical_method_name(name)].Hyperparameters


def get_strategy(name: str, specs: Mapping[str, LayerSpec], **hyperparameters) -> Strategy:
    """Build the strategy ``name`` for the given layers; unknown hyperparameters raise ``TypeError``."""
    return STRATEGIES[canonical_method_name(name)](specs, **hyperparameters)


def build_strategy(
    name: str,
    specs: Mapping[str, LayerSpec],
    *,
    hyperparameter_source: Any = None,
    overrides: Mapping[str, Any] | None = None,
    **common: Any,
) -> Strategy:
    """Build method ``name`` the way every runtime does.

    Its hyperparameters are read from ``hyperparameter_source`` (any object with attributes of those names,
    e.g. the method's typed PEFT config), then ``overrides`` win; ``common`` are the keywords every strategy
    takes (``seed``, ``invalid_upload``, ``num_rounds``, ``dtype``).
    """
    from .hyperparameters import hyperparameter_values

    cls = STRATEGIES[canonical_method_name(name)]
    hyperparameters = hyperparameter_values(cls.Hyperparameters, hyperparameter_source) if hyperparameter_source else {}
    hyperparameters.update(overrides or {})
    return cls(specs, **common, **hyperparameters)
