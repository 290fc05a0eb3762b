"""The peer benchmark's transcription of OpenFedLLM (``benchmarks/peers.py``): its FedAvg step is peft-fed's FedIT
aggregation, so the two designs do the same federated work; no model is loaded."""

from __future__ import annotations

import copy
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from peft_fed.state import LayerSpec, Upload
from peft_fed.strategies import get_strategy


@pytest.fixture(scope="module")
def peers():
    """The benchmark's functions (its top level imports the standard library alone; nothing runs)."""
    return SimpleNamespace(**runpy.run_path(str(Path(__file__).resolve().parents[2] / "benchmarks" / "peers.py")))


def _peft_state_dict(specs, head, generator):
    """A random ``get_peft_model_state_dict``-shaped dict: ``<layer>.lora_A.weight`` / ``.lora_B.weight`` + a head."""
    state = {}
    for name, spec in specs.items():
        state[f"{name}.lora_A.weight"] = torch.randn(spec.A_shape, generator=generator)
        state[f"{name}.lora_B.weight"] = torch.randn(spec.B_shape, generator=generator)
    state["classifier.weight"] = torch.randn(head, generator=generator)
    return state


def test_openfedllm_fedavg_is_fedit_aggregation(peers):
    specs = {
        "base_model.model.bert.encoder.layer.0.attention.self.query": LayerSpec(6, 5, 2, 2.0),
        "base_model.model.bert.encoder.layer.0.attention.self.value": LayerSpec(6, 5, 2, 2.0),
    }
    generator = torch.Generator().manual_seed(0)
    num_clients = 7
    local_dict_list = [_peft_state_dict(specs, (1, 6), generator) for _ in range(num_clients)]
    sample_num_list = [16, 3, 9, 16, 1, 12, 5]
    clients = peers.openfedllm_clients_this_round(num_clients, 4, round_index=2)
    assert len(clients) == 4 and clients == sorted(clients)
    assert peers.openfedllm_clients_this_round(3, 4, round_index=0) == [0, 1, 2]  # fewer clients than the sample
    global_dict = peers.openfedllm_fedavg(copy.deepcopy(local_dict_list[0]), local_dict_list, sample_num_list, clients)

    strategy = get_strategy("fedit", specs)
    state, _ = strategy.init_server(extras={"classifier.weight": torch.zeros(1, 6)})
    uploads = [
        Upload(
            client_id=str(c),
            num_samples=sample_num_list[c],
            layers={n: {"A": local_dict_list[c][f"{n}.lora_A.weight"], "B": local_dict_list[c][f"{n}.lora_B.weight"]}
                    for n in specs},
            extras={"classifier.weight": local_dict_list[c]["classifier.weight"]},
        )  # fmt: skip
        for c in clients
    ]
    result = strategy.aggregate(state, uploads)
    assert result.accepted == [str(c) for c in clients]
    for name in specs:
        for key in ("A", "B"):
            torch.testing.assert_close(global_dict[f"{name}.lora_{key}.weight"], result.state.layers[name][key])
    torch.testing.assert_close(global_dict["classifier.weight"], result.state.extras["classifier.weight"])
    # the clients outside the round do not count: moving one of them changes nothing
    outside = next(c for c in range(num_clients) if c not in clients)
    moved = copy.deepcopy(local_dict_list)
    moved[outside] = {k: v + 100.0 for k, v in moved[outside].items()}
    again = peers.openfedllm_fedavg(copy.deepcopy(local_dict_list[0]), moved, sample_num_list, clients)
    for key, tensor in global_dict.items():
        torch.testing.assert_close(again[key], tensor)


def test_openfedllm_round_dataset_is_their_per_round_draw(peers):
    datasets = pytest.importorskip("datasets")
    client = datasets.Dataset.from_dict({"i": list(range(20))})
    first = peers.openfedllm_dataset_this_round(client, 0, batch_size=8, gradient_accumulation_steps=1, max_steps=2)
    assert len(first) == 16 and len(set(first["i"])) == 16  # batch x steps distinct rows
    assert first["i"] == peers.openfedllm_dataset_this_round(client, 0, 8, 1, 2)["i"]  # random.seed(round)
    assert len(peers.openfedllm_dataset_this_round(client.select(range(5)), 1, 8, 1, 2)) == 5  # all a small client has
