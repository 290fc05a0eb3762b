"""Federated LoRA methods behind one interface (:class:`Strategy`), one file per method."""

from .base import (
    AggregationError,
    AggregationResult,
    GradientFn,
    InvalidUploadError,
    NoValidUploadsError,
    Strategy,
)
from .fedex_lora import FedExLoRA
from .fedit import FedIT
from .fedsa_lora import FedSALoRA
from .fedsmoothlora import FedSmoothLoRA
from .fedsvd import FedSVD
from .ffa_lora import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .frlora import FRLoRA
from .hyperparameters import NoHyperparameters
from .registry import STRATEGIES, build_strategy, canonical_method_name, get_strategy, method_hyperparameters
from .subspace_reg import SubspaceReg

__all__ = [
    "AggregationError",
    "AggregationResult",
    "GradientFn",
    "InvalidUploadError",
    "NoValidUploadsError",
    "Strategy",
    "STRATEGIES",
    "canonical_method_name",
    "build_strategy",
    "get_strategy",
    "method_hyperparameters",
    "NoHyperparameters",
    "FedIT",
    "FFALoRA",
    "FedSALoRA",
    "FLoRA",
    "FedExLoRA",
    "FlexLoRA",
    "FedSVD",
    "FRLoRA",
    "FedSmoothLoRA",
    "SubspaceReg",
]
