"""The settings of a federated run that are not ``TrainingArguments``, as small dataclasses (no torch import).

A run's settings are, as in transformers' example scripts, a few dataclasses read by ``HfArgumentParser``-style
parsing, each setting declared once:

* :class:`ModelArguments`: which model (and task head, initial adapter);
* :class:`DataArguments`: which dataset and how it is spread over the clients;
* :class:`LoraArguments`: the LoRA layers;
* :class:`ExportArguments`: how the final adapter is exported;
* :class:`FederatedArguments`: the federation (method, rounds, clients per round, local steps...), the fields
  that :class:`~peft_fed.FederatedTrainingArguments` adds to ``transformers.TrainingArguments`` (it inherits them
  from here, so they exist once);
* the method's hyperparameters: the fields of ``peft_fed.strategies.method_hyperparameters(method)``
  (:func:`method_hyperparameter_fields` is their union over the methods, for flags and YAML keys).

Everything else is a ``transformers.TrainingArguments`` field (learning rate, batch size, optimizer, seed,
bf16, DeepSpeed...). A YAML run file and the command line use the same flat keys; see :func:`split_settings`.

Every ``__post_init__`` raises a one-line ``ValueError`` for a bad value, so the command line can reject it
before any model loads.

Types (:func:`coerce`; the same rules for flags, YAML keys, ``FederatedRunConfig.from_dict``/``run_federated``
keywords and these dataclasses built directly):

* a number field takes a number or a string that is exactly one: ``learning_rate: 1e-3`` (a *string* to
  YAML 1.1) is the float ``0.001``; ``"1e-3x"``, ``"nan"`` and NaN itself are refused;
* an integer field takes an integer, an integral float (``2.0``) or a string of digits (``num_rounds: "1"``
  is ``1``); ``2.5``, ``"1e1"`` and ``"four"`` are refused;
* a boolean field takes ``true``/``false`` or, as argparse does, the strings ``true/false/yes/no/1/0`` in any
  case (and the integers 1/0); never truthiness: ``use_cpu: 'no'`` is false, ``resume: 2`` is an error;
* a string field takes a string (a number is written as its text); a choice field one of its choices;
* a list or a mapping where one value is expected is refused; ``TrainingArguments`` fields of those scalar
  types get the same checks (the others, e.g. ``report_to``, are left to transformers).

Each refusal is one line naming the key (and the YAML file it came from).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# Mirrors of the data package's names (importing it loads `datasets`); tests/test_cli.py checks they agree.
DATASET_NAMES = ("wordnet_topic", "wordnet_mc", "wordnet_define", "hellaswag", "cifar100", "metamathqa")
TASK_TYPES = ("seq_cls", "mc_encoder", "mc_causal", "causal_lm", "image_cls")
PARTITIONS = ("iid", "dirichlet", "pathological", "shard", "natural_id", "linear", "exponential", "size")
ROUND_LR_SCHEDULES = ("constant", "cosine", "linear")
PARALLEL_MODES = ("auto", "clients", "data", "batched")
INVALID_UPLOAD_POLICIES = ("drop", "raise")

TaskType = Literal["seq_cls", "mc_encoder", "mc_causal", "causal_lm", "image_cls"]
Partition = Literal["iid", "dirichlet", "pathological", "shard", "natural_id", "linear", "exponential", "size"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _coerce_fields(obj: Any, cls: type | None = None) -> None:
    """Give every init field of ``obj`` (those of ``cls``, default its own class) its declared type
    (:func:`coerce`): the Python API gets the checks of the command line and YAML."""
    for name, hint in field_hints(cls or type(obj)).items():
        setattr(obj, name, coerce(name, getattr(obj, name), hint))


# a path-looking model value: absolute, ./ ../ ~, a backslash, more than one '/', or a .gguf file
def _looks_like_path(value: str) -> bool:
    return (
        value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", "..") or "\\" in value
        or value.count("/") > 1 or value.lower().endswith(".gguf")
    )  # fmt: skip


MODEL_FIX = ("give a model alias (all-MiniLM-L6-v2, SmolLM2-135M-Instruct), a Hub id (org/name) or an existing "
             "model folder (with config.json) or .gguf file")  # fmt: skip


@dataclass
class ModelArguments:
    """Which model to fine-tune."""

    model: str = field(
        default="all-MiniLM-L6-v2",
        metadata={"help": "Model alias (all-MiniLM-L6-v2, SmolLM2-135M-Instruct), Hub id, local folder or GGUF."},
    )
    task_type: TaskType | None = field(
        default=None,
        metadata={"help": "Task (and model head); default: the dataset's first task type."},
    )
    init_adapter: str | None = field(
        default=None, metadata={"help": "Start from an existing adapter (path or Hub id)."}
    )

    def __post_init__(self) -> None:
        _coerce_fields(self)
        _check(bool(self.model), "model must not be empty")
        path = Path(self.model).expanduser()
        if _looks_like_path(self.model) and not path.exists():
            raise ValueError(f"model {self.model!r} does not exist: {MODEL_FIX}")
        if path.is_dir() and not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
            raise ValueError(f"model {self.model!r} is a folder without config.json or a .gguf file: {MODEL_FIX}")
        if self.model.startswith("~"):
            self.model = str(path)
        _check(self.task_type is None or self.task_type in TASK_TYPES,
               f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")  # fmt: skip


@dataclass
class DataArguments:
    """Which data, and how it is spread over the clients."""

    dataset: str = field(
        default="wordnet_mc",
        metadata={"help": f"Registered dataset ({', '.join(DATASET_NAMES)}) or a local json/jsonl/csv/parquet file."},
    )
    dataset_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": 'Further arguments of the dataset loader, e.g. {"path": "hellaswag.jsonl"}.'},
    )
    num_clients: int = field(default=10, metadata={"help": "Number of clients the training data is split over."})
    partition: Partition = field(default="dirichlet", metadata={"help": "How the data is split over the clients."})
    partition_column: str | None = field(
        default=None,
        metadata={"help": "Column the label-skew partitions follow (default: the label for classification, "
                  "the natural id, e.g. activity_label, for multiple choice)."},
    )  # fmt: skip
    dirichlet_alpha: float = field(
        default=0.3, metadata={"help": "Concentration of the Dirichlet partition (smaller: more skewed)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=200, metadata={"help": "Use at most this many evaluation rows."})
    client_eval_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of each client's rows held out as its local evaluation set."}
    )
    max_length: int = field(default=48, metadata={"help": "Maximum tokens per example (text tasks)."})

    def __post_init__(self) -> None:
        _coerce_fields(self)
        _check(bool(self.dataset), "dataset must not be empty")
        _check(self.dataset in DATASET_NAMES or Path(self.dataset).exists(),
               f"dataset {self.dataset!r} is neither a registered dataset ({', '.join(DATASET_NAMES)}) "
               "nor an existing local file or folder")  # fmt: skip
        _check(isinstance(self.dataset_kwargs, dict), "dataset_kwargs must be a mapping")
        _check(self.num_clients >= 1, f"num_clients must be >= 1, got {self.num_clients}")
        _check(self.partition in PARTITIONS, f"partition must be one of {PARTITIONS}, got {self.partition!r}")
        _check(self.dirichlet_alpha > 0, f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be >= 1 (or None for all), got {value}")
        _check(0.0 <= self.client_eval_fraction < 1.0,
               f"client_eval_fraction must be in [0, 1), got {self.client_eval_fraction}")  # fmt: skip
        _check(self.max_length >= 1, f"max_length must be >= 1, got {self.max_length}")


@dataclass
class LoraArguments:
    """The LoRA layers (the method's own hyperparameters are separate flags)."""

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scale lora_alpha / sqrt(r)."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (default: the model family's attention projections)."}
    )

    def __post_init__(self) -> None:
        _coerce_fields(self)
        _check(self.r >= 1, f"r must be >= 1, got {self.r}")
        _check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        _check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _check(self.target_modules is None or (isinstance(self.target_modules, list) and self.target_modules),
               f"target_modules must be a non-empty list of names, got {self.target_modules!r}")  # fmt: skip


