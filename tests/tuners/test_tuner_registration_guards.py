"""The PEFT hooks are guarded: a PEFT without a hooked function (or with one of another shape or signature)
gets one clear PeftFedCompatibilityWarning naming what is lost, never an error, and what does not need the
hook keeps working.

Each test starts from a fresh registration state: the hooked PEFT attribute is replaced with monkeypatch
(restored afterwards, with our wrapper) and the once-per-process warning memo is emptied. The registration
module is always used through its attribute (``registration.X``): another test reloads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.config import PeftConfigMixin
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from peft_fed.tuners import FedSmoothLoraConfig, SubspaceRegLoraConfig, config_from_dict, registration


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)  # min(m, n) = 8: FedSmoothLoRA needs 2r <= 8
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return self.down(self.up(x))


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(registration, "_WARNED", set())
    return monkeypatch


def register_and_collect() -> list[str]:
    """Run the registration; return the messages of its compatibility warnings (any other warning fails)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registration.register_peft_fed_types()
    assert all(issubclass(w.category, registration.PeftFedCompatibilityWarning) for w in caught), caught
    return [str(w.message) for w in caught]


def has_lora_layers(model: nn.Module) -> bool:
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def injection_still_checked_and_works() -> None:
    with pytest.raises(ValueError, match=r"up: Linear, m x n = 16 x 8, r = 5"):
        get_peft_model(TwoLinear(), FedSmoothLoraConfig(r=5, target_modules=["up", "down"]))
    peft_model = get_peft_model(TwoLinear(), FedSmoothLoraConfig(r=4, target_modules=["up", "down"]))
    assert has_lora_layers(peft_model)


@pytest.mark.parametrize(
    ("replacement", "found"),
    [(None, "is missing"), (staticmethod(lambda **kwargs: None), "is a staticmethod, not a classmethod")],
)
def test_without_from_peft_type_warns_and_the_rest_works(fresh, tmp_path, replacement, found):
    if replacement is None:
        fresh.delattr(PeftConfigMixin, "from_peft_type")
    else:
        fresh.setattr(PeftConfigMixin, "from_peft_type", replacement)
    messages = register_and_collect()
    assert len(messages) == 1
    assert f"PeftConfigMixin.from_peft_type {found}" in messages[0]
    assert "plain LoraConfig" in messages[0] and "config=FedSmoothLoraConfig.from_pretrained(path)" in messages[0]
    assert "_prepare_model" not in messages[0]  # that hook is in place
    assert not registration.peft_fed_hooks_installed()
    assert register_and_collect() == []  # warned once per process

    # get_peft_model (with its shape check) and save_pretrained need no dispatch ...
    injection_still_checked_and_works()
    torch.manual_seed(0)
    config = FedSmoothLoraConfig(r=2, target_modules=["up"], init_lora_weights=False, gamma=16.0)
    peft_model = get_peft_model(TwoLinear(), config)
    peft_model.save_pretrained(tmp_path)
    # ... nor does loading with an explicit config, the documented fallback.
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert type(config_from_dict(saved)) is FedSmoothLoraConfig
    loaded_config = FedSmoothLoraConfig.from_pretrained(tmp_path)
    assert type(loaded_config) is FedSmoothLoraConfig and loaded_config.gamma == 16.0
    reloaded = PeftModel.from_pretrained(TwoLinear(), tmp_path, config=loaded_config)
    assert reloaded.peft_config["default"] is loaded_config
    lora_A = reloaded.base_model.model.up.lora_A["default"].weight
    torch.testing.assert_close(lora_A, peft_model.base_model.model.up.lora_A["default"].weight, rtol=0, atol=0)


def test_from_peft_type_with_another_signature_is_wrapped(fresh, tmp_path):
    original = registration.peft_from_peft_type()
    calls = []

    def from_peft_type(cls, *args, **kwargs):  # a future PEFT with a positional argument
        calls.append(args)
        return original(cls, **kwargs) if not args else ("positional", args)

    fresh.setattr(PeftConfigMixin, "from_peft_type", classmethod(from_peft_type))
    assert register_and_collect() == []
    assert registration.peft_fed_hooks_installed()
    saved = SubspaceRegLoraConfig(r=2, mu=0.2).to_dict()
    assert type(PeftConfig.from_peft_type(**saved)) is SubspaceRegLoraConfig  # dispatched by the wrapper
    assert calls == []
    assert PeftConfig.from_peft_type({"peft_type": "LORA"}) == ("positional", ({"peft_type": "LORA"},))
    assert type(PeftConfig.from_peft_type(**LoraConfig(r=2).to_dict())) is LoraConfig


