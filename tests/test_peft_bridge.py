"""The PEFT bridge: factors, orientation (nn.Linear and Conv1D), exact backbone restore, and the
activation-based full-weight gradient against autograd."""

from __future__ import annotations

import pytest
import torch
from tiny_models import classification_loss, lm_loss, lora_bert, lora_gpt2, token_batch

from peft_fed import peft_bridge
from peft_fed.linalg import LowRank


@pytest.mark.parametrize("make", [lora_bert, lora_gpt2])
def test_specs_and_factor_round_trip(make):
    model = make()
    specs = peft_bridge.layer_specs(model)
    assert specs and all(s.rank == 4 for s in specs.values())
    g = torch.Generator().manual_seed(0)
    factors = {n: LowRank(torch.randn(s.B_shape, generator=g), torch.randn(s.A_shape, generator=g)) for n, s in specs.items()}
    peft_bridge.set_factors(model, factors, train_A=False)
    back = peft_bridge.get_factors(model)
    assert all(torch.equal(back[n].B, factors[n].B) and torch.equal(back[n].A, factors[n].A) for n in specs)
    layer = next(iter(peft_bridge.lora_layers(model).values()))
    assert not layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad


def test_layer_names_are_base_model_names():
    names = list(peft_bridge.layer_specs(lora_bert()))
    assert names[0] == "bert.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize("make, batch_fn", [(lora_bert, lambda: token_batch()), (lora_gpt2, lambda: token_batch())])
def test_merge_in_weight_orientation_matches_adapter(make, batch_fn):
    """Adding s*B@A to W through the bridge gives the same outputs as the adapter itself (Conv1D too)."""
    model = make()
    specs = peft_bridge.layer_specs(model)
    g = torch.Generator().manual_seed(1)
    factors = {n: LowRank(0.1 * torch.randn(s.B_shape, generator=g), 0.1 * torch.randn(s.A_shape, generator=g)) for n, s in specs.items()}
    peft_bridge.set_factors(model, factors)
    batch = batch_fn()
    batch.pop("labels")
    with torch.no_grad():
        with_adapter = model(**batch).logits
        peft_bridge.add_to_base_weights(model, {n: specs[n].scale * f.dense() for n, f in factors.items()})
        with peft_bridge.adapters_disabled(model):
            merged = model(**batch).logits
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=1e-5)


def test_backbone_offsets_restore_bit_exactly():
    model = lora_bert()
    before = peft_bridge.base_weights(model)
    offsets = {n: torch.randn_like(w) * 1e-3 for n, w in before.items()}
    with peft_bridge.backbone_offsets(model, offsets):
        shifted = peft_bridge.base_weights(model)
        assert all(not torch.equal(shifted[n], before[n]) for n in before)
    after = peft_bridge.base_weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize("make, loss_fn", [(lora_bert, classification_loss), (lora_gpt2, lm_loss)])
