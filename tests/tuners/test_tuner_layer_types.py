"""Layer types: only nn.Linear and transformers' Conv1D are accepted; Embedding and Conv targets are refused
before injection, with one error that names the layers, their types and what is supported."""

from __future__ import annotations

import pytest
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_fed.tuners import FedSmoothLoraConfig, SubspaceRegLoraConfig

SUPPORTED = "supports LoRA only on torch.nn.Linear and transformers' Conv1D layers"


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.conv = nn.Conv2d(3, 16, 3)
        self.conv1d = nn.Conv1d(3, 16, 3)
        self.fc = nn.Linear(16, 16)


def has_lora_layers(model: nn.Module) -> bool:
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


@pytest.mark.parametrize("config_cls", [FedSmoothLoraConfig, SubspaceRegLoraConfig])
@pytest.mark.parametrize(
    ("targets", "listed"),
    [
        (["conv"], ["conv (Conv2d)"]),
        (["emb"], ["emb (Embedding)"]),
        (["fc", "emb", "conv", "conv1d"], ["emb (Embedding)", "conv (Conv2d)", "conv1d (Conv1d)"]),
    ],
)
def test_get_peft_model_refuses_embedding_and_conv(config_cls, targets, listed):
    model = Mixed()
    config = config_cls(r=2, target_modules=targets)
    with pytest.raises(ValueError) as info:
        get_peft_model(model, config)
    message = str(info.value)
    assert SUPPORTED in message
    for entry in listed:
        assert f"  - {entry}" in message
    assert "fc (" not in message  # the Linear layer is fine and not listed
    assert "exclude_modules" in message
    assert not has_lora_layers(model)  # refused before any layer was replaced
    with pytest.raises(ValueError, match="Conv1D layers"):
        config.validate_model(model)  # the same check, callable without PEFT

    if "fc" in targets:  # leaving the unsupported layers out is enough
        excluded = config_cls(r=2, target_modules=targets, exclude_modules=["emb", "conv", "conv1d"])
        assert has_lora_layers(get_peft_model(model, excluded))
