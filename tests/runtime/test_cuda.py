"""The runtime on a CUDA device: every method trains there and ends where its CPU run ends.

Skipped without a GPU (CI has none); run it on a GPU machine with ``pytest tests/runtime/test_cuda.py``.
It guards the device boundary of ``peft_bridge``: strategies get CPU tensors, the model keeps its device.
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
