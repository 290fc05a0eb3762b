"""Client and server states survive (de)serialisation exactly; versions and weights behave."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_fed.linalg import LowRank
from peft_fed.state import BackboneCatchUp, Broadcast, ClientState, LayerSpec, ServerState, sample_weights


def test_server_state_round_trip(tmp_path):
    state = ServerState(
        round=3,
        layers={"enc.q": {"B": torch.randn(4, 2), "A": torch.randn(2, 5)}},
        extras={"classifier.modules_to_save.default.weight": torch.randn(3, 5)},
        backbone_history=[{"enc.q": LowRank(torch.randn(4, 2), torch.randn(2, 5))} for _ in range(2)],
    )
    flat, meta = state.state_dict()
    save_file(flat, tmp_path / "s.safetensors", metadata=meta)
    loaded = ServerState.from_state_dict(load_file(tmp_path / "s.safetensors"), meta)
    assert loaded.round == 3 and loaded.backbone_version == 2
    assert torch.equal(loaded.layers["enc.q"]["A"], state.layers["enc.q"]["A"])
    assert torch.equal(loaded.extras["classifier.modules_to_save.default.weight"], state.extras["classifier.modules_to_save.default.weight"])
    for a, b in zip(loaded.backbone_history, state.backbone_history, strict=True):
        assert torch.equal(a["enc.q"].B, b["enc.q"].B) and torch.equal(a["enc.q"].A, b["enc.q"].A)


def test_client_state_round_trip():
    state = ClientState("7", last_round=4, backbone_version=5, layers={"l": {"U_B": torch.randn(3, 1), "U_A": torch.randn(1, 2)}})
    flat, meta = state.state_dict()
    loaded = ClientState.from_state_dict(flat, meta)
    assert (loaded.client_id, loaded.last_round, loaded.backbone_version) == ("7", 4, 5)
    assert torch.equal(loaded.layers["l"]["U_B"], state.layers["l"]["U_B"])
    never = ClientState.from_state_dict(*ClientState("x").state_dict())
    assert never.last_round is None


def test_updates_since_checks_version():
    state = ServerState(backbone_history=[{}, {}])
    assert len(state.updates_since(1)) == 1
    with pytest.raises(ValueError, match="outside"):
        state.updates_since(3)


def test_catch_up_is_the_exact_sum_of_the_missed_updates():
    g = torch.Generator().manual_seed(0)
    history = [{"l": LowRank(torch.randn(6, 1, generator=g, dtype=torch.float64), torch.randn(1, 5, generator=g, dtype=torch.float64))}
               for _ in range(4)]  # fmt: skip
    state = ServerState(backbone_history=history)
    for version in range(5):
        catch_up = state.catch_up(version)
        assert (catch_up.start, catch_up.end, catch_up.num_updates) == (version, 4, 4 - version)
        if version == 4:
            assert catch_up.layers == {} and catch_up.dense() == {}
            continue
        expected = sum(update["l"].dense() for update in history[version:])
        torch.testing.assert_close(catch_up.dense()["l"], expected, rtol=1e-12, atol=1e-12)
        # rank 1 per update: stacked while (4 - version) * 11 <= 30 numbers, dense after
        assert catch_up.layers["l"].form == ("low_rank" if 4 - version <= 2 else "dense")
        assert catch_up.nbytes == 8 * min((4 - version) * 11, 30)
    assert state.backbone_history == history  # the history stays per version (checkpoints unchanged)
    with pytest.raises(ValueError, match="outside"):
        state.catch_up(5)


def test_a_broadcast_refuses_a_catch_up_that_ends_elsewhere():
    catch_up = ServerState(backbone_history=[{"l": LowRank(torch.ones(2, 1), torch.ones(1, 2))}]).catch_up(0)
    assert Broadcast(round=1, backbone_catch_up=catch_up, backbone_version=1).nbytes == 16
    with pytest.raises(ValueError, match="ends at version 1"):
        Broadcast(round=1, backbone_catch_up=catch_up, backbone_version=2)
    with pytest.raises(ValueError, match="later one"):
        BackboneCatchUp(start=2, end=1)


def test_sample_weights():
    assert sample_weights([1, 3]) == [0.25, 0.75]
    with pytest.raises(ValueError):
        sample_weights([0, 0])


def test_layer_spec_validation():
    with pytest.raises(ValueError):
        LayerSpec(0, 3, 1, 1.0)
    with pytest.raises(ValueError):
        LayerSpec(3, 3, 0, 1.0)
