"""How a method declares its hyperparameters: once, as a dataclass, next to its strategy.

Each strategy class names a ``Hyperparameters`` dataclass (fields with defaults and ``metadata["help"]``,
validation in ``__post_init__``). Everything else is derived from it:

* the strategy's constructor keywords (``FedSmoothLoRA(specs, zeta=0.5)``);
* the PEFT config type, for methods that have one (``FedSmoothLoraConfig`` subclasses both ``LoraConfig``
  and ``FedSmoothLoRAHyperparameters``, so its extra fields, their docs and their checks are these);
* the CLI flags and YAML keys of ``peft-fed train`` (``peft_fed.cli`` reads the fields and their help).

The checks below are plain Python (no torch, no PEFT), so a CLI can validate a value before any model loads.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from typing import Any, Literal

SVD_METHODS = ("auto", "full", "randomized")


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float:
    """``value`` as a finite float within the bounds, or a ``ValueError`` that names the field."""
    # bool is an int subclass; True as a hyperparameter value is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    if minimum is not None:
        if exclusive_minimum and value <= minimum:
            raise ValueError(f"`{name}` must be > {minimum}, got {value}.")
        if not exclusive_minimum and value < minimum:
            raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {value}.")
    return value


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or a ``ValueError`` that names the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return value


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


@dataclass
class NoHyperparameters:
    """The method has no hyperparameters of its own."""

    def validate_hyperparameters(self) -> None:
        """Check (and normalise) every field; raise one ``ValueError`` naming the first bad one."""

    def __post_init__(self) -> None:
        self.validate_hyperparameters()


@dataclass
class SvdHyperparameters(NoHyperparameters):
    """For methods that take SVDs of full layer-sized matrices on a client or at initialisation."""

    svd_method: Literal["auto", "full", "randomized"] = field(
        default="auto",
        metadata={
            "help": (
                "SVD of layer-sized matrices: 'full' (torch.linalg.svd), 'randomized' (torch.svd_lowrank) or "
                "'auto' (randomized for large layers with a small rank, full otherwise)."
            )
        },
    )

    def validate_hyperparameters(self) -> None:
        super().validate_hyperparameters()
        self.svd_method = check_choice("svd_method", self.svd_method, SVD_METHODS)


def hyperparameter_names(hyperparameters_cls: type) -> list[str]:
    """The field names of a ``Hyperparameters`` dataclass, in declaration order."""
    return [f.name for f in fields(hyperparameters_cls)]


def hyperparameter_values(hyperparameters_cls: type, source: Any) -> dict[str, Any]:
    """The values ``source`` (e.g. a typed PEFT config) holds for the fields of ``hyperparameters_cls``."""
    return {name: getattr(source, name) for name in hyperparameter_names(hyperparameters_cls) if hasattr(source, name)}