@dataclass
class ExportArguments:
    """How ``OUTPUT_DIR/final`` is exported (a stock PEFT LoRA adapter of the original base model)."""

    export_rank: int | None = field(default=None, metadata={"help": "Rank of the exported final adapter."})
    export_max_error: float | None = field(
        default=None,
        metadata={"help": "Export at the smallest rank with relative error below this "
                  "(0.01 when export_rank is not given either)."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        _coerce_fields(self)
        _check(self.export_rank is None or self.export_rank >= 1, f"export_rank must be >= 1, got {self.export_rank}")
        _check(self.export_max_error is None or self.export_max_error > 0,
               f"export_max_error must be > 0, got {self.export_max_error}")  # fmt: skip
        _check(self.export_rank is None or self.export_max_error is None,
               "give export_rank or export_max_error, not both")  # fmt: skip


@dataclass
class FederatedArguments:
    """The federation's settings; :class:`~peft_fed.FederatedTrainingArguments` = ``TrainingArguments`` + these."""

    method: str = field(
        default="fedsmoothlora", metadata={"help": "Federated method (see peft_fed.STRATEGIES; aliases accepted)."}
    )
    num_rounds: int = field(default=10, metadata={"help": "Communication rounds."})
    clients_per_round: int | None = field(
        default=3, metadata={"help": "Clients sampled per round (None: every client); client_fraction replaces it."}
    )
    client_fraction: float | None = field(
        default=None, metadata={"help": "Fraction of the clients sampled per round, in (0, 1]; replaces clients_per_round."}
    )
    local_steps: int | None = field(
        default=8, metadata={"help": "Optimizer steps per client per round; local_epochs replaces it."}
    )
    local_epochs: float | None = field(
        default=None, metadata={"help": "Passes over its own data per client per round; replaces local_steps."}
    )
    round_lr_scheduler: Literal["constant", "cosine", "linear"] = field(
        default="constant", metadata={"help": "Learning rate across rounds (learning_rate is round 0's)."}
    )
    round_lr_min_ratio: float = field(
        default=0.0, metadata={"help": "Final learning rate as a fraction of learning_rate (cosine, linear)."}
    )
    eval_every: int = field(default=1, metadata={"help": "Evaluate the global model every this many rounds (0: only at the end)."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint the whole federated state every this many rounds (0: never)."})
    resume: bool = field(default=False, metadata={"help": "Resume from the last checkpoint under output_dir/checkpoints."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the run already in output_dir (its metrics, checkpoints, final/); without it a "
                  "new run into a folder that holds one is refused."},
    )  # fmt: skip
    invalid_upload: Literal["drop", "raise"] = field(
        default="drop", metadata={"help": "'drop' an invalid client upload (NaN, wrong shape) or 'raise'."}
    )
    client_state_memory_budget_mib: float | None = field(
        default=None,
        metadata={"help": "MiB of client states (FedSmoothLoRA's uploads, FedSA-LoRA's own B...) kept in memory; the "
                          "least recently used beyond it go to OUTPUT_DIR/client_states (docs/performance.md). "
                          "Unset: all in memory."},
    )  # fmt: skip
    parallel_mode: Literal["auto", "clients", "data", "batched"] = field(
        default="auto",
        metadata={
            "help": "'clients': each process trains different clients (no gradient sync); 'data': all processes "
            "train each client together (data parallel; required by DeepSpeed ZeRO-3); 'batched': one process "
            "trains the round's clients together, one forward/backward per step (falls back to 'clients', with a "
            "log line, where a setting cannot be batched; docs/performance.md); 'auto': data under DeepSpeed, "
            "clients otherwise."
        },
    )
    method_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Python API only: the method's hyperparameters (override a typed PEFT config's). On the "
                  "command line and in YAML they are top-level keys (--zeta 0.5)."},
    )  # fmt: skip
    dp_clip: float | None = field(
        default=None,
        metadata={"help": "Client-level differential privacy: clip each client's update (upload minus the server's "
                  "tensors, heads included) to this L2 norm; unset: no DP (docs/privacy.md)."},
    )  # fmt: skip
    dp_noise_multiplier: float | None = field(
        default=None,
        metadata={"help": "DP: Gaussian noise of std dp_noise_multiplier * dp_clip on the sum of the clipped updates "
                  "(dp_clip / clients_per_round times it on their mean)."},
    )  # fmt: skip
    dp_target_epsilon: float | None = field(
        default=None,
        metadata={"help": "DP: the epsilon budget of the whole run; alone it calibrates dp_noise_multiplier to it, "
                  "with dp_noise_multiplier a run that would spend more is refused before it starts."},
    )  # fmt: skip
    dp_delta: float | None = field(
        default=None, metadata={"help": "DP: the delta of the guarantee, < 1/num_clients (default 1/num_clients^1.1)."}
    )

    def __post_init__(self) -> None:
        self.validate_federation()

    def differential_privacy(self):
        """The run's :class:`~peft_fed.privacy.settings.ClientLevelDPSettings`, or ``None`` without ``dp_clip``."""
        from ..privacy.settings import settings_from_arguments

        return settings_from_arguments(self.dp_clip, self.dp_noise_multiplier, self.dp_target_epsilon, self.dp_delta)

    def validate_federation(self) -> None:
        from ..strategies import canonical_method_name

        _coerce_fields(self, FederatedArguments)  # only the federation's fields (TrainingArguments checks its own)
        canonical_method_name(self.method)  # ValueError naming the choices
        if self.local_epochs is not None:
            self.local_steps = None
        if self.client_fraction is not None:
            self.clients_per_round = None
        _check(self.num_rounds >= 1, f"num_rounds must be >= 1, got {self.num_rounds}")
        _check(self.clients_per_round is None or self.clients_per_round >= 1,
               f"clients_per_round must be >= 1 (or None for every client), got {self.clients_per_round}")
        _check(self.client_fraction is None or 0.0 < self.client_fraction <= 1.0,
               f"client_fraction must be in (0, 1], got {self.client_fraction}")
        _check(self.local_steps is not None or self.local_epochs is not None, "give local_steps or local_epochs")
        _check(self.local_steps is None or self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps}")
        _check(self.local_epochs is None or self.local_epochs > 0,
               f"local_epochs must be positive, got {self.local_epochs}")
        _check(self.round_lr_scheduler in ROUND_LR_SCHEDULES,
               f"round_lr_scheduler must be one of {ROUND_LR_SCHEDULES}, got {self.round_lr_scheduler!r}")
        _check(0.0 <= self.round_lr_min_ratio <= 1.0,
               f"round_lr_min_ratio must be in [0, 1], got {self.round_lr_min_ratio}")
        _check(self.eval_every >= 0 and self.save_every >= 0, "eval_every and save_every must be >= 0")
        _check(self.client_state_memory_budget_mib is None or self.client_state_memory_budget_mib >= 0,
               f"client_state_memory_budget_mib must be >= 0, got {self.client_state_memory_budget_mib}")  # fmt: skip
        _check(self.invalid_upload in INVALID_UPLOAD_POLICIES,
               f"invalid_upload must be 'drop' or 'raise', got {self.invalid_upload!r}")
        _check(self.parallel_mode in PARALLEL_MODES,
               f"parallel_mode must be one of {PARALLEL_MODES}, got {self.parallel_mode!r}")  # fmt: skip
        if self.method_kwargs is not None:
            _check(isinstance(self.method_kwargs, dict), "method_kwargs must be a mapping")
            self.method_kwargs = dict(self.method_kwargs)
            validate_method_hyperparameters(self.method, self.method_kwargs)
        self.differential_privacy()  # one-line errors for bad dp_* settings


# The groups of a flat settings mapping, in the order the command line's help lists them.
ARGUMENT_GROUPS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "lora": LoraArguments,
    "federation": FederatedArguments,
    "export": ExportArguments,
}
# Keys a YAML file or a flag never takes (the Python API's spelling of the hyperparameters).
PYTHON_ONLY_SETTINGS = frozenset({"method_kwargs"})


