"""The client-state store: bit-exact spills, a resident budget it keeps, and an engine that plays the same rounds."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_rounds import SPECS, engine_for  # noqa: E402

import peft_fed.engine.client_store as client_store  # noqa: E402
from peft_fed.engine import ClientStateStore  # noqa: E402
from peft_fed.runtime.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from peft_fed.state import ClientState  # noqa: E402
from peft_fed.strategies import STRATEGIES  # noqa: E402


def random_state(client_id: str, seed: int, last_round: int | None = 3) -> ClientState:
    generator = torch.Generator().manual_seed(seed)
    return ClientState(
        client_id,
        last_round=last_round,
        backbone_version=seed % 5,
        layers={
            "q": {"B": torch.randn(6, 2, generator=generator), "A": torch.randn(2, 5, dtype=torch.float64, generator=generator)},
            "v": {"B": torch.randn(4, 2, generator=generator).to(torch.bfloat16)},
        },
        extras={"head.weight": torch.randn(3, 4, generator=generator)},
    )


def assert_same_state(actual: ClientState, expected: ClientState) -> None:
    assert (actual.client_id, actual.last_round, actual.backbone_version) == (
        expected.client_id, expected.last_round, expected.backbone_version
    )
    assert actual.layers.keys() == expected.layers.keys() and actual.extras.keys() == expected.extras.keys()
    for name, tensors in expected.layers.items():
        assert tensors.keys() == actual.layers[name].keys()
        for key, tensor in tensors.items():
            assert actual.layers[name][key].dtype == tensor.dtype and torch.equal(actual.layers[name][key], tensor)
    for name, tensor in expected.extras.items():
        assert actual.extras[name].dtype == tensor.dtype and torch.equal(actual.extras[name], tensor)


def test_spilled_states_read_back_bit_exactly(tmp_path):
    expected = {str(i): random_state(str(i), i) for i in range(6)}
    store = ClientStateStore(memory_budget_bytes=0, spill_dir=tmp_path)
    for cid, state in expected.items():
        store[cid] = state
    assert store.spilled_clients == {"0", "1", "2", "3", "4"}  # only the last written stays
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"client-{i}.safetensors" for i in range(5)]
    assert list(store) == list(expected)  # insertion order, like the dict it replaces
    for cid in reversed(list(expected)):
        assert_same_state(store[cid], expected[cid])


def test_resident_bytes_stay_within_the_budget_but_for_the_last_state_touched():
    one_state = random_state("0", 0).nbytes
    budget = int(2.5 * one_state)
    store = ClientStateStore({str(i): ClientState(str(i)) for i in range(8)}, memory_budget_bytes=budget)
    expected = {}
    generator = torch.Generator().manual_seed(0)
    for step in range(60):
        cid = str(int(torch.randint(0, 8, (1,), generator=generator)))
        if step % 3 == 0 or cid not in expected:
            expected[cid] = store[cid] = random_state(cid, step)
        else:
            assert_same_state(store[cid], expected[cid])
        assert store.resident_bytes <= budget
        assert store.resident_bytes + len(store.spilled_clients) * one_state == len(expected) * one_state
    assert all(store[cid].last_round is None for cid in map(str, range(8)) if cid not in expected)


def test_an_unchanged_state_is_written_once_and_a_replaced_one_never_read_stale(tmp_path, monkeypatch):
    writes = []
    real_save = client_store.save_file
    monkeypatch.setattr(client_store, "save_file", lambda tensors, path, metadata: (writes.append(Path(path).name),
                                                                                       real_save(tensors, path, metadata)))
    store = ClientStateStore({"0": random_state("0", 0), "1": random_state("1", 1)}, memory_budget_bytes=0, spill_dir=tmp_path)
    for _ in range(3):  # read back and evicted again, unchanged: no new write
        store["0"], store["1"]  # noqa: B018
    assert writes == ["client-0.safetensors", "client-1.safetensors"]
    held = store["0"]
    store["0"] = random_state("0", 99, last_round=7)
    store["1"]  # noqa: B018  (evicts client 0's new state)
    assert_same_state(store["0"], random_state("0", 99, last_round=7))
    assert_same_state(held, random_state("0", 0))  # what a caller held is not emptied by a spill
    del store["0"]
    assert not (tmp_path / "client-0.safetensors").exists() and "0" not in store


def test_tensor_free_states_never_touch_the_disk():
    store = ClientStateStore({str(i): ClientState(str(i), last_round=i) for i in range(1000)}, memory_budget_bytes=0)
    assert store.spill_dir is None and store.resident_bytes == 0 and store["999"].last_round == 999


def test_the_temporary_spill_folder_goes_with_the_store():
    store = ClientStateStore({str(i): random_state(str(i), i) for i in range(3)}, memory_budget_bytes=0)
    folder = store.spill_dir
    assert folder is not None and len(list(folder.iterdir())) == 2
    del store
    gc.collect()
    assert not folder.exists()


def test_bad_input_is_refused_in_one_line():
    with pytest.raises(ValueError, match="memory_budget_bytes must be >= 0"):
        ClientStateStore(memory_budget_bytes=-1)
    with pytest.raises(TypeError, match="holds ClientState objects, got dict"):
        ClientStateStore()["0"] = {}


def engine_state(engine):
    return engine.server_state, {cid: engine.client_states[cid] for cid in engine.client_states}, engine.executor.backbone


def assert_same_engines(actual, expected):
    (server, clients, backbone), (server_ref, clients_ref, backbone_ref) = engine_state(actual), engine_state(expected)
    for name, tensors in server_ref.layers.items():
        for key, tensor in tensors.items():
            assert torch.equal(server.layers[name][key], tensor)
    assert clients.keys() == clients_ref.keys()
    for cid, state in clients_ref.items():
        assert_same_state(clients[cid], state)
    for name in SPECS:
        assert torch.equal(backbone[name], backbone_ref[name])


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_an_engine_that_spills_every_state_plays_the_same_rounds(method, tmp_path):
    in_memory, _ = engine_for(method)
    in_memory.run(3, show_progress=False)
    spilling, _ = engine_for(method)
    spilling.client_states = ClientStateStore(spilling.client_states, memory_budget_bytes=0, spill_dir=tmp_path)
    spilling.run(3, show_progress=False)
    if any(state.nbytes for state in in_memory.client_states.values()):
        assert spilling.client_states.spilled_clients  # the method keeps state: it really went to disk
    assert_same_engines(spilling, in_memory)
    # the global model of a method that reads the clients' states (FedSA-LoRA's own B's) sees the same states
    for name, factors in in_memory.global_factors().items():
        assert torch.equal(spilling.global_factors()[name].B, factors.B)


def test_checkpoint_of_a_spilled_store_restores_exactly(tmp_path):
    full, _ = engine_for("fedsmoothlora")
    full.run(3, show_progress=False)
    part, executor = engine_for("fedsmoothlora")
    part.client_states = ClientStateStore(part.client_states, memory_budget_bytes=0, spill_dir=tmp_path / "spill")
    part.run(2, show_progress=False)
    folder = save_checkpoint(tmp_path / "run", 2, part.server_state, part.client_states, executor.backbone, {})
    checkpoint = load_checkpoint(folder)
    resumed, resumed_executor = engine_for("fedsmoothlora")
    resumed.client_states = ClientStateStore(memory_budget_bytes=0, spill_dir=tmp_path / "resumed")
    resumed.restore(checkpoint.server_state, checkpoint.client_states, [])
    assert isinstance(resumed.client_states, ClientStateStore) and resumed.client_states.memory_budget_bytes == 0
    resumed_executor.backbone = {n: t.clone() for n, t in checkpoint.backbone.items()}
    resumed.run(3, show_progress=False)
    assert_same_engines(resumed, full)


def test_the_trainer_spills_client_states_to_its_output_dir_and_ends_where_it_would_in_memory(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
    from fed_setup import assert_states_close, final_state, make_trainer

    ends = []
    for budget in (None, 0.0):
        trainer = make_trainer("fedsmoothlora", tmp_path / str(budget), num_rounds=2, clients_per_round=2,
                               client_state_memory_budget_mib=budget, disable_tqdm=True, eval_every=0)  # fmt: skip
        trainer.train()
        ends.append(final_state(trainer))
    assert len(list((tmp_path / "0.0" / "client_states").glob("*.safetensors"))) >= 2
    assert not (tmp_path / "None" / "client_states").exists()
    assert_states_close(ends[1], ends[0])
