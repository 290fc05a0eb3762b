"""The one place that reads and writes a PEFT LoRA model on behalf of the strategies.

Strategies work on ``{layer name: LowRank(B, A)}`` in the weight orientation (``W`` is out x in). This
module maps that onto PEFT's LoRA layers: ``lora_B.weight`` is ``B`` and ``lora_A.weight`` is ``A`` for
``nn.Linear`` and for transformers' ``Conv1D`` alike, while the *base* weight of a ``Conv1D``
(``fan_in_fan_out=True``) is stored transposed, which is handled here and nowhere else.

Layer names are the adapted modules' names in the *base* model (``encoder.layer.0.attention.self.query``),
so they match ``target_modules`` and the keys of an exported adapter.

DeepSpeed ZeRO-3 partitions every parameter across processes: locally a parameter is an empty tensor
(``ds_shape``/``ds_numel`` hold its real size) until it is gathered. Every function here that reads or
writes parameters gathers them for the duration (:func:`gathered`; writes are made on every process and
rank 0's are broadcast), so they see and return full tensors under ZeRO-3. These are collective calls:
under ZeRO-3 with several processes, call them on every process. Without DeepSpeed they are no-ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .linalg import LowRank
from .state import LayerSpec

_PEFT_PREFIX = "base_model.model."


def _strip_prefix(name: str) -> str:
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


SUPPORTED_BASE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
"""Base layer types whose LoRA factors the bridge can read and write: ``lora_A``/``lora_B`` are ``r x n`` and
``m x r`` matrices and ``W`` is one ``m x n`` matrix (stored transposed by ``Conv1D``). PEFT's LoRA for
``nn.Embedding`` keeps its factors in ``lora_embedding_A/B`` and its Conv layers keep kernel-shaped factors,
which the strategies cannot average or factorise. Quantized linear layers that subclass ``nn.Linear`` count."""

SUPPORTED_LAYERS_TEXT = "torch.nn.Linear and transformers' Conv1D"


def unsupported_layers_error(layers: Iterable[tuple[str, str]], context: str) -> ValueError:
    """The one error for targeted layers of a type the bridge cannot handle, ``layers`` as ``(name, type)``."""
    listed = "\n".join(f"  - {name} ({layer_type})" for name, layer_type in layers)
    return ValueError(
        f"{context}: peft-fed supports LoRA only on {SUPPORTED_LAYERS_TEXT} layers, but these targeted layers "
        f"are of other types:\n{listed}\nPEFT's LoRA for Embedding and Conv layers (lora_embedding_A/B, "
        "kernel-shaped factors) cannot be averaged or factorised by the federated strategies. Leave these "
        "layers out with `exclude_modules` or narrow `target_modules`."
    )


def _carries_adapter(module: LoraLayer, adapter_name: str) -> bool:
    return any(
        adapter_name in (getattr(module, attr, None) or {})
        for attr in ("lora_A", "lora_embedding_A", "lora_B", "lora_embedding_B")
    )


def lora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """Every LoRA layer of ``model`` that carries ``adapter_name``, keyed by its base-model module name.

    Raises ``ValueError`` if any of them wraps a layer type the bridge cannot handle (see
    :data:`SUPPORTED_BASE_LAYERS`), so every bridge function refuses such a model before training.
    """
    layers, unsupported = {}, []
    for name, module in model.named_modules():
        if not (isinstance(module, LoraLayer) and _carries_adapter(module, adapter_name)):
            continue
        base = module.get_base_layer()
        if isinstance(base, SUPPORTED_BASE_LAYERS) and adapter_name in getattr(module, "lora_A", {}):
            layers[_strip_prefix(name)] = module
        else:
            unsupported.append((_strip_prefix(name), type(base).__name__))
    if unsupported:
        raise unsupported_layers_error(unsupported, f"adapter {adapter_name!r}")
    if not layers:
        raise ValueError(
            f"the model has no LoRA layer with adapter {adapter_name!r}; wrap it with "
            "peft.get_peft_model(model, config) first"
        )
    return layers


def _base_weight(layer: LoraLayer) -> torch.Tensor:
    return layer.get_base_layer().weight


def _to_weight_orientation(tensor: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
    return tensor.mT if getattr(layer, "fan_in_fan_out", False) else tensor


# ---------------------------------------------------------------------------------------- DeepSpeed ZeRO-3

# Set by deepspeed.zero.GatheredParameters on the parameters it holds gathered (nesting over them raises).
_DS_GATHER_DEPTH = "_ds_z3_gathered_param_context_depth"


def is_zero3_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is managed by DeepSpeed ZeRO-3 (partitioned, or persistent but tracked)."""
    return hasattr(param, "ds_id")


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    """The real shape of a parameter, also when ZeRO-3 has partitioned it to an empty tensor."""
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