# ---------------------------------------------------------------------- method hyperparameters


@dataclass(frozen=True)
class HyperparameterField:
    """One hyperparameter name and the methods that take it (with each one's default)."""

    name: str
    hint: Any
    help: str
    defaults: dict[str, Any]  # canonical method name -> default


def method_hyperparameters_class(method: str) -> type:
    """The dataclass of ``method``'s hyperparameters (``peft_fed.strategies.method_hyperparameters``)."""
    from ..strategies import method_hyperparameters

    return method_hyperparameters(method)


def method_hyperparameter_fields() -> dict[str, HyperparameterField]:
    """The union of every method's hyperparameters: one entry per name (flags and YAML keys)."""
    from ..strategies import STRATEGIES

    union: dict[str, HyperparameterField] = {}
    for method in STRATEGIES:
        cls = method_hyperparameters_class(method)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            entry = union.get(f.name)
            if entry is None:
                union[f.name] = HyperparameterField(f.name, hints[f.name], f.metadata.get("help", ""), {method: default})
            else:
                entry.defaults[method] = default
    return union


@functools.cache
def method_hyperparameter_arguments() -> type:
    """One dataclass, ``MethodHyperparameterArguments``, whose fields are the union of every method's
    hyperparameters (for ``HfArgumentParser`` next to the other argument dataclasses). Every field defaults to
    ``None``: the chosen method's own default; a field the method does not take must stay ``None``
    (:func:`hyperparameters_from_arguments` checks)."""
    specs = []
    for name, entry in method_hyperparameter_fields().items():
        defaults = " / ".join(sorted({str(v) for v in entry.defaults.values()}))
        help_text = f"[{', '.join(entry.defaults)}] {entry.help} (default: {defaults})"
        specs.append((name, entry.hint | None, field(default=None, metadata={"help": help_text})))
    cls = dataclasses.make_dataclass("MethodHyperparameterArguments", specs)
    cls.__module__ = __name__
    cls.__doc__ = "The union of every method's hyperparameters (None: the method's default)."
    return cls


