"""FedSmoothLoraConfig / SubspaceRegLoraConfig: defaults, validation, serialisation, config-class dispatch."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import warnings

import pytest
from peft import LoraConfig, PeftConfig, PeftType
from peft.config import PeftConfigMixin
from peft.tuners.lora import LoraModel

import peft_fed.tuners as tuners
from peft_fed.tuners import (
    FederatedLoraConfig,
    FedSmoothLoraConfig,
    SubspaceRegLoraConfig,
    config_from_dict,
    register_peft_fed_types,
    registration,
)

FEDSMOOTH_FIELDS = {
    "federated_method": "fedsmoothlora",
    "zeta": 1.0,
    "zeta_schedule": "constant",
    "zeta_min": 0.0,
    "gamma": 64.0,
    "num_gradient_batches": 8,
    "svd_method": "auto",
    "svd_oversampling": None,
    "svd_power_iterations": 4,
    "exact_round_matching": False,
}
SUBSPACE_FIELDS = {
    "federated_method": "subspace_reg",
    "mu": 0.05,
    "beta": 0.01,
    "lam": 1e-5,
    "normalize_by_num_layers": True,
    "clip_norm": 15.0,
    "restore_norm_into": "A",
}


@pytest.mark.parametrize(
    ("config_cls", "expected"),
    [(FedSmoothLoraConfig, FEDSMOOTH_FIELDS), (SubspaceRegLoraConfig, SUBSPACE_FIELDS)],
)
def test_defaults_and_help(config_cls, expected):
    config = config_cls()
    assert isinstance(config, LoraConfig)
    assert config.peft_type == PeftType.LORA
    assert {name: getattr(config, name) for name in expected} == expected
    own_fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for name in expected:
        help_text = own_fields[name].metadata.get("help", "")
        assert len(help_text) > 20, f"{name} has no help string"


def test_numbers_are_normalised_to_float():
    config = FedSmoothLoraConfig(zeta=1, gamma=256)
    assert isinstance(config.zeta, float) and isinstance(config.gamma, float)
    assert SubspaceRegLoraConfig(mu=0, clip_norm=25).clip_norm == 25.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"zeta": -0.1}, "zeta"),
        ({"zeta": 1.5}, "zeta"),
        ({"zeta": math.nan}, "zeta"),
        ({"zeta": "1"}, "zeta"),
        ({"zeta_schedule": "linear"}, "zeta_schedule"),
        ({"zeta_min": -0.5}, "zeta_min"),
        ({"zeta": 0.4, "zeta_min": 0.5}, "zeta_min"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -64.0}, "gamma"),
        ({"num_gradient_batches": 0}, "num_gradient_batches"),
        ({"num_gradient_batches": 2.5}, "num_gradient_batches"),
        ({"num_gradient_batches": True}, "num_gradient_batches"),
        ({"svd_method": "qr"}, "svd_method"),
        ({"r": 4, "svd_oversampling": 7}, "svd_oversampling"),
        ({"r": 4, "rank_pattern": {"query": 8}, "svd_oversampling": 8}, "svd_oversampling"),
        ({"svd_power_iterations": -1}, "svd_power_iterations"),
        ({"exact_round_matching": "yes"}, "exact_round_matching"),
        ({"federated_method": "subspace_reg"}, "federated_method"),
        ({"r": 0}, "`r`"),
        ({"rank_pattern": {"query": 0}}, "rank_pattern"),
        ({"use_dora": True}, "use_dora"),
        pytest.param(
            {"target_parameters": ["mlp.experts.down_proj"]},
            "target_parameters",
            marks=pytest.mark.skipif(
                "target_parameters" not in {f.name for f in dataclasses.fields(LoraConfig)},
                reason="this PEFT has no LoraConfig.target_parameters (added in PEFT 0.17)",
            ),
        ),
    ],
)
def test_fedsmooth_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FedSmoothLoraConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mu": -0.05}, "mu"),
        ({"beta": -1e-3}, "beta"),
        ({"lam": -1e-5}, "lam"),
        ({"mu": "0.1"}, "mu"),
        ({"normalize_by_num_layers": 1}, "normalize_by_num_layers"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": -15.0}, "clip_norm"),
        ({"clip_norm": math.inf}, "clip_norm"),
        ({"restore_norm_into": "B"}, "restore_norm_into"),
        ({"federated_method": "fedsmoothlora"}, "federated_method"),
        ({"use_dora": True}, "use_dora"),
    ],
)
def test_subspace_reg_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubspaceRegLoraConfig(**kwargs)


def test_valid_edge_values():
    assert FedSmoothLoraConfig(zeta=0.0).zeta == 0.0
    assert FedSmoothLoraConfig(zeta=0.5, zeta_min=0.5, zeta_schedule="cosine").zeta_min == 0.5
    assert FedSmoothLoraConfig(r=4, svd_oversampling=8, svd_power_iterations=0).svd_oversampling == 8
    config = SubspaceRegLoraConfig(mu=0.0, beta=0.0, lam=0.0, clip_norm=None, restore_norm_into="both")
    assert config.clip_norm is None and config.restore_norm_into == "both"


def test_base_class_is_abstract():
    with pytest.raises(TypeError, match="base class"):
        FederatedLoraConfig()


def test_zeta_schedule_values():
    constant = FedSmoothLoraConfig(zeta=0.7)
    assert [constant.zeta_at(t, 10) for t in (0, 5, 10)] == [0.7, 0.7, 0.7]
    cosine = FedSmoothLoraConfig(zeta=1.0, zeta_min=0.5, zeta_schedule="cosine")
    assert cosine.zeta_at(0, 10) == pytest.approx(1.0)
    assert cosine.zeta_at(5, 10) == pytest.approx(0.75)
    assert cosine.zeta_at(10, 10) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="num_rounds"):
        cosine.zeta_at(0, 0)


@pytest.mark.parametrize("config_cls", [FedSmoothLoraConfig, SubspaceRegLoraConfig])
def test_config_save_load_keeps_class_and_fields(tmp_path, config_cls):
    special = {"zeta": 0.3, "zeta_schedule": "cosine", "gamma": 256.0, "svd_oversampling": 16}
    if config_cls is SubspaceRegLoraConfig:
        special = {
            "mu": 0.1,
            "clip_norm": None,
            "restore_norm_into": "both",
            "normalize_by_num_layers": False,
        }
    config = config_cls(r=4, lora_alpha=8, target_modules=["query", "value"], **special)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    assert saved["federated_method"] == config_cls.FEDERATED_METHOD
    for name, value in special.items():
        assert saved[name] == value

    # Every loader PEFT uses for a LoRA adapter ends up in the right class with the same fields.
    for loader in (PeftConfig, LoraConfig, config_cls, FedSmoothLoraConfig):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is config_cls, loader
        assert loaded.to_dict() == config.to_dict()
    assert type(config_from_dict(saved)) is config_cls
    assert type(PeftConfig.from_peft_type(**saved)) is config_cls


def test_plain_lora_config_adopted_by_federated_class(tmp_path):
    LoraConfig(r=4, target_modules=["query"]).save_pretrained(tmp_path)
    assert type(PeftConfig.from_pretrained(tmp_path)) is LoraConfig
    adopted = FedSmoothLoraConfig.from_pretrained(tmp_path)
    assert type(adopted) is FedSmoothLoraConfig
    assert adopted.r == 4 and adopted.zeta == 1.0


def test_unknown_method_and_extra_keys_warn(tmp_path):
    config_dict = FedSmoothLoraConfig(r=4).to_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = config_from_dict({**config_dict, "federated_method": "fedfuture"})
    assert type(plain) is LoraConfig
    messages = [str(w.message) for w in caught]
    assert any("'fedfuture'" in m and "plain LoRA" in m for m in messages)
    # ... and PEFT then drops the federated fields with its own forward-compatibility warning.
    assert any("Unexpected keyword arguments" in m and "zeta" in m for m in messages)

    with pytest.warns(UserWarning, match="field_from_the_future"):
        loaded = PeftConfig.from_peft_type(**config_dict, field_from_the_future=3)
    assert type(loaded) is FedSmoothLoraConfig


def test_non_federated_loading_is_untouched(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(PeftConfig.from_peft_type(**LoraConfig(r=2).to_dict())) is LoraConfig


def test_registration_is_idempotent():
    dispatch_before = PeftConfigMixin.__dict__["from_peft_type"]
    prepare_before = LoraModel.__dict__["_prepare_model"]
    register_peft_fed_types()
    register_peft_fed_types()
    importlib.reload(registration)
    register_peft_fed_types()
    assert PeftConfigMixin.__dict__["from_peft_type"] is dispatch_before
    assert LoraModel.__dict__["_prepare_model"] is prepare_before
    # Exactly one wrapper layer around PEFT's own functions.
    original = registration.peft_from_peft_type()
    assert not hasattr(original, "__peft_fed_original__")
    assert dispatch_before.__func__.__peft_fed_original__ is original
    assert not hasattr(prepare_before.__peft_fed_original__, "__peft_fed_original__")
    assert tuners.peft_fed_hooks_installed()
    assert tuners.registered_federated_methods() == {
        "fedsmoothlora": FedSmoothLoraConfig,
        "subspace_reg": SubspaceRegLoraConfig,
    }
    assert hasattr(FederatedLoraConfig, registration.PRE_INJECTION_HOOK)


def test_registry_rejects_conflicts():
    with pytest.raises(KeyError, match="already registered"):
        tuners.register_federated_config("fedsmoothlora", SubspaceRegLoraConfig)
    with pytest.raises(TypeError, match="LoraConfig"):
        tuners.register_federated_config("other", dict)


@pytest.mark.parametrize(
    ("config_cls", "own"), [(FedSmoothLoraConfig, FEDSMOOTH_FIELDS), (SubspaceRegLoraConfig, SUBSPACE_FIELDS)]
)
def test_no_field_name_clash_with_peft(config_cls, own):
    # If a PEFT release adds a LoraConfig field with one of our names, our field would silently shadow it and a
    # stock-PEFT loader would read our value with PEFT's meaning: fail loudly here instead.
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert not lora_fields & set(own)
