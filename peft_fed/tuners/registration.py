"""Make PEFT load peft-fed's config types, without a PEFT type of their own.

PEFT's ``register_peft_method`` only accepts names that already exist in its ``PeftType`` enum, and every
LoRA-specific code path in PEFT (state-dict prefixes, merging, saving, hot-swapping) keys on
``peft_type == PeftType.LORA``. The federated configs therefore keep ``peft_type = LORA`` (their layers *are*
plain LoRA layers) and carry a marker field, ``federated_method``, in ``adapter_config.json``. This module
installs two small, idempotent, guarded hooks into PEFT:

1. config dispatch: every way PEFT turns a config dict into a config object while loading an adapter
   (``PeftConfig.from_pretrained``, ``LoraConfig.from_pretrained`` as used by ``PeftModel.from_pretrained``,
   ``load_adapter``, ``AutoPeftModel*``, hot-swapping and transformers' ``load_adapter``) funnels through the
   classmethod ``PeftConfigMixin.from_peft_type``. We wrap it: a dict whose ``federated_method`` names a
   registered method builds that class; anything else goes to PEFT's original code unchanged.
2. pre-injection check: ``LoraModel._prepare_model(peft_config, model)`` is the one place PEFT calls with both
   the (resolved) config and the model before any layer is replaced. We wrap it to call
   ``peft_config._peft_fed_check_model(model)`` when the config defines it, so ``get_peft_model`` rejects a
   FedSmoothLoRA rank that a targeted layer cannot hold before the model is modified.

Both hooks are guarded: a PEFT release without the hooked function (or with one of another shape) makes
``register_peft_fed_types`` emit one ``PeftFedCompatibilityWarning`` that names what is lost, never an error;
the wrappers take ``*args, **kwargs`` so a changed signature passes through. Everything that does not need a
hook keeps working: ``get_peft_model``/``save_pretrained`` with the federated configs, and loading with an
explicit config (``PeftModel.from_pretrained(model, path, config=FedSmoothLoraConfig.from_pretrained(path))``).

A process that never imports peft_fed sees a LoRA config with a few unknown keys; PEFT drops them with its
forward-compatibility warning and loads the adapter as plain LoRA. See docs/design.md (section "Registration
with PEFT").
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import peft
from peft import PeftType
from torch import nn

try:
    from peft.config import PeftConfigMixin
except ImportError:  # a PEFT that moved it: only the config dispatch is lost (register_peft_fed_types warns)
    PeftConfigMixin = None

logger = logging.getLogger(__name__)

FEDERATED_METHOD_FIELD = "federated_method"
"""Key in ``adapter_config.json`` that names the federated method a LoRA config belongs to."""

PRE_INJECTION_HOOK = "_peft_fed_check_model"
"""Name of the optional config method the wrapped ``LoraModel._prepare_model`` calls with the base model."""

# Attribute set on our wrappers; lets the installers recognise an already installed hook (idempotency) even
# after this module has been reloaded and the wrapper function objects are new.
_WRAPPER_MARK = "__peft_fed_wrapper__"


class PeftFedCompatibilityWarning(UserWarning):
    """This PEFT version lacks something peft-fed hooks; the message says which feature is lost."""


_FEDERATED_CONFIG_REGISTRY: dict[str, type] = {}


def register_federated_config(method: str, config_cls: type) -> None:
    """Register ``config_cls`` as the config class of federated method ``method``.

    After registration, loading a LoRA adapter whose ``adapter_config.json`` has ``"federated_method": method``
    yields a ``config_cls`` instance. Registering the same class twice is a no-op; re-registering a class with
    the same qualified name (a module reload) replaces the old one; any other clash is an error, because two
    classes cannot both own one marker value.
    """
    from peft import LoraConfig

    if not isinstance(method, str) or not method or method != method.strip():
        raise ValueError(
            f"federated method name must be a non-empty string without surrounding spaces, got {method!r}"
        )
    if not (isinstance(config_cls, type) and issubclass(config_cls, LoraConfig)):
        raise TypeError(f"{config_cls!r} must be a subclass of peft.LoraConfig (its layers are LoRA layers)")
    existing = _FEDERATED_CONFIG_REGISTRY.get(method)
    if existing is not None and existing is not config_cls:
        same_class_reloaded = (existing.__module__, existing.__qualname__) == (
            config_cls.__module__,
            config_cls.__qualname__,
        )
        if not same_class_reloaded:
            raise KeyError(
                f"federated method {method!r} is already registered to {existing.__module__}.{existing.__qualname__}"
            )
    _FEDERATED_CONFIG_REGISTRY[method] = config_cls


def get_federated_config_class(method: str) -> type | None:
    """The config class registered for ``method``, or ``None``."""
    return _FEDERATED_CONFIG_REGISTRY.get(method)


def registered_federated_methods() -> dict[str, type]:
    """A copy of the registry: ``{federated_method: config class}``."""
    return dict(_FEDERATED_CONFIG_REGISTRY)


def is_lora_peft_type(peft_type: Any) -> bool:
    # PeftType is a str enum, so the plain string read from JSON compares equal to the member.
    return peft_type is None or peft_type == PeftType.LORA


def resolve_config_class(config_dict: Mapping[str, Any]) -> type | None:
    """The registered federated config class a config dict asks for, or ``None`` for anything else.

    Only LoRA dicts dispatch: a marker on another PEFT type would be meaningless (our classes are LoRA configs).
    An unknown marker (an adapter written by a newer peft-fed with a method this one lacks) resolves to
    ``None`` with a warning, so the adapter still loads as plain LoRA.
    """
    method = config_dict.get(FEDERATED_METHOD_FIELD)
    if method is None or not is_lora_peft_type(config_dict.get("peft_type")):
        return None
    config_cls = _FEDERATED_CONFIG_REGISTRY.get(method) if isinstance(method, str) else None
    if config_cls is None:
        warnings.warn(
            f"The adapter config names federated method {method!r}, which this version of peft-fed does not know "
            f"(known: {sorted(_FEDERATED_CONFIG_REGISTRY)}). Loading it as a plain LoRA config.",
            stacklevel=3,
        )
    return config_cls


def instantiate_config(config_cls: type, config_dict: Mapping[str, Any]):
    """``config_cls(**config_dict)``, dropping (with a warning) keys the class does not accept.

    Mirrors PEFT's forward-compatibility rule in ``PeftConfigMixin.from_peft_type`` (a config saved by a newer
    version may carry fields this version lacks), but decides up front from the dataclass fields instead of
    parsing the ``TypeError`` message, so a genuine ``TypeError`` raised by validation is never swallowed.
    """
    accepted = {f.name for f in dataclasses.fields(config_cls) if f.init}
    kwargs = dict(config_dict)
    unexpected = sorted(set(kwargs) - accepted)
    if unexpected:
        warnings.warn(
            f"Unexpected keyword arguments {unexpected} for class {config_cls.__name__}, these are ignored. This "
            "probably means the adapter was saved with a newer version of peft-fed or PEFT; upgrade before "
            "relying on it.",
            stacklevel=3,
        )
        for key in unexpected:
            del kwargs[key]
    return config_cls(**kwargs)


def config_from_dict(config_dict: Mapping[str, Any]):
    """Build the right config object from a saved ``adapter_config.json`` dict.

    Use this (or ``PeftConfig.from_peft_type(**config_dict)`` once peft-fed is imported) instead of
    ``peft.get_peft_config``, which indexes ``PEFT_TYPE_TO_CONFIG_MAPPING`` directly, bypasses the dispatch
    and rejects the federated fields. Needs no hook: it works on a PEFT where the dispatch could not be installed.
    """
    config_cls = resolve_config_class(config_dict)
    if config_cls is not None:
        return instantiate_config(config_cls, config_dict)
    return peft_from_peft_type()(PeftConfigMixin, **config_dict)


def _hooked_from_peft_type() -> Any:
    """The raw ``from_peft_type`` attribute in ``PeftConfigMixin``'s own namespace, or ``None``."""
    return None if PeftConfigMixin is None else PeftConfigMixin.__dict__.get("from_peft_type")


