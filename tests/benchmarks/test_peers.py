"""The peer benchmark's transcription of OpenFedLLM (``benchmarks/peers.py``): its FedAvg step is peft-fed's FedIT
aggregation, so the two designs do the same federated work; no model is loaded."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from peft_fed.state import LayerSpec, Upload
from peft_fed.strategies import get_strategy


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


def _run(variant, rss_gib, seconds, cpu_seconds, pass_index=1, num_clients=100):
    return {"design": variant.split("-")[0] if variant.startswith("flower") else variant, "variant": variant,
            "num_clients": num_clients, "pass": pass_index, "ok": True, "peak_tree_rss_bytes": rss_gib * 2**30,
            "peak_tree_pss_bytes": rss_gib * 2**30, "median_round_seconds_after_first": seconds,
            "median_round_tree_cpu_seconds_after_first": cpu_seconds}  # fmt: skip


def test_goals_compare_runs_per_pass_and_at_the_same_cores(peers):
    runs = [
        _run("peft-fed", 1.0, 13.0, 13.0), _run("peft-fed-2proc", 2.4, 9.0, 13.5), _run("openfedllm", 1.02, 18.0, 17.0),
        _run("flower-2cpu", 3.4, 20.0, 19.0), _run("flower-1cpu", 2.4, 20.0, 19.0),
        _run("peft-fed", 1.0, 30.0, 13.0, pass_index=2), _run("peft-fed-2proc", 2.4, 9.0, 13.5, pass_index=2),
        _run("openfedllm", 1.0, 18.0, 17.0, pass_index=2), _run("flower-2cpu", 3.4, 20.0, 19.0, pass_index=2),
        _run("flower-1cpu", 2.4, 20.0, 19.0, pass_index=2),
    ]  # fmt: skip
    goal = peers.goals(runs, SimpleNamespace(num_clients=[100], passes=2))
    first, second = goal["100, pass 1"], goal["100, pass 2"]
    one_core, two_cores = first["same_cores"]["1 core"], first["same_cores"]["2 cores"]
    assert set(one_core) >= {"openfedllm", "flower-1cpu"} and "flower-2cpu" not in one_core
    assert one_core["openfedllm"]["peft_fed_memory"] == "within noise"  # 1.02x: inside the 5% margin
    assert one_core["openfedllm"]["peft_fed_time"] == "ahead" and one_core["reached"] is False
    assert two_cores["peft_fed_run"] == "peft-fed-2proc" and set(two_cores) >= {"flower-2cpu"}
    assert "openfedllm" not in two_cores and two_cores["reached"] is True
    assert two_cores["flower-2cpu"]["round_seconds_ratio_peer_to_peft_fed"] == pytest.approx(20.0 / 9.0)
    # each pass reads its own runs: peft-fed's slow round in pass 2 puts it behind there only
    assert second["same_cores"]["1 core"]["openfedllm"]["peft_fed_time"] == "behind"
    assert first["openfedllm"]["peft_fed_time"] == "ahead"


def test_adapter_difference_and_launcher(peers, tmp_path):
    a = {"x.lora_A.weight": torch.ones(2, 3), "classifier.weight": torch.zeros(4)}
    torch.save(a, tmp_path / "a.pt")
    torch.save(a, tmp_path / "same.pt")
    torch.save({**a, "classifier.weight": torch.full((4,), 0.25)}, tmp_path / "b.pt")
    assert peers.adapter_difference(tmp_path / "a.pt", tmp_path / "same.pt") == {
        "same_keys": True, "tensors": 2, "max_abs_difference": 0.0, "bit_identical": True}  # fmt: skip
    moved = peers.adapter_difference(tmp_path / "a.pt", tmp_path / "b.pt")
    assert moved["max_abs_difference"] == 0.25 and moved["bit_identical"] is False
    launcher = peers.two_process_launcher()
    assert launcher[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert launcher[launcher.index("--master_addr") + 1] == "127.0.0.1"
    assert 0 < int(launcher[launcher.index("--master_port") + 1]) < 65536