def hyperparameters_from_arguments(method: str, arguments: Any) -> dict[str, Any]:
    """The hyperparameters set (not ``None``) in a ``MethodHyperparameterArguments``, checked against ``method``."""
    given = {k: v for k, v in dataclasses.asdict(arguments).items() if v is not None}
    validate_method_hyperparameters(method, given)
    return given


def validate_method_hyperparameters(method: str, values: Mapping[str, Any]) -> Any:
    """``method``'s hyperparameters dataclass built from ``values``; a one-line ``ValueError`` when a name is
    not one of the method's or a value is bad."""
    from ..strategies import canonical_method_name

    name = canonical_method_name(method)
    cls = method_hyperparameters_class(name)
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes no hyperparameters"
        raise ValueError(f"method {name!r} does not take {', '.join(unknown)}; {takes}")
    try:
        return cls(**values)
    except TypeError as error:  # e.g. a comparison with a wrongly typed value inside __post_init__
        raise ValueError(f"bad hyperparameter for {name!r}: {error}") from None


# ---------------------------------------------------------------------- flat settings


_BOOL_STRINGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_INT_TEXT = re.compile(r"[+-]?\d+")
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
SCALAR_TYPES = (int, float, bool, str)


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` (a YAML scalar, a command-line string, a Python value) as the type ``hint`` says; a one-line
    ``ValueError`` if it cannot be. The rules are in this module's docstring."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if len(args) < len(typing.get_args(hint)):
                return None
        for arg in args:
            try:
                return coerce(name, value, arg)
            except ValueError:
                if arg is args[-1]:
                    raise
        return value
    if value is None:
        raise ValueError(f"{name} must not be None")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b":  # numpy bool
            return bool(value)
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _BOOL_STRINGS:
            return _BOOL_STRINGS[value.strip().lower()]
        raise ValueError(f"{name} must be true or false (or yes/no, 1/0), got {value!r}")
    if hint in (int, float):
        what = "an integer" if hint is int else "a number"
        if isinstance(value, bool):
            raise ValueError(f"{name} must be {what}, got {value!r}")
        if isinstance(value, numbers.Real) and math.isnan(value):
            raise ValueError(f"{name} must be {what}, got nan")
        if isinstance(value, numbers.Real) and (hint is float or float(value).is_integer()):  # numpy numbers too
            return hint(value)
        if isinstance(value, str) and (_INT_TEXT if hint is int else _FLOAT_TEXT).fullmatch(value.strip()):
            return hint(value.strip())
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if hint is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{name} must be a string, got {value!r}")
    if origin is list or hint is list:
        (item,) = typing.get_args(hint) or (Any,)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [coerce(name, v, item) for v in value]
    if origin is dict or hint is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"{name} must be a JSON object: {error.msg} at position {error.pos} in {value!r}") from None
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return value
    return value


def coerce_scalar(name: str, value: Any, hint: Any) -> Any:
    """:func:`coerce` for a field of another library (a ``TrainingArguments`` field): applied when ``hint`` is a
    scalar type (or an Optional/Union of them); for other hints only a list or mapping given where no list or
    mapping is possible is refused, the rest is left to that library."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if origin in (typing.Union, types.UnionType) else [hint]
    if all(a in SCALAR_TYPES for a in args):
        return coerce(name, value, hint)
    if isinstance(value, (list, tuple, dict)):
        containers = (list, tuple, dict, typing.Any)
        if not any(a in containers or typing.get_origin(a) in containers or dataclasses.is_dataclass(a) for a in args):
            raise ValueError(f"{name} must be a single value, got {value!r}")
    return value


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """``{field name: resolved type}`` of a dataclass (its init fields)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def split_settings(
    settings: Mapping[str, Any], methods: list[str] | None = None, *, labels: Mapping[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Sort flat settings (YAML keys = flag names) into ``ARGUMENT_GROUPS``, ``"hyperparameters"`` and
    ``"training"`` (everything else: ``TrainingArguments`` fields, checked where transformers is loaded).

    Values are coerced to the field types (``"1e-3"`` -> ``0.001``). Hyperparameters are checked against the
    method; with several ``methods`` (``peft-fed compare``) each gets the ones it takes, and each given one
    must be taken by at least one of them. Raises a one-line ``ValueError``; ``labels`` name a key in it
    (``--zeta`` for a flag, ``zeta (in run.yaml)`` for a file's key).
    """
    labels = labels or {}
    bad = sorted(PYTHON_ONLY_SETTINGS & set(settings))
    if bad:
        raise ValueError(f"{', '.join(bad)} is not a run setting: give the method's hyperparameters as "
                         "top-level settings (e.g. zeta: 0.5, or --zeta 0.5)")  # fmt: skip
    groups: dict[str, dict[str, Any]] = {name: {} for name in ARGUMENT_GROUPS}
    groups["hyperparameters"], groups["training"] = {}, {}
    owner = {name: group for group, cls in ARGUMENT_GROUPS.items() for name in field_hints(cls)}
    hints = {name: hint for cls in ARGUMENT_GROUPS.values() for name, hint in field_hints(cls).items()}
    hyper = method_hyperparameter_fields()
    for key, value in settings.items():
        label = labels.get(key, key)
        if key in owner:
            groups[owner[key]][key] = coerce(label, value, hints[key])
        elif key in hyper:
            groups["hyperparameters"][key] = coerce(label, value, hyper[key].hint)
        else:
            groups["training"][key] = value
    methods = methods or [groups["federation"].get("method", FederatedArguments.method)]
    given = groups["hyperparameters"]
    if len(methods) == 1:
        validate_method_hyperparameters(methods[0], given)
    else:
        for method in methods:
            cls = method_hyperparameters_class(method)
            names = {f.name for f in dataclasses.fields(cls)}
            validate_method_hyperparameters(method, {k: v for k, v in given.items() if k in names})
        taken = {f.name for m in methods for f in dataclasses.fields(method_hyperparameters_class(m))}
        unused = sorted(set(given) - taken)
        if unused:
            raise ValueError(f"none of the methods {', '.join(methods)} takes {', '.join(unused)}")
    return groups


def hyperparameters_for(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The given hyperparameters that ``method`` takes (``peft-fed compare`` runs several methods)."""
    names = {f.name for f in dataclasses.fields(method_hyperparameters_class(method))}
    return {k: v for k, v in given.items() if k in names}
