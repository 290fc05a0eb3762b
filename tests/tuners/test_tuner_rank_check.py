"""Shape-dependent rank checks: FedSmoothLoRA's 2r <= min(m, n) and Subspace-Reg's r <= min(m, n)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_fed.tuners import (
    FedSmoothLoraConfig,
    SubspaceRegLoraConfig,
    find_adapted_layers,
    validate_fedsmooth_ranks,
    validate_subspace_reg_ranks,
)


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 64)  # m x n = 64 x 8: 2r <= 8
        self.down = nn.Linear(64, 16)  # 16 x 64: 2r <= 16
        self.emb = nn.Embedding(10, 64)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.down(self.up(x)))


def has_lora_layers(model: nn.Module) -> bool:
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def test_linear_rank_error_names_layer_shape_and_largest_r():
    model = TwoLinear()
    config = FedSmoothLoraConfig(r=5, target_modules=["up", "down"])
    with pytest.raises(ValueError) as info:
        validate_fedsmooth_ranks(config, model)
    message = str(info.value)
    assert "up: Linear, m x n = 64 x 8, r = 5, 2r = 10 > min(m, n) = 8; largest valid r = 4" in message
    assert "down" not in message.split("break it:")[1].split("The largest")[0]
    assert "1 of 2 targeted layer(s)" in message
    assert "largest single r valid for every targeted layer is 4" in message

    # get_peft_model runs the same check before touching the model.
    with pytest.raises(ValueError, match="up: Linear"):
        get_peft_model(model, config)
    assert not has_lora_layers(model)

    ok = FedSmoothLoraConfig(r=4, target_modules=["up", "down"])
    shapes = validate_fedsmooth_ranks(ok, model)
    assert [(s.name, s.out_features, s.in_features, s.r) for s in shapes] == [
        ("up", 64, 8, 4),
        ("down", 16, 64, 4),
    ]
    peft_model = get_peft_model(model, ok)
    # After injection the check reads the base layers of the LoRA layers and finds the same shapes.
    assert validate_fedsmooth_ranks(ok, peft_model) == shapes


def test_rank_pattern_and_exclusion_are_honoured():
    model = TwoLinear()
    assert (
        validate_fedsmooth_ranks(
            FedSmoothLoraConfig(r=8, target_modules=["up", "down"], rank_pattern={"up": 4}), model
        )[0].r
        == 4
    )
    with pytest.raises(ValueError, match=r"down: Linear, m x n = 16 x 64, r = 9"):
        validate_fedsmooth_ranks(
            FedSmoothLoraConfig(r=2, target_modules=["up", "down"], rank_pattern={"down": 9}), model
        )
    layers = validate_fedsmooth_ranks(
        FedSmoothLoraConfig(r=8, target_modules=["up", "down"], exclude_modules=["up"]), model
    )
    assert [layer.name for layer in layers] == ["down"]


def test_layer_too_small_for_any_rank_and_unsupported_types():
    model = nn.Sequential(nn.Linear(1, 4))
    with pytest.raises(ValueError, match="no rank fits: exclude this layer"):
        validate_fedsmooth_ranks(FedSmoothLoraConfig(r=1, target_modules=["0"]), model)
    with pytest.raises(ValueError, match=r"norm \(LayerNorm\)"):
        validate_fedsmooth_ranks(FedSmoothLoraConfig(r=1, target_modules=["norm"]), TwoLinear())
    # Embedding (and Conv) layers are not read as matrices: the bridge cannot handle them (test_tuner_layer_types).
    assert find_adapted_layers(LoraConfig(r=2, target_modules=["emb"]), TwoLinear()) == ([], [("emb", "Embedding")])


def test_gpt2_conv1d_uses_out_by_in_orientation(make_gpt2):
    model = make_gpt2()
    # c_attn is Conv1D(nf=96, nx=32) with its weight stored (in, out) = (32, 96).
    config = FedSmoothLoraConfig(r=17, target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(ValueError) as info:
        get_peft_model(model, config)
    message = str(info.value)
    for layer in (0, 1):
        assert f"transformer.h.{layer}.attn.c_attn: Conv1D, m x n = 96 x 32, r = 17, 2r = 34" in message
    assert "largest valid r = 16" in message
    assert not has_lora_layers(model)

    # Default targets of the architecture (c_attn for GPT-2) and the all-linear shorthand are resolved like PEFT.
    shapes = validate_fedsmooth_ranks(FedSmoothLoraConfig(r=16), model)
    assert {(s.layer_type, s.out_features, s.in_features) for s in shapes} == {("Conv1D", 96, 32)}
    with pytest.raises(ValueError, match="8 of 8 targeted layer"):
        validate_fedsmooth_ranks(FedSmoothLoraConfig(r=17, target_modules="all-linear"), model)
    all_linear = validate_fedsmooth_ranks(FedSmoothLoraConfig(r=2, target_modules="all-linear"), model)
    assert sorted({(s.out_features, s.in_features) for s in all_linear}) == [
        (32, 32),
        (32, 128),
        (96, 32),
        (128, 32),
    ]
    assert not any("lm_head" in s.name for s in all_linear)

    peft_model = get_peft_model(
        model, FedSmoothLoraConfig(r=16, fan_in_fan_out=True, init_lora_weights=False)
    )
    assert peft_model(input_ids=torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 100)


def test_bert_default_targets(make_bert):
    model = make_bert()
    with pytest.raises(ValueError, match=r"query: Linear, m x n = 32 x 32, r = 17, 2r = 34"):
        get_peft_model(model, FedSmoothLoraConfig(r=17, task_type="SEQ_CLS"))
    assert not has_lora_layers(model)


def test_subspace_reg_rank_bound(make_bert):
    model = make_bert()
    config = SubspaceRegLoraConfig(
        r=33, target_modules=["query", "intermediate.dense"], rank_pattern={"intermediate.dense": 32}
    )
    with pytest.raises(ValueError) as info:
        get_peft_model(model, config)
    message = str(info.value)
    assert "Subspace-Reg needs r <= min(m, n)" in message
    assert (
        "attention.self.query: Linear, m x n = 32 x 32, r = 33 > min(m, n) = 32; largest valid r = 32"
        in message
    )
    assert "intermediate.dense" not in message  # r = 32 fits the 40 x 32 layers
    assert not has_lora_layers(model)
    assert len(validate_subspace_reg_ranks(SubspaceRegLoraConfig(r=32, target_modules=["query"]), model)) == 2


def test_plain_lora_is_not_checked():
    # The hook only runs for configs that ask for it: stock LoRA keeps PEFT's behaviour.
    model = TwoLinear()
    get_peft_model(model, LoraConfig(r=9, target_modules=["up"]))
    assert has_lora_layers(model)