@pytest.mark.parametrize(
    ("replacement", "found"),
    [(staticmethod(lambda *args, **kwargs: None), "is a staticmethod, not a method"), (42, "is a int, not a method")],
)
def test_prepare_model_of_another_shape_warns(fresh, tmp_path, replacement, found):
    fresh.setattr(LoraModel, "_prepare_model", replacement)
    messages = register_and_collect()
    assert len(messages) == 1
    assert f"LoraModel._prepare_model {found}" in messages[0]
    assert "get_peft_model no longer checks" in messages[0] and "validate_model" in messages[0]
    assert "from_peft_type" not in messages[0]  # that hook is in place
    assert not registration.peft_fed_hooks_installed()

    # Loading still dispatches to the typed classes.
    FedSmoothLoraConfig(r=2, zeta=0.5).save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is FedSmoothLoraConfig and loaded.zeta == 0.5
    if callable(replacement.__func__ if isinstance(replacement, staticmethod) else replacement):
        # get_peft_model still injects; only the early shape check is lost (validate_model still has it).
        config = FedSmoothLoraConfig(r=5, target_modules=["up", "down"])
        assert has_lora_layers(get_peft_model(TwoLinear(), config))
        with pytest.raises(ValueError, match="up: Linear"):
            config.validate_model(TwoLinear())


def test_prepare_model_only_inherited_is_still_hooked(fresh):
    # A PEFT whose LoraModel no longer overrides BaseTuner._prepare_model: the inherited one is wrapped.
    fresh.delattr(LoraModel, "_prepare_model")
    assert register_and_collect() == []
    assert registration.peft_fed_hooks_installed()
    injection_still_checked_and_works()


def test_prepare_model_missing_everywhere_warns(fresh):
    fresh.delattr(LoraModel, "_prepare_model", raising=False)
    fresh.delattr(BaseTuner, "_prepare_model", raising=False)
    messages = register_and_collect()
    assert len(messages) == 1 and "LoraModel._prepare_model is missing" in messages[0]
    assert type(PeftConfig.from_peft_type(**FedSmoothLoraConfig(r=2).to_dict())) is FedSmoothLoraConfig


def test_prepare_model_with_another_signature_keeps_the_check(fresh):
    seen = []

    def _prepare_model(self, model, peft_config=None, *, extra=None):  # reordered, with a keyword-only extra
        seen.append((type(model).__name__, type(peft_config).__name__))

    fresh.setattr(LoraModel, "_prepare_model", _prepare_model)
    assert register_and_collect() == []
    assert registration.peft_fed_hooks_installed()
    # PEFT still calls it as (peft_config, model); the wrapper finds the config and the model by type.
    injection_still_checked_and_works()
    assert seen == [("FedSmoothLoraConfig", "TwoLinear")]


def test_both_hooks_lost_give_one_warning(fresh):
    fresh.delattr(PeftConfigMixin, "from_peft_type")
    fresh.setattr(LoraModel, "_prepare_model", staticmethod(lambda *args, **kwargs: None))
    messages = register_and_collect()
    assert len(messages) == 1
    assert "from_peft_type is missing" in messages[0] and "_prepare_model is a staticmethod" in messages[0]


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import warnings
    from peft.config import PeftConfigMixin
    from peft.tuners.lora import LoraModel
    from torch import nn

    # A PEFT release that moved both hooked functions, before peft_fed is ever imported.
    del PeftConfigMixin.from_peft_type
    LoraModel._prepare_model = staticmethod(lambda *args, **kwargs: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import peft_fed
    ours = [str(w.message) for w in caught if w.category.__name__ == "PeftFedCompatibilityWarning"]
    assert len(ours) == 1, ours
    assert "from_peft_type is missing" in ours[0] and "_prepare_model is a staticmethod" in ours[0], ours

    from peft import get_peft_model
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), peft_fed.FedSmoothLoraConfig(r=2, target_modules=["0"]))
    assert type(model.peft_config["default"]).__name__ == "FedSmoothLoraConfig"
    assert hasattr(model.base_model.model[0], "lora_A")
    print("imported and injected")
    """
)


def test_import_peft_fed_on_a_peft_without_the_hooked_functions():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "imported and injected" in result.stdout