def _fallback_from_peft_type(cls, **kwargs):
    """What ``PeftConfigMixin.from_peft_type`` does, for a PEFT without it: pick the class by ``peft_type``."""
    config_cls = cls
    peft_type = kwargs.get("peft_type")
    if peft_type is not None:
        try:
            from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

            config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
        except (ImportError, KeyError):
            pass
    return instantiate_config(config_cls, kwargs)


def peft_from_peft_type():
    """PEFT's own ``PeftConfigMixin.from_peft_type`` function (unbound), whether or not our wrapper is installed.

    On a PEFT without that classmethod, a stand-in that picks the class by ``peft_type`` the same way.
    """
    function = getattr(_hooked_from_peft_type(), "__func__", None)
    if not callable(function):
        return _fallback_from_peft_type
    return getattr(function, "__peft_fed_original__", function)


# Reasons already warned about in this process (tests reset it to get a fresh registration state).
_WARNED: set[str] = set()

_LOST_DISPATCH = (
    "loading through PEFT's own loaders (PeftConfig/PeftModel/AutoPeftModel*.from_pretrained, load_adapter, "
    "transformers' load_adapter) gives a plain LoraConfig for FedSmoothLoRA/Subspace-Reg adapters and drops "
    "their federated fields; pass the config explicitly instead: "
    "PeftModel.from_pretrained(model, path, config=FedSmoothLoraConfig.from_pretrained(path)) "
    "(or peft_fed.tuners.config_from_dict)"
)
_LOST_CHECK = (
    "get_peft_model no longer checks FedSmoothLoRA/Subspace-Reg ranks and layer types against the model before "
    "injecting; call config.validate_model(model) yourself"
)