def gathered(params: torch.Tensor | Iterable[torch.Tensor], modify: bool = False) -> contextlib.AbstractContextManager:
    """Context in which the ZeRO-3 parameters among ``params`` hold their full data.

    ``modify=True``: in-place writes made inside are kept (rank 0's values are broadcast on exit, so
    every process must write the same values); otherwise writes are discarded. Parameters that are not
    ZeRO-3 parameters (no DeepSpeed, or other stages) are left alone, and then this is a no-op. Parameters
    an outer ``gathered``/``GatheredParameters`` context already holds are skipped (DeepSpeed refuses
    overlapping contexts); they are readable, but writes to them follow the outer context's ``modify``.
    A collective call under ZeRO-3: every process must enter it with the same parameters.
    """
    if isinstance(params, torch.Tensor):
        params = [params]
    zero = [p for p in params if hasattr(p, "ds_id") and not getattr(p, _DS_GATHER_DEPTH, 0)]
    if not zero:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero, modifier_rank=0 if modify else None)


@contextlib.contextmanager
def full_parameters(model: nn.Module, modify: bool = False) -> Iterator[None]:
    """Every parameter of ``model`` gathered for the duration (a no-op without ZeRO-3).

    For code that reads a ZeRO-3 model as a whole and does not know about partitioning: saving or
    exporting the adapter (``export_adapter``, ``save_pretrained``, ``copy.deepcopy``). Enter it on every
    process (it is collective); inside, the work itself may run on the main process only, as the
    functions of this module skip the gathered parameters. Needs the memory of the full model on each
    process, briefly.

        >>> with peft_bridge.full_parameters(trainer.model):  # doctest: +SKIP
        ...     if trainer.is_world_process_zero():
        ...         export_adapter(trainer.model, trainer.original_weights, "final")
    """
    with gathered(list(model.parameters()), modify=modify):
        yield


def _deepspeed_hooks_installed(model: nn.Module) -> bool:
    """Whether a DeepSpeed ZeRO-3 engine's hooks (which fetch partitioned parameters in forward and
    backward) are on ``model``; without them a forward pass sees the empty partitions."""
    return any(
        str(getattr(hook, "__module__", "")).startswith("deepspeed") for hook in model._forward_pre_hooks.values()
    )


def layer_specs(model: nn.Module, adapter_name: str = "default") -> dict[str, LayerSpec]:
    """Shape, rank and scale of every adapted layer (scale = ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA)."""
    specs = {}
    for name, layer in lora_layers(model, adapter_name).items():
        A = _shape(layer.lora_A[adapter_name].weight)
        B = _shape(layer.lora_B[adapter_name].weight)
        specs[name] = LayerSpec(
            out_features=B[0],
            in_features=A[1],
            rank=A[0],
            scale=float(layer.scaling[adapter_name]),
        )
    return specs


def get_factors(model: nn.Module, adapter_name: str = "default") -> dict[str, LowRank]:
    """Detached CPU copies of every layer's ``(B, A)`` (strategies run on the CPU, like a server)."""
    layers = lora_layers(model, adapter_name)
    with gathered([p for layer in layers.values() for p in _factor_params(layer, adapter_name)]):
        return {
            name: LowRank(_cpu_copy(layer.lora_B[adapter_name].weight), _cpu_copy(layer.lora_A[adapter_name].weight))
            for name, layer in layers.items()
        }


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    # The bridge is the device boundary: what it hands to a strategy is on the CPU whatever device the model
    # trains on, so server-side tensor code never mixes a GPU client's tensors with CPU server state.
    return tensor.detach().to("cpu", copy=True)