def test_activation_gradient_equals_autograd_weight_gradient(make, loss_fn):
    model = make()
    batches = [token_batch(seed=s) for s in range(2)]
    offsets = {n: torch.randn_like(w) * 1e-2 for n, w in peft_bridge.base_weights(model).items()}
    got = peft_bridge.full_weight_gradients(model, batches, loss_fn, offsets)

    # reference: autograd on the weights themselves, adapters out, at W + offsets
    layers = peft_bridge.lora_layers(model)
    with peft_bridge.backbone_offsets(model, offsets), peft_bridge.adapters_disabled(model):
        weights = [layer.get_base_layer().weight for layer in layers.values()]
        for w in weights:
            w.requires_grad_(True)
        total = [torch.zeros_like(w) for w in weights]
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), weights)
            total = [t + g for t, g in zip(total, grads, strict=True)]
        for w in weights:
            w.requires_grad_(False)
    for (name, layer), t in zip(layers.items(), total, strict=True):
        expected = (t / len(batches)).mT if getattr(layer, "fan_in_fan_out", False) else t / len(batches)
        torch.testing.assert_close(got[name], expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("make, loss_fn", [(lora_bert, classification_loss), (lora_gpt2, lm_loss)])
def test_gradient_estimate_stays_where_it_was_computed(make, loss_fn, monkeypatch):
    """The estimate is the client's working tensor: it is returned on its layer's device, never copied to the CPU
    (on a GPU that copy was one m x n transfer per layer, client and round). Spied: no ``.to``/``.cpu`` call
    asks for the CPU with a tensor of a layer's weight shape while the estimate runs."""
    model = make()
    shapes = {tuple(w.shape) for w in peft_bridge.base_weights(model).values()}
    shapes |= {shape[::-1] for shape in shapes}
    asked: list[tuple[int, ...]] = []
    to, cpu = torch.Tensor.to, torch.Tensor.cpu

    def spy_to(tensor, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **{k: v for k, v in kwargs.items() if k != "copy"})[0]
        if device is not None and device.type == "cpu" and tuple(tensor.shape) in shapes:
            asked.append(tuple(tensor.shape))
        return to(tensor, *args, **kwargs)

    def spy_cpu(tensor, *args, **kwargs):
        if tuple(tensor.shape) in shapes:
            asked.append(tuple(tensor.shape))
        return cpu(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    monkeypatch.setattr(torch.Tensor, "cpu", spy_cpu)
    gradients = peft_bridge.full_weight_gradients(model, [token_batch()], loss_fn)
    monkeypatch.undo()
    assert asked == []
    layers = peft_bridge.lora_layers(model)
    assert all(g.device == layers[n].get_base_layer().weight.device and g.dtype == torch.float32 for n, g in gradients.items())


def test_gradient_estimation_leaves_training_state_untouched():
    model = lora_bert()
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    peft_bridge.full_weight_gradients(model, [token_batch()], classification_loss)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_extras_are_heads():
    model = lora_bert()
    names = peft_bridge.trainable_extra_names(model)
    assert names and all("classifier" in n for n in names)
    extras = peft_bridge.get_extras(model, names)
    peft_bridge.set_extras(model, {k: v + 1 for k, v in extras.items()})
    assert all(torch.equal(peft_bridge.get_extras(model, names)[k], v + 1) for k, v in extras.items())


def test_model_without_lora_is_a_clear_error():
    from tiny_models import tiny_bert

    with pytest.raises(ValueError, match="get_peft_model"):
        peft_bridge.layer_specs(tiny_bert())


@pytest.mark.parametrize(
    ("targets", "listed"),
    [(["conv"], ["conv (Conv2d)"]), (["emb"], ["emb (Embedding)"]), (["fc", "emb", "conv"], ["emb (Embedding)", "conv (Conv2d)"])],
)
def test_plain_lora_on_embedding_or_conv_is_refused(targets, listed):
    """PEFT itself adapts Embedding and Conv layers; every bridge entry point refuses them with one clear error,
    so a plain-LoRA run fails before training (instead of crashing in set_factors, or averaging
    lora_embedding_A/B as if they were heads)."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 16)
            self.conv = nn.Conv2d(3, 16, 3)
            self.fc = nn.Linear(16, 16)

    model = get_peft_model(Mixed(), LoraConfig(r=2, target_modules=targets))
    for call in (peft_bridge.layer_specs, peft_bridge.get_factors, peft_bridge.base_weights):
        with pytest.raises(ValueError) as info:
            call(model)
        message = str(info.value)
        assert "supports LoRA only on torch.nn.Linear and transformers' Conv1D layers" in message
        assert all(f"  - {entry}" in message for entry in listed)
        assert "fc (" not in message
    # What the strategies would otherwise have averaged as trainable "extras".
    if "emb" in targets:
        assert any("lora_embedding_A" in name for name in peft_bridge.trainable_extra_names(model))
