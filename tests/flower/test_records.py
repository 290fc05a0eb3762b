"""The deployment's wire format: every message survives a round trip exactly, and a peer of another protocol or a
malformed message is refused in one clear line."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord  # noqa: E402

from peft_fed.flower import records  # noqa: E402
from peft_fed.flower.records import (  # noqa: E402
    MalformedMessageError,
    NodeInfo,
    ProtocolMismatchError,
    ReplyMessage,
    TaskMessage,
)
from peft_fed.linalg import LowRank, exact_sum  # noqa: E402
from peft_fed.state import BackboneCatchUp, Broadcast, ClientState, Upload  # noqa: E402


def _broadcast(dtype=torch.float32) -> Broadcast:
    """A catch-up of versions [5, 7) with one layer sent as stacked factors and one sent dense."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    low_rank = exact_sum([LowRank(rand(30, 2), rand(2, 50)), LowRank(rand(30, 1), rand(1, 50))])  # rank 3: 240 < 1500
    dense = exact_sum([LowRank(rand(3, 2), rand(2, 5)), LowRank(rand(3, 1), rand(1, 5))])  # rank 3: 24 > 15 numbers
    assert (low_rank.form, dense.form) == ("low_rank", "dense")
    return Broadcast(
        round=4,
        layers={"encoder.layer.0.attention.self.query": {"B": rand(8, 2), "A": rand(2, 6)}, "x.value": {"B0": rand(3, 2)}},
        backbone_catch_up=BackboneCatchUp(start=5, end=7, layers={"x.query": low_rank, "x.value": dense}),
        backbone_version=7,
        extras={"classifier.weight": rand(1, 8)},
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_task_round_trip_is_exact(dtype):
    broadcast = _broadcast(dtype)
    state = ClientState(client_id="3", last_round=1, backbone_version=5)
    task = TaskMessage("3", broadcast, state, {"method": "fedit", "seed": 3}, "abc")
    back = records.unpack_task(records.pack_task(task))
    assert (back.client_id, back.run_digest, back.settings) == ("3", "abc", {"method": "fedit", "seed": 3})
    assert (back.client_state.last_round, back.client_state.backbone_version) == (1, 5)
    assert (back.broadcast.round, back.broadcast.backbone_version) == (4, 7)
    for layer, tensors in broadcast.layers.items():
        assert all(_same(back.broadcast.layers[layer][k], t) for k, t in tensors.items())
    got, sent = back.broadcast.backbone_catch_up, broadcast.backbone_catch_up
    assert (got.start, got.end, got.num_updates) == (5, 7, 2)
    assert {n: d.form for n, d in got.layers.items()} == {"x.query": "low_rank", "x.value": "dense"}
    assert got.layers["x.query"].term_ranks == (2, 1)  # the stacked factors split back into the updates, exactly
    for mine, theirs in zip(got.layers["x.query"].additions(), sent.layers["x.query"].additions(), strict=True):
        assert _same(mine.B, theirs.B) and _same(mine.A, theirs.A)
    for name, delta in sent.layers.items():  # what travels is exact, and so is the sum a node adds to W
        assert all(_same(got.layers[name].tensors()[k], t) for k, t in delta.tensors().items())
        assert _same(got.layers[name].dense(), delta.dense())
    assert _same(back.broadcast.extras["classifier.weight"], broadcast.extras["classifier.weight"])
    assert back.broadcast.nbytes == broadcast.nbytes


def test_task_sends_the_client_metadata_not_its_tensors():
    state = ClientState(client_id="1", last_round=0, backbone_version=1, layers={"x": {"B": torch.ones(2, 2)}})
    content = records.pack_task(TaskMessage("1", _broadcast(), records.client_metadata(state), {}, "d"))
    assert "x|B" not in json.dumps(str(content)) and records.unpack_task(content).client_state.layers == {}


def test_an_empty_catch_up_travels_empty():
    broadcast = Broadcast(round=2, backbone_catch_up=BackboneCatchUp(start=3, end=3), backbone_version=3)
    back = records.unpack_task(records.pack_task(TaskMessage("0", broadcast, ClientState("0", 1, 3), {}, "d")))
    assert (back.broadcast.backbone_catch_up.start, back.broadcast.backbone_catch_up.layers) == (3, {})
    assert back.broadcast.nbytes == 0


def test_reply_round_trip_is_exact_and_a_failure_travels():
    upload = Upload("2", 17, {"a": {"B": torch.randn(4, 2)}}, {"head": torch.randn(3).bfloat16()})
    reply = ReplyMessage("2", upload, ClientState("2", 5, 3), 17, {"first": 1.5, "last": 1.0, "mean": 1.2}, {"train_seconds": 2.0})
    back = records.unpack_reply(records.pack_reply(reply))
    assert (back.client_id, back.num_samples, back.failure, back.losses, back.timings) == (
        "2", 17, None, reply.losses, reply.timings
    )
    assert _same(back.upload.layers["a"]["B"], upload.layers["a"]["B"]) and _same(back.upload.extras["head"], upload.extras["head"])
    assert (back.upload.client_id, back.upload.num_samples) == ("2", 17)
    assert (back.client_state.last_round, back.client_state.backbone_version) == (5, 3)
    failed = records.unpack_reply(records.pack_reply(ReplyMessage("2", None, None, failure="non-finite training loss")))
    assert failed.upload is None and failed.failure == "non-finite training loss"
    assert records.record_from_reply("2", 9, failed).client_state is None  # a failed client keeps its state
    # a node that cannot serve its client's state restarts it: the record carries the new client's metadata
    restart = ReplyMessage("2", None, ClientState("2", None, 4), failure="holds no chain of backbone catch-ups ...")
    record = records.record_from_reply("2", 9, records.unpack_reply(records.pack_reply(restart)))
    assert record.failure.startswith("(node 9) holds no chain")
    assert (record.client_state.last_round, record.client_state.backbone_version) == (None, 4)


def test_query_and_node_info_round_trip():
    settings, digest = records.unpack_query(records.pack_query({"num_clients": 3}, "xyz"))
    assert settings == {"num_clients": 3} and digest == "xyz"
    info = NodeInfo("2", 40, "n=40 sha256:00")
    assert records.unpack_node_info(records.pack_node_info(info)) == info


def test_a_peer_of_another_protocol_is_refused_clearly(monkeypatch):
    content = records.pack_reply(ReplyMessage("0", None, None, failure="x"))
    content[records._META] = ConfigRecord({"protocol": "peft-fed/0", "body": "{}"})
    with pytest.raises(ProtocolMismatchError, match=r"speaks protocol 'peft-fed/0', this side 'peft-fed/2'.*same peft-fed version"):
        records.unpack_reply(content)
    del content[records._META]
    with pytest.raises(ProtocolMismatchError, match="is not a peft-fed message"):
        records.unpack_reply(content)


def test_malformed_messages_are_refused():
    content = records.pack_task(TaskMessage("0", _broadcast(), ClientState("0"), {}, "d"))
    body = json.loads(str(content[records._META]["body"]))
    dense = {"form": "dense", "ranks": []}
    for change, why in (
        ({"x.query": dense, "x.value": dense}, "announced 'dense', sent 'low_rank'"),
        ({"x.query": {"form": "low_rank", "ranks": [2, 2]}, "x.value": dense}, r"term ranks \[2, 2\] do not split"),
        ({"x.value": dense}, "announces layers"),  # carries a layer it does not announce
    ):
        content[records._META] = ConfigRecord({"protocol": records.PROTOCOL, "body": json.dumps({**body, "catch_up": {"start": 5, "layout": change}})})
        with pytest.raises(MalformedMessageError, match=why):
            records.unpack_task(content)
    content[records._META] = ConfigRecord({"protocol": records.PROTOCOL, "body": json.dumps({**body, "catch_up": {**body["catch_up"], "start": 8}})})
    with pytest.raises(MalformedMessageError, match="later one"):  # starts after the broadcast's version
        records.unpack_task(content)
    body.pop("round")
    content[records._META] = ConfigRecord({"protocol": records.PROTOCOL, "body": json.dumps(body)})
    with pytest.raises(MalformedMessageError, match="malformed"):
        records.unpack_task(content)


@pytest.mark.parametrize("shares", [1, 5])
def test_a_node_refuses_to_share_its_dp_noise_among_fewer_than_2_or_more_than_the_cohort(specs, shares):
    """The number of clients a node's noise is split over comes from the server; a value that would shrink the
    noise below the guarantee (1 share is fine only for central noise; more shares than sampled clients) is refused."""
    pytest.importorskip("dp_accounting")
    from flwr.app import RecordDict

    from peft_fed.flower.records import MalformedMessageError, ReplyMessage
    from peft_fed.flower.secure import SECURE_NOISE_SHARES, secure_contribution
    from peft_fed.privacy import ClientLevelDPSettings, ClientLevelDPStrategy
    from peft_fed.strategies import get_strategy

    strategy = ClientLevelDPStrategy(get_strategy("fedit", specs, dtype=torch.float64), ClientLevelDPSettings(1.0, 1.0),
                                     num_clients=10, clients_per_round=4, num_rounds=2)  # fmt: skip
    state, _ = strategy.init_server()
    broadcast = strategy.configure(state)
    upload = Upload("0", 5, {name: {key: broadcast.layers[name][key] + 1 for key in strategy.uploaded} for name in specs})
    content = RecordDict({"fitins.config": ConfigRecord({SECURE_NOISE_SHARES: shares})})
    reply = ReplyMessage("0", upload, None, num_samples=5)
    with pytest.raises(MalformedMessageError, match=f"shared by {shares} clients, outside \\[2, clients_per_round=4\\]"):
        secure_contribution(reply, content, broadcast, strategy)
    content = RecordDict({"fitins.config": ConfigRecord({SECURE_NOISE_SHARES: 2})})
    arrays = secure_contribution(reply, content, broadcast, strategy)
    assert arrays[-1].tolist() == [1.0]  # clipped: the update of norm sqrt(numel) > 1 was clipped