def _factor_params(layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_B[adapter_name].weight, layer.lora_A[adapter_name].weight


def live_factors(model: nn.Module, adapter_name: str = "default") -> dict[str, LowRank]:
    """The adapter's parameters themselves (they carry gradients), for a strategy's loss term.

    Not available under ZeRO-3 (raises ``NotImplementedError``): outside their own module's forward pass
    the partitioned parameters are empty, and gathering them (``GatheredParameters``) gives tensors that
    autograd cannot route gradients back through.
    """
    layers = lora_layers(model, adapter_name)
    if any(is_zero3_param(p) for layer in layers.values() for p in _factor_params(layer, adapter_name)):
        raise NotImplementedError(
            "a loss term on the live LoRA factors (e.g. Subspace-Reg's regulariser) is not supported under "
            "DeepSpeed ZeRO-3, whose partitioned parameters cannot be gathered with gradients outside their "
            "module's forward pass; use ZeRO stage 0-2, or no DeepSpeed"
        )
    return {
        name: LowRank(layer.lora_B[adapter_name].weight, layer.lora_A[adapter_name].weight)
        for name, layer in layers.items()
    }


@torch.no_grad()
def set_factors(
    model: nn.Module,
    factors: Mapping[str, LowRank],
    adapter_name: str = "default",
    *,
    train_A: bool = True,
    train_B: bool = True,
) -> None:
    """Load ``factors`` into the adapter and set which factor local training may change."""
    layers = lora_layers(model, adapter_name)
    missing = sorted(set(layers) - set(factors))
    if missing:
        raise ValueError(f"no factors given for adapted layer(s) {missing[:3]}")
    for name, layer in layers.items():
        B, A = _factor_params(layer, adapter_name)
        if tuple(factors[name].A.shape) != _shape(A) or tuple(factors[name].B.shape) != _shape(B):
            raise ValueError(
                f"factors for {name!r} have shapes B{tuple(factors[name].B.shape)} A{tuple(factors[name].A.shape)}, "
                f"the layer has B{_shape(B)} A{_shape(A)}"
            )
    with gathered([p for layer in layers.values() for p in _factor_params(layer, adapter_name)], modify=True):
        for name, layer in layers.items():
            B, A = _factor_params(layer, adapter_name)
            A.copy_(factors[name].A)
            B.copy_(factors[name].B)
            A.requires_grad_(train_A)
            B.requires_grad_(train_B)


def base_weights(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Detached CPU copies of the frozen ``W`` of every adapted layer, out x in."""
    weights = {}
    for name, layer in lora_layers(model, adapter_name).items():
        with gathered(_base_weight(layer)):  # one layer at a time: a gathered weight is full size
            weights[name] = _cpu_copy(_to_weight_orientation(_base_weight(layer), layer))
    return weights


@torch.no_grad()
def add_to_base_weights(
    model: nn.Module, deltas: Mapping[str, torch.Tensor | LowRank], adapter_name: str = "default"
) -> None:
    """``W += delta`` for every layer in ``deltas`` (a merge; ``LowRank`` deltas are formed densely here)."""
    layers = lora_layers(model, adapter_name)
    for name, delta in deltas.items():
        if name not in layers:
            raise KeyError(f"backbone update for {name!r}, which is not an adapted layer")
        weight = _base_weight(layers[name])
        dense = delta.dense() if isinstance(delta, LowRank) else delta
        with gathered(weight, modify=True):
            weight.add_(_to_weight_orientation(dense, layers[name]).to(weight.device, weight.dtype))


@torch.no_grad()
def set_base_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Overwrite the frozen ``W`` (out x in) of the given adapted layers exactly (e.g. from a checkpoint)."""
    layers = lora_layers(model, adapter_name)
    unknown = sorted(set(weights) - set(layers))
    if unknown:
        raise KeyError(f"weights given for {unknown[:3]}, which are not adapted layers")
    for name, value in weights.items():
        weight = _base_weight(layers[name])
        oriented = _to_weight_orientation(value, layers[name])
        if tuple(oriented.shape) != _shape(weight):
            raise ValueError(f"{name}: weight of shape {tuple(value.shape)} does not fit the layer")
        with gathered(weight, modify=True):
            weight.copy_(oriented.to(weight.dtype))


@contextlib.contextmanager
def backbone_offsets(
    model: nn.Module, offsets: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> Iterator[None]:
    """Temporarily add ``offsets`` to the frozen weights; the originals are restored bit for bit.

    Restoring from a copy (not by subtracting) keeps the shared backbone identical whichever clients a
    process simulated, which the multi-process runtime's equivalence relies on.
    """
    if not offsets:
        yield
        return
    layers = lora_layers(model, adapter_name)
    saved = {}
    for name in offsets:
        with gathered(_base_weight(layers[name])):
            saved[name] = _base_weight(layers[name]).detach().clone()
    try:
        add_to_base_weights(model, offsets, adapter_name)
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                weight = _base_weight(layers[name])
                with gathered(weight, modify=True):
                    weight.copy_(original)


def trainable_extra_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that are not LoRA factors (heads, ``modules_to_save``)."""
    return [
        name
        for name, param in model.named_parameters()
        if param.requires_grad and "lora_A." not in name and "lora_B." not in name
    ]


def get_extras(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    extras = {}
    for name in names:
        with gathered(params[name]):
            extras[name] = _cpu_copy(params[name])
    return extras


@torch.no_grad()
def set_extras(model: nn.Module, extras: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in extras.items():
        if name not in params:
            raise KeyError(f"the model has no parameter {name!r} to load")
        with gathered(params[name], modify=True):
            params[name].copy_(value)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module, adapter_name: str = "default") -> Iterator[None]:
    """Run the backbone alone: LoRA layers skip their adapter (heads and ``modules_to_save`` stay active)."""
    layers = lora_layers(model, adapter_name).values()
    flags = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer._disable_adapters = flag


@contextlib.contextmanager
def parameters_frozen(parameters: Iterable[torch.Tensor]) -> Iterator[None]:
    """Hold ``parameters`` out of autograd inside the block (no gradient, so no optimizer step or clamp that
    checks ``requires_grad`` touches them); each gets its own ``requires_grad`` back afterwards."""
    parameters = list(parameters)
    flags = [parameter.requires_grad for parameter in parameters]
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in zip(parameters, flags, strict=True):
            parameter.requires_grad_(flag)


def full_weight_gradients(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor],
    offsets: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
) -> dict[str, torch.Tensor]:
    """Mean ``dLoss/dW`` of every adapted layer over ``batches``, at ``W + offsets``, adapters out.

    The gradient is assembled from activations, ``dL/dW = sum_tokens (dL/dy)^T x``, captured by hooks on
    the adapted layers, instead of asking autograd for the weights' own gradients. That needs no
    ``requires_grad`` on the frozen weights and no weight-sized gradient buffers, and it works when the
    weights are sharded (DeepSpeed ZeRO-3 gathers them in the forward pass; we never touch ``.grad``).
    A ZeRO-3 model without an engine's hooks yet (partitioned at load by ``zero.Init``, before the first
    ``Trainer.train``) has all its parameters gathered for the estimate instead.
    Dropout is off (eval mode) so the estimate does not depend on the dropout RNG stream; every
    ``requires_grad`` flag, ``.grad`` and the training mode are restored afterwards.

    Unlike what else the bridge hands out (CPU copies, like a server's), the gradients stay on the device of the
    layer that computed them, in float32: they are the client's own working tensors, ``m x n`` each, and a strategy
    follows its inputs' device (no round trip per layer, client and round).
    """
    layers = lora_layers(model, adapter_name)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module, args, output):
            x = args[0]
            inputs[name] = x.detach()
            if not output.requires_grad:
                # nothing upstream requires grad (everything is frozen): make this activation the leaf
                output = output.detach().requires_grad_(True)
            outputs[name] = output
            return output

        return hook

    sums: dict[str, torch.Tensor] = {}
    count = 0
    was_training = model.training
    params = list(model.parameters())
    handles = [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
    try:
        model.eval()
        with (
            parameters_frozen(params),
            backbone_offsets(model, offsets or {}, adapter_name),
            adapters_disabled(model, adapter_name),
            _forward_ready(model, params),
        ):
            for batch in batches:
                inputs.clear()
                outputs.clear()
                loss = loss_fn(model, batch)
                names = [n for n in layers if n in outputs]
                if len(names) != len(layers):
                    missing = sorted(set(layers) - set(names))
                    raise RuntimeError(f"adapted layer(s) {missing[:3]} were not called by the forward pass")
                grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
                for name, grad_out in zip(names, grads, strict=True):
                    x = inputs[name]
                    if grad_out is None:
                        grad_out = torch.zeros_like(outputs[name])
                    # (tokens x out)^T (tokens x in) = out x in, the weight orientation
                    g = grad_out.reshape(-1, grad_out.shape[-1]).float().mT @ x.reshape(-1, x.shape[-1]).float()
                    sums[name] = sums[name] + g if name in sums else g
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("full_weight_gradients got no batch: the client has no data for gradient estimation")
    # on the device where each layer computed them: the client's mathematics on them (FedSmoothLoRA's SVDs and
    # dense offsets) runs there, and only what the client sends or keeps comes to the CPU, at rank r
    return {name: (total / count).contiguous() for name, total in sums.items()}


def _forward_ready(model: nn.Module, params: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Gather every parameter for forward and backward passes when ZeRO-3 partitioned them and no engine
    fetches them (a no-op otherwise: without DeepSpeed, or with a live engine's hooks)."""
    if not any(is_zero3_param(p) for p in params) or _deepspeed_hooks_installed(model):
        return contextlib.nullcontext()
    return gathered(params)
