"""Shared base of peft-fed's PEFT-native configs: a ``LoraConfig`` that names its federated method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peft import LoraConfig
from torch import nn

from ..strategies.hyperparameters import check_int
from .layer_shapes import AdaptedLayerShape
from .registration import (
    FEDERATED_METHOD_FIELD,
    instantiate_config,
    is_lora_peft_type,
    peft_from_peft_type,
    resolve_config_class,
)


@dataclass
class FederatedLoraConfig(LoraConfig):
    """A ``LoraConfig`` for a federated method: plain LoRA layers plus the method's hyperparameters.

    A subclass also inherits its method's ``Hyperparameters`` dataclass (``strategies/<method>.py``), so the
    extra fields, their documentation and their validation are declared once, beside the strategy.
    The adapted layers are ordinary PEFT LoRA layers (``peft_type`` stays ``LORA``), so everything PEFT does
    with a LoRA adapter works unchanged; the federated behaviour lives in peft-fed's strategy layer, which
    reads the extra fields. Subclasses set ``FEDERATED_METHOD`` and give ``federated_method`` that default.

    Args:
        federated_method (`str`):
            The federated method this adapter belongs to. Written to ``adapter_config.json``; after
            ``import peft_fed``, PEFT's loaders use it to rebuild the right config class. Fixed per class.
    """

    FEDERATED_METHOD: ClassVar[str] = ""

    federated_method: str = field(
        default="",
        metadata={
            "help": (
                "The federated method this adapter belongs to (fixed per config class). Saved in "
                "adapter_config.json so that, once peft_fed is imported, PEFT loads the adapter's config as the "
                "right peft-fed class; PEFT without peft_fed ignores it and loads a plain LoRA adapter."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.FEDERATED_METHOD:
            raise TypeError(
                f"{type(self).__name__} is a base class; use FedSmoothLoraConfig or SubspaceRegLoraConfig."
            )
        if self.federated_method != self.FEDERATED_METHOD:
            raise ValueError(
                f"`federated_method` of {type(self).__name__} is always {self.FEDERATED_METHOD!r}, got "
                f"{self.federated_method!r}. To load a saved config of another method, use "
                "PeftConfig.from_pretrained (it picks the class from this field)."
            )
        # PEFT's __post_init__ does not chain to the hyperparameters' own, so validate them here
        self.validate_hyperparameters()
        check_int("r", self.r, minimum=1)
        for pattern, rank in (self.rank_pattern or {}).items():
            check_int(f"rank_pattern[{pattern!r}]", rank, minimum=1)
        if self.use_dora:
            # DoRA rescales W + s*B@A by a learned magnitude; the methods' algebra assumes the layer computes
            # exactly W + s*B@A.
            raise ValueError(
                f"{type(self).__name__} needs plain LoRA layers; `use_dora=True` is not supported."
            )

    @property
    def max_rank(self) -> int:
        """The largest rank any layer gets (``r`` or a ``rank_pattern`` value)."""
        return max([self.r, *(self.rank_pattern or {}).values()])

    def validate_model(self, model: nn.Module) -> list[AdaptedLayerShape] | None:
        """Check the config against ``model``'s layer shapes; raise ``ValueError`` if it cannot work.

        Called automatically by ``get_peft_model``/``PeftModel.from_pretrained`` once peft_fed is imported
        (through the pre-injection hook, before any layer is replaced). The base class has no shape constraint.
        """
        return None

    # Called by the wrapped LoraModel._prepare_model (registration.PRE_INJECTION_HOOK names it).
    def _peft_fed_check_model(self, model: nn.Module) -> None:
        self.validate_model(model)

    @classmethod
    def from_peft_type(cls, **kwargs):
        """Build a config from saved kwargs, honouring the ``federated_method`` marker.

        PEFT's version looks the class up by ``peft_type``, which for our configs is ``LORA``: without this
        override ``FedSmoothLoraConfig.from_pretrained(path)`` would return a plain ``LoraConfig``.
        A LoRA dict without a marker is adopted as ``cls`` (the method's hyperparameters at their defaults);
        a marker naming another registered method yields that method's class, as ``peft_type`` would in PEFT;
        anything else goes through PEFT's own rules.
        """
        if is_lora_peft_type(kwargs.get("peft_type")) and FEDERATED_METHOD_FIELD not in kwargs:
            return instantiate_config(cls, kwargs)
        config_cls = resolve_config_class(kwargs)
        if config_cls is not None:
            return instantiate_config(config_cls, kwargs)
        return peft_from_peft_type()(cls, **kwargs)
