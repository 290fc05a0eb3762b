"""A federated result as a stock PEFT LoRA adapter of the original base model.

Per adapted layer the cumulative change ``Delta = (W_T + s B A) - W_0`` is compressed to the factors of its
truncated SVD (at a given rank, or the smallest rank meeting a relative-error bound) and written as PEFT's own
``save_pretrained`` writes a plain :class:`~peft.LoraConfig` adapter (PEFT names the tensors and saves the config),
from tensors, without copying the model.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, PeftType, get_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, ModulesToSaveWrapper
from safetensors.torch import save_file
from torch import nn

from .. import peft_bridge
from ..linalg import LowRank, lapack_threads, split_factors
from .model_card import write_card_and_report
from .report import ExportReport, FederatedRunInfo

logger = logging.getLogger(__name__)


def cumulative_change(
    model: nn.Module,
    original_weights: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """``Delta = (W_T + s B A) - W_0`` for every adapted layer (out x in, in ``dtype``).

    ``model`` holds the final backbone ``W_T`` in its adapted layers and the global factors in its adapter;
    ``original_weights`` are the weights those layers had before training (``peft_bridge.base_weights`` of
    the freshly wrapped model), keyed by the same base-model layer names. An adapter that is currently merged
    into its layer is already part of ``W_T`` and is not added twice.

    Example:

    ```python
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from peft_fed import peft_bridge
    >>> from peft_fed.export import cumulative_change
    >>> config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    >>> model = get_peft_model(BertForSequenceClassification(config), LoraConfig(r=2, target_modules=["query"]))
    >>> w0 = peft_bridge.base_weights(model)
    >>> float(cumulative_change(model, w0)["bert.encoder.layer.0.attention.self.query"].abs().max())  # B = 0
    0.0

    ```
    """
    layers = peft_bridge.lora_layers(model, adapter_name)
    specs = peft_bridge.layer_specs(model, adapter_name)
    _check_original_weights(layers, original_weights, specs)
    current = peft_bridge.base_weights(model, adapter_name)
    factors = peft_bridge.get_factors(model, adapter_name)
    deltas = {}
    for name, layer in layers.items():
        w_t = current[name].to(dtype)
        if adapter_name not in layer.merged_adapters:
            w_t = w_t + specs[name].scale * (factors[name].B.to(dtype) @ factors[name].A.to(dtype))
        deltas[name] = w_t - original_weights[name].to(device=w_t.device, dtype=dtype)
    return deltas


def _check_original_weights(
    layers: Mapping[str, nn.Module], original_weights: Mapping[str, torch.Tensor], specs: Mapping[str, Any]
) -> None:
    missing = sorted(set(layers) - set(original_weights))
    if missing:
        raise ValueError(
            f"original_weights lacks {len(missing)} adapted layer(s), e.g. {missing[:3]}; take them with "
            "peft_bridge.base_weights(model) before training starts"
        )
    extra = sorted(set(original_weights) - set(layers))
    if extra:
        # A start that changed a layer the federated adapter does not cover (e.g. an initial adapter on other
        # modules) cannot be expressed by an adapter on the federated layers; refuse instead of dropping it.
        raise ValueError(
            f"original_weights has {len(extra)} layer(s) that are not adapted in the model, e.g. {extra[:3]}: "
            "their change from the original weights cannot be exported as an adapter on the adapted layers"
        )
    for name, spec in specs.items():
        expected = (spec.out_features, spec.in_features)
        if tuple(original_weights[name].shape) != expected:
            raise ValueError(
                f"original weight of {name!r} has shape {tuple(original_weights[name].shape)}, "
                f"expected {expected} (out x in, the weight orientation)"
            )


@dataclass
class _LayerSvd:
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    norm_sq: float
    tail_errors: list[float]  # tail_errors[k] = relative error of the best rank-k approximation

    def smallest_rank(self, bound: float) -> int:
        for k in range(1, len(self.tail_errors)):
            if self.tail_errors[k] <= bound:
                return k
        return len(self.tail_errors) - 1


def _layer_svd(delta: torch.Tensor) -> _LayerSvd:
    with lapack_threads(tuple(delta.shape)):
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    energy = S.double() ** 2
    total = float(energy.sum())
    # tail[k] = sum_{i >= k} S_i^2, the squared error of the rank-k truncation (Eckart-Young)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    errors = [math.sqrt(max(float(t), 0.0) / total) if total > 0 else 0.0 for t in tail]
    return _LayerSvd(U=U, S=S, V=Vh.mH, norm_sq=total, tail_errors=errors)


def _choose_ranks(
    svds: Mapping[str, _LayerSvd],
    rank: int | None,
    max_relative_error: float | None,
    per_layer_rank: bool,
    max_rank: int | None,
) -> dict[str, int]:
    if rank is not None:
        return dict.fromkeys(svds, rank)
    assert max_relative_error is not None
    needed = {name: svd.smallest_rank(max_relative_error) for name, svd in svds.items()}
    if max_rank is not None:
        too_big = {name: k for name, k in needed.items() if k > max_rank}
        if too_big:
            worst = max(too_big, key=too_big.get)
            raise ValueError(
                f"max_relative_error={max_relative_error} needs rank {too_big[worst]} on layer {worst!r} "
                f"(error at max_rank={max_rank}: {svds[worst].tail_errors[max_rank]:.3g}); raise max_rank or the bound"
            )
    if per_layer_rank:
        return needed
    return dict.fromkeys(svds, max(needed.values()))


def _validate_rank_arguments(
    specs: Mapping[str, Any],
    rank: int | None,
    max_relative_error: float | None,
    per_layer_rank: bool,
    max_rank: int | None,
) -> None:
    if (rank is None) == (max_relative_error is None):
        raise ValueError("give exactly one of rank and max_relative_error")
    smallest = min(specs.items(), key=lambda item: min(item[1].out_features, item[1].in_features))
    limit = min(smallest[1].out_features, smallest[1].in_features)
    shape = f"{smallest[1].out_features} x {smallest[1].in_features}"
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
            raise ValueError(
                f"rank must be an integer between 1 and {limit} (layer {smallest[0]!r} is {shape}), got {rank!r}"
            )
        if max_rank is not None or per_layer_rank:
            raise ValueError("max_rank and per_layer_rank only apply with max_relative_error")
        return
    if isinstance(max_relative_error, bool) or not isinstance(max_relative_error, (int, float)):
        raise ValueError(f"max_relative_error must be a number in (0, 1), got {max_relative_error!r}")
    if not 0.0 < max_relative_error < 1.0:
        raise ValueError(
            f"max_relative_error must be in (0, 1) (a relative Frobenius error), got {max_relative_error}"
        )
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")


def _prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output_dir {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output_dir {str(path)!r} exists and is not empty; pass overwrite=True to write over it "
            "(files the export does not write are kept)"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def _require_peft_model(model: nn.Module, adapter_name: str) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"expected a peft.PeftModel (the federated model with its adapter), got {type(model).__name__}"
        )
    if adapter_name not in model.peft_config:
        raise ValueError(f"the model has no adapter {adapter_name!r} (it has {sorted(model.peft_config)})")
    config = model.peft_config[adapter_name]
    if config.peft_type != PeftType.LORA:
        raise ValueError(
            f"only LoRA adapters can be exported, adapter {adapter_name!r} is {config.peft_type}"
        )
    return model


def _head_names(model: PeftModel) -> list[str]:
    """Base-model names of the ``modules_to_save`` wrappers (trained heads), in model order."""
    return [
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, ModulesToSaveWrapper)
    ]


def _warn_unexported_trainables(model: PeftModel, bias: str) -> None:
    # Trainable tensors outside the LoRA factors and modules_to_save would silently vanish from the export.
    covered = ("modules_to_save",) + ((".bias",) if bias != "none" else ())
    stray = [n for n in peft_bridge.trainable_extra_names(model) if not any(c in n for c in covered)]
    if stray:
        warnings.warn(
            f"{len(stray)} trainable tensor(s) are neither LoRA factors nor modules_to_save and are not exported, "
            f"e.g. {stray[:3]}",
            stacklevel=3,
        )


def _base_model_id(model: PeftModel, adapter_name: str, run_info: FederatedRunInfo | None) -> str | None:
    if run_info is not None and run_info.base_model:
        return run_info.base_model
    from_config = model.peft_config[adapter_name].base_model_name_or_path
    if from_config:
        return from_config
    return getattr(getattr(model.get_base_model(), "config", None), "_name_or_path", None) or None


def export_adapter(
    model: PeftModel,
    original_weights: Mapping[str, torch.Tensor],
    output_dir: str | os.PathLike,
    *,
    rank: int | None = None,
    max_relative_error: float | None = None,
    per_layer_rank: bool = False,
    max_rank: int | None = None,
    run_info: FederatedRunInfo | None = None,
    adapter_name: str = "default",
    tokenizer: Any = None,
    overwrite: bool = False,
    svd_dtype: torch.dtype = torch.float64,
    safe_serialization: bool = True,
) -> ExportReport:
    """Write the cumulative change of a federated run as a stock PEFT LoRA adapter of the original base model.

    Per adapted layer ``Delta = (W_T + s B A) - W_0`` is compressed to split factors of its truncated SVD,
    ``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) V_k^T``, saved with ``lora_alpha = r`` (scale 1). The adapter's
    ``modules_to_save`` carry the trained heads with their final values, ``target_modules`` are the exact
    layer names, and ``task_type``/``fan_in_fan_out``/``bias`` come from the training config. ``W_0`` plus
    the adapter reproduces the federated model up to the reported truncation error (exactly, up to float
    rounding, at full rank).

    Args:
        model: the final federated ``PeftModel``: adapted layers hold the final backbone ``W_T``, the adapter
            ``adapter_name`` holds the global factors, ``modules_to_save`` the averaged heads. Not modified.
        original_weights: ``{layer name: W_0}`` (out x in) of every adapted layer before training, e.g.
            ``peft_bridge.base_weights(model)`` taken right after wrapping the base model.
        output_dir: folder to write (must be empty or absent unless ``overwrite``).
        rank: export every layer at this rank (1 ... the smallest ``min(out, in)`` of the adapted layers).
        max_relative_error: instead of ``rank``, use the smallest rank whose relative Frobenius error
            ``||Delta - Delta_k|| / ||Delta||`` is at most this on *every* layer (so also overall), in (0, 1).
        per_layer_rank: with ``max_relative_error``: give each layer its own smallest rank through the config's
            ``rank_pattern`` (a smaller adapter; loads with PEFT, but some serving stacks read only ``r``).
            Default: one rank for all layers, the largest any layer needs.
        max_rank: with ``max_relative_error``: refuse (``ValueError``) if a layer needs more than this rank.
        run_info: facts of the federated run for the model card (and ``base_model_name_or_path``).
        adapter_name: the adapter of ``model`` that holds the global factors.
        tokenizer: saved next to the adapter when given (anything with ``save_pretrained``).
        overwrite: write into a non-empty ``output_dir``; files of the same name are replaced, others kept.
        svd_dtype: dtype of ``Delta`` and its SVD (float64 by default, so a full-rank export is exact to the
            precision of the stored factors; float32 halves the memory and time for very large layers).
        safe_serialization: save ``adapter_model.safetensors`` (default) rather than a pickle.

    Returns:
        An :class:`ExportReport` with the rank of every layer and the per-layer and overall errors; the same
        is written to ``export_report.json`` and summarised in the model card (``README.md``).

    Example:

    ```python
    >>> import tempfile
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from peft_fed import peft_bridge
    >>> from peft_fed.export import export_adapter
    >>> config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    >>> model = get_peft_model(
    ...     BertForSequenceClassification(config), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    ... )
    >>> w0 = peft_bridge.base_weights(model)  # before training
    >>> # ... federated training merges updates into the backbone and leaves the global factors in the adapter ...
    >>> report = export_adapter(model, w0, tempfile.mkdtemp(), max_relative_error=0.01)
    >>> report.relative_error <= 0.01
    True

    ```
    """
    model = _require_peft_model(model, adapter_name)
    train_config = model.peft_config[adapter_name]
    if getattr(train_config, "use_dora", False) or getattr(train_config, "lora_bias", False):
        raise ValueError(
            "exporting DoRA or lora_bias adapters is not supported: their change is not B @ A alone"
        )
    specs = peft_bridge.layer_specs(model, adapter_name)
    _validate_rank_arguments(specs, rank, max_relative_error, per_layer_rank, max_rank)
    bias = getattr(train_config, "bias", "none")
    _warn_unexported_trainables(model, bias)

    deltas = cumulative_change(model, original_weights, adapter_name, dtype=svd_dtype)
    svds = {name: _layer_svd(delta) for name, delta in deltas.items()}
    ranks = _choose_ranks(svds, rank, max_relative_error, per_layer_rank, max_rank)
    factors = {
        name: split_factors(svd.U[:, : ranks[name]], svd.S[: ranks[name]], svd.V[:, : ranks[name]])
        for name, svd in svds.items()
    }
    path = _prepare_output_dir(output_dir, overwrite)

    # The adapter is written from tensors, without copying the model (a deep copy doubled its memory, on its device,
    # to unload it and wrap it again): the files are what PeftModel.save_pretrained writes for a plain LoraConfig with
    # these factors on the original base model. PEFT itself names the tensors (get_peft_model_state_dict of the live
    # model with the exported factors in place of its own, so the keys and the final heads are this PEFT version's)
    # and saves the config; tests/test_export.py loads the result with stock PEFT in a fresh process.
    heads = _head_names(model)
    common_rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): k for name, k in ranks.items() if k != common_rank}
    export_config = LoraConfig(
        r=common_rank,
        lora_alpha=common_rank,
        # alpha = r for every layer, so every layer's scale is 1 and the factors are used as they are
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=_target_modules(model, sorted(ranks)),
        # the heads, then what the task type adds to the list when PEFT wraps a model (e.g. "classifier", "score")
        modules_to_save=list(dict.fromkeys(heads + list(train_config.modules_to_save or []))) or None,
        task_type=train_config.task_type,
        fan_in_fan_out=getattr(train_config, "fan_in_fan_out", False),
        bias=bias,
        lora_dropout=0.0,
        inference_mode=True,
    )
    layers = peft_bridge.lora_layers(model, adapter_name)
    # in the dtype PEFT gives a new adapter on these layers (float32 over a half-precision base)
    stored = {name: f.to(_adapter_dtype(layers[name])) for name, f in factors.items()}

    layer_errors, residual_sq = {}, 0.0
    for name, delta in deltas.items():
        approx = stored[name].B.to(delta) @ stored[name].A.to(delta)
        residual = float(torch.linalg.matrix_norm(delta - approx) ** 2)
        residual_sq += residual
        layer_errors[name] = math.sqrt(residual / svds[name].norm_sq) if svds[name].norm_sq > 0 else 0.0
    total_sq = sum(svd.norm_sq for svd in svds.values())
    overall = math.sqrt(residual_sq / total_sq) if total_sq > 0 else 0.0
    if max_relative_error is not None and max(layer_errors.values()) > max_relative_error:
        worst = max(layer_errors, key=layer_errors.get)
        warnings.warn(
            f"layer {worst!r} has error {layer_errors[worst]:.3g} > max_relative_error={max_relative_error} once "
            f"the factors are stored in {stored[worst].B.dtype}: the bound is below that dtype's precision",
            stacklevel=2,
        )

    base_model = _base_model_id(model, adapter_name, run_info)
    export_config.base_model_name_or_path = base_model
    _save_adapter(model, adapter_name, layers, stored, export_config, path, safe_serialization)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))

    report = ExportReport(
        output_dir=str(path),
        kind="adapter",
        rank=max(ranks.values()),
        layer_ranks=ranks,
        layer_errors=layer_errors,
        relative_error=overall,
        max_relative_error=max_relative_error,
        num_parameters=sum(f.B.numel() + f.A.numel() for f in stored.values()),
        run_info=run_info,
    )
    base = model.get_base_model()
    write_card_and_report(
        path,
        report,
        base_model=base_model,
        model_class=type(base).__name__,
        task_type=_task_name(train_config.task_type),
        num_labels=getattr(getattr(base, "config", None), "num_labels", None),
        changed_backbone=_backbone_changed(model, original_weights, adapter_name),
    )
    logger.info(
        "exported adapter to %s: rank %d, relative error %.3g (worst layer %.3g)",
        path,
        report.rank,
        overall,
        report.max_layer_error,
    )
    return report


def _target_modules(model: PeftModel, names: list[str]) -> list[str]:
    """The exported layers' names as ``get_peft_model`` records them in the config it saves: from
    ``MIN_TARGET_MODULES_FOR_OPTIMIZATION`` (20) names on, the shortest suffixes that match exactly these modules
    (``q_proj`` rather than every layer's path), by PEFT's own function where this PEFT version has it."""
    try:
        from peft.tuners.tuners_utils import _find_minimal_target_modules
        from peft.utils.constants import MIN_TARGET_MODULES_FOR_OPTIMIZATION
    except ImportError:
        return names
    if len(names) < MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        return names
    suffixes = tuple("." + name for name in names)
    others = [key for key, _ in model.get_base_model().named_modules() if key not in names and not key.endswith(suffixes)]
    minimal = _find_minimal_target_modules(names, others)
    return sorted(minimal) if len(minimal) < len(names) else names


def _adapter_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype of the LoRA factors ``get_peft_model`` creates on ``layer``'s base weight (``autocast_adapter_dtype``:
    float32 over float16/bfloat16 and over non-float, e.g. quantized, weights; the weight's own dtype otherwise)."""
    dtype = layer.get_base_layer().weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _save_adapter(
    model: PeftModel,
    adapter_name: str,
    layers: Mapping[str, nn.Module],
    factors: Mapping[str, LowRank],
    config: LoraConfig,
    path: Path,
    safe_serialization: bool,
) -> None:
    """Write ``factors`` (per adapted layer, scale 1) and the final heads as the adapter ``config`` describes, in the
    files and under the keys ``PeftModel.save_pretrained`` uses, without copying or changing ``model``."""
    module_names = {id(module): name for name, module in model.named_modules()}
    state = dict(model.state_dict())  # references to the live tensors, not copies
    for name, layer in layers.items():
        prefix = module_names[id(layer)]
        state[f"{prefix}.lora_B.{adapter_name}.weight"] = factors[name].B
        state[f"{prefix}.lora_A.{adapter_name}.weight"] = factors[name].A
    # save_embedding_layers="auto" would look the base model up on the Hub to detect a resized vocabulary;
    # the export never adapts embeddings and non-adapted weights do not change in federated training.
    named = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter_name, save_embedding_layers=False)
    # what the exported adapter has: its LoRA factors, the heads (modules_to_save) and the biases its config saves;
    # nothing else the training adapter may carry (e.g. trainable token deltas) is part of the export
    wanted = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper))
    kept = {
        key: tensor
        for key, tensor in named.items()
        if key.endswith((".lora_A.weight", ".lora_B.weight")) or key.startswith(wanted)
        or (config.bias != "none" and key.endswith("bias"))
    }
    kept = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in kept.items()}
    if safe_serialization:
        save_file(kept, str(path / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        torch.save(kept, path / WEIGHTS_NAME)
    auto_mapping = None
    if config.task_type is None:  # as PeftModel.save_pretrained: how AutoPeftModel finds the base model class
        base_class = type(model.get_base_model())
        auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    config.save_pretrained(str(path), auto_mapping_dict=auto_mapping)


def _task_name(task_type: Any) -> str | None:
    # TaskType is a (str, Enum): str() of a member gives "TaskType.SEQ_CLS" on Python 3.11+, the value is "SEQ_CLS"
    return None if task_type is None else str(getattr(task_type, "value", task_type))


def _backbone_changed(
    model: PeftModel, original_weights: Mapping[str, torch.Tensor], adapter_name: str
) -> bool:
    current = peft_bridge.base_weights(model, adapter_name)
    return any(not torch.equal(current[name], original_weights[name].to(current[name])) for name in current)
