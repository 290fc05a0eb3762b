"""The runtime on a CUDA device: every method trains there and ends where its CPU run ends.

Skipped without a GPU (CI has none); run it on a GPU machine with ``pytest tests/runtime/test_cuda.py``.
It guards the device boundary of ``peft_bridge``: strategies get CPU tensors (factors, heads, base weights) and the
model keeps its device; the one exception, FedSmoothLoRA's gradient estimate, stays on the model's device with the
client's mathematics on it, and what the client sends or keeps comes back to the CPU.
"""

from __future__ import annotations

import pytest
import torch
from fed_setup import assert_states_close, final_state, make_trainer

from peft_fed.strategies.registry import STRATEGIES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_method_on_cuda_matches_its_cpu_run(tmp_path, method):
    cpu = make_trainer(method, tmp_path / "cpu")
    cpu.train()
    gpu = make_trainer(method, tmp_path / "cuda", use_cpu=False)
    gpu.train()
    assert next(gpu.model.parameters()).is_cuda
    state = final_state(gpu)
    assert all(t.device.type == "cpu" for t in state.values())  # what the bridge hands out is on the CPU
    # same data order and no dropout: only float32 kernel rounding separates the two devices
    assert_states_close(state, final_state(cpu), atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# FedSmoothLoRA's client mathematics on the model's device (issue 16): the gradient estimate, its SVD, the start factors
# and the dense offsets stay on the GPU; what a client sends or keeps is on the CPU; the round is the CPU's round.


@pytest.mark.parametrize("method", ["randomized", "full"])
def test_svd_with_cpu_signs_on_cuda_equals_the_cpu_one(method):
    """Singular vectors themselves (not only their products) agree with the CPU's: the sketch is drawn on the CPU, and
    the sign-deciding factorization runs there (cuSOLVER picks other signs than LAPACK, pytorch/pytorch#97410)."""
    from peft_fed.linalg import truncated_svd

    generator = torch.Generator().manual_seed(0)
    low = torch.randn(600, 12, generator=generator) @ torch.randn(12, 700, generator=generator)
    matrix = low + 1e-2 * torch.randn(600, 700, generator=generator)
    cpu = truncated_svd(matrix, 8, method=method, generator_seed=0, cpu_signs=True)
    gpu = truncated_svd(matrix.cuda(), 8, method=method, generator_seed=0, cpu_signs=True)
    assert all(t.is_cuda for t in gpu)
    for got, expected in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-3)


def _record_client_side(trainer) -> dict[str, list]:
    """Keep every gradient estimate's, start's and upload's tensors of ``trainer``'s strategy (instance attributes wrap
    its methods; the runtime calls them by attribute)."""
    seen: dict[str, list] = {"gradients": [], "starts": [], "uploads": [], "states": []}
    strategy = trainer.strategy
    begin, end = strategy.client_begin, strategy.client_end

    def client_begin(broadcast, client_state, gradient_fn=None):
        def recorded(offsets):
            gradients = gradient_fn(offsets)
            seen["gradients"].append(gradients)
            return gradients

        start = begin(broadcast, client_state, recorded)
        seen["starts"].append(start)
        return start

    def client_end(*args, **kwargs):
        upload, state = end(*args, **kwargs)
        seen["uploads"].append(upload)
        seen["states"].append(state)
        return upload, state

    strategy.client_begin, strategy.client_end = client_begin, client_end
    return seen


@pytest.mark.parametrize("svd_method", ["auto", "randomized"])
def test_fedsmoothlora_client_maths_stays_on_cuda_and_the_round_equals_the_cpu_round(tmp_path, svd_method):
    runs = {}
    for device in ("cpu", "cuda"):
        trainer = make_trainer("fedsmoothlora", tmp_path / device, use_cpu=device == "cpu", num_rounds=2,
                               method_kwargs={"svd_method": svd_method, "zeta": 0.5})  # fmt: skip
        seen = _record_client_side(trainer)
        trainer.train()
        runs[device] = (trainer, seen)
    (cpu, cpu_seen), (gpu, gpu_seen) = runs["cpu"], runs["cuda"]
    assert next(gpu.model.parameters()).is_cuda
    assert gpu_seen["gradients"] and all(g.is_cuda for gradients in gpu_seen["gradients"] for g in gradients.values())
    for start in gpu_seen["starts"]:  # the SVDs' results and the dense offsets: on the GPU, never via the CPU
        assert all(f.B.is_cuda and f.A.is_cuda for f in start.factors.values())
        assert all(offset.is_cuda for offset in start.backbone_offsets.values())
    for record in gpu_seen["uploads"] + gpu_seen["states"]:  # what a client sends and keeps: on the CPU
        assert all(t.device.type == "cpu" for tensors in record.layers.values() for t in tensors.values())
    # the same rounds: the gradient-aligned start (sign-sensitive), every upload's product, the merged backbone
    assert len(gpu_seen["starts"]) == len(cpu_seen["starts"])
    for got, expected in zip(gpu_seen["starts"], cpu_seen["starts"], strict=True):
        for name, offset in expected.backbone_offsets.items():
            torch.testing.assert_close(got.backbone_offsets[name].cpu(), offset, atol=1e-4, rtol=1e-3)
    for got, expected in zip(gpu_seen["uploads"], cpu_seen["uploads"], strict=True):
        for name, tensors in expected.layers.items():
            product = got.layers[name]["B"] @ got.layers[name]["A"]
            torch.testing.assert_close(product, tensors["B"] @ tensors["A"], atol=1e-4, rtol=1e-3)
    assert_states_close(final_state(gpu), final_state(cpu), atol=1e-4, rtol=1e-3)