def _install_config_dispatch() -> str | None:
    """Wrap ``PeftConfigMixin.from_peft_type``; ``None`` on success (or already done), else the reason it can't."""
    current = _hooked_from_peft_type()
    original = getattr(current, "__func__", None)
    if not isinstance(current, classmethod) or not callable(original):
        found = "is missing" if current is None else f"is a {type(current).__name__}, not a classmethod"
        return f"peft.config.PeftConfigMixin.from_peft_type {found}"
    if getattr(original, _WRAPPER_MARK, False):
        return None

    @functools.wraps(original)
    def from_peft_type(cls, *args, **kwargs):
        # PEFT calls it with keyword arguments only; anything else is a signature we do not know: pass it on.
        if not args:
            config_cls = resolve_config_class(kwargs)
            if config_cls is not None:
                return instantiate_config(config_cls, kwargs)
        return original(cls, *args, **kwargs)

    setattr(from_peft_type, _WRAPPER_MARK, True)
    # Keep a handle on PEFT's function so tests and a future uninstall can reach it.
    from_peft_type.__peft_fed_original__ = original
    PeftConfigMixin.from_peft_type = classmethod(from_peft_type)
    logger.debug("peft-fed: installed federated config dispatch on PeftConfigMixin.from_peft_type")
    return None


def _run_pre_injection_check(args: tuple, kwargs: dict) -> None:
    # Found by type, not position, so a reordered or extended signature still gets the check.
    candidates = [*args, *kwargs.values()]
    config = next((a for a in candidates if callable(getattr(a, PRE_INJECTION_HOOK, None))), None)
    if config is None:
        return  # not one of our configs (plain LoRA): PEFT's behaviour, untouched
    model = next((a for a in candidates if isinstance(a, nn.Module)), None)
    if model is None:
        warnings.warn(
            "peft-fed: LoraModel._prepare_model was called without a model argument (a PEFT signature peft-fed "
            f"does not know), so {_LOST_CHECK}.",
            PeftFedCompatibilityWarning,
            stacklevel=3,
        )
        return
    getattr(config, PRE_INJECTION_HOOK)(model)


def _install_pre_injection_check() -> str | None:
    """Wrap ``LoraModel._prepare_model``; ``None`` on success (or already done), else the reason it can't."""
    try:
        from peft.tuners.lora import LoraModel
    except ImportError:
        return "peft.tuners.lora.LoraModel cannot be imported"
    # getattr_static: a staticmethod/classmethod/property in its place is "another shape", which a plain
    # function assigned to the class would call with the wrong arguments.
    raw = inspect.getattr_static(LoraModel, "_prepare_model", None)
    if not inspect.isfunction(raw):
        found = "is missing" if raw is None else f"is a {type(raw).__name__}, not a method"
        return f"peft.tuners.lora.LoraModel._prepare_model {found}"
    if getattr(raw, _WRAPPER_MARK, False):
        return None
    original = raw

    @functools.wraps(original)
    def _prepare_model(self, *args, **kwargs):
        _run_pre_injection_check(args, kwargs)
        return original(self, *args, **kwargs)

    setattr(_prepare_model, _WRAPPER_MARK, True)
    _prepare_model.__peft_fed_original__ = original
    LoraModel._prepare_model = _prepare_model
    logger.debug("peft-fed: installed pre-injection check on LoraModel._prepare_model")
    return None


def register_peft_fed_types() -> None:
    """Register peft-fed's config classes and install the PEFT hooks. Safe to call any number of times.

    Never raises because of the PEFT version: a hook whose target this PEFT lacks (or has in another shape)
    is skipped with one ``PeftFedCompatibilityWarning`` that names what is lost.
    """
    from .fedsmooth_lora import FedSmoothLoraConfig
    from .subspace_reg_lora import SubspaceRegLoraConfig

    # Registered here rather than as an import side effect of the tuner packages, so that a second call (or a
    # reload of this module, which empties the registry) always ends with a complete registry.
    for config_cls in (FedSmoothLoraConfig, SubspaceRegLoraConfig):
        register_federated_config(config_cls.FEDERATED_METHOD, config_cls)
    lost = []
    for install, what in (
        (_install_config_dispatch, _LOST_DISPATCH),
        (_install_pre_injection_check, _LOST_CHECK),
    ):
        try:
            reason = install()
        except Exception as exc:  # noqa: BLE001 - an unforeseen PEFT layout must not break `import peft_fed`
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None and reason not in _WARNED:
            _WARNED.add(reason)  # once per process: `import peft_fed` calls this more than once
            lost.append(f"  - {reason}: {what}.")
    if lost:
        warnings.warn(
            f"peft-fed could not install all its hooks into PEFT {getattr(peft, '__version__', '?')} "
            "(a PEFT release peft-fed was not tested with?). What is lost:\n" + "\n".join(lost),
            PeftFedCompatibilityWarning,
            stacklevel=2,
        )


def peft_fed_hooks_installed() -> bool:
    """Whether both PEFT hooks are in place (e.g. for a health check in the CLI)."""
    dispatch = getattr(getattr(_hooked_from_peft_type(), "__func__", None), _WRAPPER_MARK, False)
    try:
        from peft.tuners.lora import LoraModel
    except ImportError:
        return False
    check = getattr(inspect.getattr_static(LoraModel, "_prepare_model", None), _WRAPPER_MARK, False)
    return bool(dispatch and check)
