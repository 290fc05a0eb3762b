"""Which layers a LoRA config adapts in a model, with the shape of each layer's weight matrix and its rank.

Federated methods act on the per-layer matrix ``W`` (out ``m`` x in ``n``) and need rank constraints that
PEFT's ``LoraConfig`` cannot check on its own because it never sees the model: FedSmoothLoRA's
gradient-aligned initialisation uses singular vectors ``r+1..2r`` of the ``m x n`` gradient (``2r <= min(m, n)``),
and Subspace-Reg's server factorisation gives ``B_g`` ``r`` orthonormal columns (``r <= min(m, n)``).
The matching rules here are PEFT's own (``check_target_module_exists``, ``rank_pattern`` lookup, the
``all-linear`` shorthand and the per-architecture default target modules), so the layers we check are
exactly the layers ``get_peft_model`` adapts.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

# the module, not its names: importing peft_bridge imports PEFT, whose import hook registers these tuners while
# peft_bridge is still half-initialised
from .. import peft_bridge

try:
    from peft.utils.other import get_pattern_key
except ImportError:  # PEFT < 0.14 inlined this rule in LoraModel._create_and_replace

    def get_pattern_key(pattern_keys, key_to_match: str) -> str:
        for key in pattern_keys:
            if re.match(rf"(.*\.)?({key})$", key_to_match):
                return key
        return key_to_match


@dataclass(frozen=True)
class AdaptedLayerShape:
    """One layer a LoRA config adapts.

    Attributes:
        name: module name in the base model (the key PEFT matches ``target_modules`` against).
        layer_type: class name of the base layer (``Linear``, ``Conv1D``, ...).
        out_features: ``m``, rows of the weight matrix in the ``W = out x in`` orientation LoRA uses
            (``delta W = B @ A`` with ``B`` ``m x r``), whatever the layer's storage layout.
        in_features: ``n``, columns of that matrix.
        r: the LoRA rank of this layer (``rank_pattern`` applied).
    """

    name: str
    layer_type: str
    out_features: int
    in_features: int
    r: int

    @property
    def min_dim(self) -> int:
        return min(self.out_features, self.in_features)


def _matrix_shape(layer: nn.Module) -> tuple[int, int] | None:
    """``(m, n)`` of the matrix LoRA adapts in ``layer``, or ``None`` for a layer type peft-fed cannot handle.

    Only the types ``peft_bridge`` reads and writes (``SUPPORTED_BASE_LAYERS``: ``nn.Linear``, quantized
    subclasses included, and transformers' ``Conv1D``) have a shape here; an ``nn.Embedding`` or Conv target is
    refused up front rather than failing in ``set_factors`` or having its ``lora_embedding_A/B`` averaged like
    a head. transformers' ``Conv1D`` stores its weight as ``(in, out)`` (``fan_in_fan_out``); PEFT forces
    ``fan_in_fan_out=True`` for it and ``False`` for ``nn.Linear`` whatever the config says, so the orientation
    follows the layer type, not the flag. Reading ``nf``/``nx`` and ``in/out_features`` instead of
    ``weight.shape`` also keeps quantized layers (packed weights) right.
    """
    if not isinstance(layer, peft_bridge.SUPPORTED_BASE_LAYERS):
        return None
    if isinstance(layer, Conv1D):
        return layer.nf, layer.nx
    return layer.out_features, layer.in_features


def _base_module(model: nn.Module) -> nn.Module:
    # Accept a PeftModel or a LoraModel as well as the bare model: the keys PEFT matches are those of the
    # innermost model.
    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def _resolve_targets(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """A shallow copy of ``config`` with ``target_modules`` resolved the way ``LoraModel`` resolves it."""
    resolved = copy.copy(config)
    if resolved.target_modules is None:
        if getattr(resolved, "target_parameters", None):
            raise ValueError(
                "This config targets parameters (`target_parameters`), not modules; peft-fed's federated methods "
                "act on whole layer weight matrices and need `target_modules`."
            )
        model_config = getattr(model, "config", None)
        model_type = getattr(model_config, "model_type", None)
        if model_type is None and isinstance(model_config, dict):
            model_type = model_config.get("model_type")
        # LoraModel.target_module_mapping in newer PEFT (not yet in 0.16); the module-level mapping it points to.
        mapping = (
            getattr(LoraModel, "target_module_mapping", None)
            or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
        )
        defaults = mapping.get(model_type)
        if defaults is None:
            raise ValueError(
                f"No default LoRA target modules are known for model type {model_type!r}: please specify "
                "`target_modules` in the config."
            )
        resolved.target_modules = defaults if isinstance(defaults, str) else set(defaults)
    if (
        isinstance(resolved.target_modules, str)
        and resolved.target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND
    ):
        # Private in PEFT, but it *is* the definition of "all-linear"; imported lazily so a rename only breaks
        # configs that use the shorthand, with an ImportError that says so.
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

        resolved = _maybe_include_all_linear_layers(resolved, model)
    return resolved


def find_adapted_layers(
    config: LoraConfig, model: nn.Module
) -> tuple[list[AdaptedLayerShape], list[tuple[str, str]]]:
    """The layers ``config`` adapts in ``model`` and, separately, targeted layers of unsupported types.

    Works before injection (``get_peft_model`` calls it through the pre-injection hook) and after it (a
    ``PeftModel``, a ``LoraModel`` or a model with LoRA layers: the base layer of each LoRA layer is read).

    Returns:
        ``(layers, unsupported)``: ``layers`` in module order; ``unsupported`` as ``(name, layer type)`` for
        targeted layers of a type peft-fed cannot handle (anything but ``nn.Linear`` and ``Conv1D``).
    """
    model = _base_module(model)
    resolved = _resolve_targets(config, model)
    rank_pattern = resolved.rank_pattern or {}

    layers: list[AdaptedLayerShape] = []
    unsupported: list[tuple[str, str]] = []
    tuner_prefixes: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        # Children of an existing LoRA layer (base_layer, lora_A.<adapter>, ...) are adapter internals; PEFT
        # skips them too. named_modules yields parents first, so the prefix is known before its children.
        if any(name.startswith(prefix) for prefix in tuner_prefixes):
            continue
        is_tuner_layer = isinstance(module, BaseTunerLayer)
        if is_tuner_layer:
            tuner_prefixes.append(name + ".")
        if not check_target_module_exists(resolved, name):
            continue
        base_layer = module.get_base_layer() if is_tuner_layer else module
        shape = _matrix_shape(base_layer)
        if shape is None:
            unsupported.append((name, type(base_layer).__name__))
            continue
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), resolved.r)
        layers.append(AdaptedLayerShape(name, type(base_layer).__name__, shape[0], shape[1], int(r)))
    return layers, unsupported


def check_ranks_fit(
    config: LoraConfig,
    model: nn.Module,
    *,
    rank_multiplier: int,
    method: str,
    reason: str,
) -> list[AdaptedLayerShape]:
    """Raise a ``ValueError`` naming every adapted layer with ``rank_multiplier * r > min(m, n)``.

    First, one ``ValueError`` naming every targeted layer of a type peft-fed cannot handle (see
    ``peft_bridge.SUPPORTED_BASE_LAYERS``).

    Args:
        rank_multiplier: 2 for FedSmoothLoRA (``2r <= min(m, n)``), 1 for Subspace-Reg.
        method: the method's name, for the message.
        reason: why the method needs the bound, for the message.

    Returns:
        The adapted layers (all of them valid), for callers that want the shapes.
    """
    layers, unsupported = find_adapted_layers(config, model)
    if unsupported:
        raise peft_bridge.unsupported_layers_error(unsupported, method)

    k = rank_multiplier
    bound = "r" if k == 1 else f"{k}r"
    offending = [layer for layer in layers if k * layer.r > layer.min_dim]
    if not offending:
        return layers

    lines = []
    for layer in offending:
        largest = layer.min_dim // k
        fix = f"largest valid r = {largest}" if largest >= 1 else "no rank fits: exclude this layer"
        excess = f"r = {layer.r}" if k == 1 else f"r = {layer.r}, {bound} = {k * layer.r}"
        lines.append(
            f"  - {layer.name}: {layer.layer_type}, m x n = {layer.out_features} x {layer.in_features}, "
            f"{excess} > min(m, n) = {layer.min_dim}; {fix}"
        )
    overall = min(layer.min_dim for layer in layers) // k
    overall_msg = (
        f"The largest single r valid for every targeted layer is {overall}."
        if overall >= 1
        else "No single r is valid for every targeted layer."
    )
    raise ValueError(
        f"{method} needs {bound} <= min(m, n) for every adapted layer ({reason}), but {len(offending)} of "
        f"{len(layers)} targeted layer(s) break it:\n" + "\n".join(lines) + f"\n{overall_msg} Lower `r`, set "
        "`rank_pattern` for these layers, or leave them out with `exclude_modules`/`target_modules`."
    )
