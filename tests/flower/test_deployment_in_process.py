"""The deployment's server and nodes in one process (no sockets): the same result as the simulation, exactly,
including clients that miss rounds, nodes restarted for every message, lost and faulty nodes."""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("flwr")

from deployment_setup import assert_same_result, deployed_result, simulate, small_settings  # noqa: E402
from flwr.app import Message  # noqa: E402
from in_process import InProcessGrid  # noqa: E402
from tiny_models import save_stand_in  # noqa: E402

from peft_fed.flower import TooFewRepliesError, records, serve  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return save_stand_in("roberta", tmp_path_factory.mktemp("stand-in"))


def _nodes(tmp_path, n: int) -> dict[int, dict]:
    return {100 + i: {"partition-id": i, "state-dir": str(tmp_path / f"node-{i}")} for i in range(n)}


def test_fedsmoothlora_with_partial_participation_equals_the_simulation(model, tmp_path):
    # 3 clients, 1 per round, 3 rounds: returning clients catch up on the merges they missed, from their own disk
    settings = small_settings(model, "fedsmoothlora", tmp_path / "sim", num_clients=3, clients_per_round=1, num_rounds=3)
    simulated = simulate(settings)
    grid = InProcessGrid(_nodes(tmp_path, 3))
    serve(grid, {**settings, "output_dir": str(tmp_path / "deployed"), "node_wait": 5})
    deployed = deployed_result(tmp_path / "deployed")
    assert_same_result(deployed, simulated)
    assert deployed["state"].backbone_version == 3
    # the server kept only the clients' metadata; FedSmoothLoRA's per-client uploads stay on the nodes' disks
    assert list(tmp_path.glob("node-*/run-*/client_states/after-round-*.safetensors"))
    trained = [state for state in deployed["client_states"].values() if state.last_round is not None]
    assert trained and all(state.layers == {} for state in trained)
    rows = [json.loads(line) for line in (tmp_path / "deployed" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["downlink_wire_bytes"] > row["downlink_bytes"] and row["uplink_wire_bytes"] > row["uplink_bytes"] for row in rows)


def test_a_client_back_after_three_merges_gets_their_dense_sum_and_equals_the_simulation(model, tmp_path):
    """Seed 2 samples clients 2, 0, 1, 2 (one per round): client 1 first trains at version 2 and gets the catch-up
    [0, 2) stacked, which its node adds update by update, so the deployment stays bit for bit the simulation; client
    2 trained at version 0 and returns at version 3: its catch-up [0, 3) is sent dense (3 rank-8 updates of a 32 x 32
    layer are more numbers than the matrix), D_c is read from it and its node adds it as one sum, equal to the
    simulation's three additions up to float rounding. That last round is compared where rounding stays rounding:
    the backbone, the heads, the losses (SGD: Adam turns rounding-level differences in near-zero gradients into
    lr-sized steps). Its merged update is not compared: FedSmoothLoRA's upload ``SVD_r(B A - W_ga)`` of this tiny
    model after 2 steps is of the order of float32 rounding of ``W_ga`` (products ~1e-7 on the query layers)."""
    settings = small_settings(model, "fedsmoothlora", tmp_path / "sim", num_clients=3, clients_per_round=1, num_rounds=4,
                              seed=2, optim="sgd", learning_rate=0.05)  # fmt: skip
    simulated = simulate(settings)
    grid = InProcessGrid(_nodes(tmp_path, 3))
    serve(grid, {**settings, "output_dir": str(tmp_path / "deployed"), "node_wait": 5})
    deployed = deployed_result(tmp_path / "deployed")
    assert [row["clients"] for row in deployed["history"]] == [["2"], ["0"], ["1"], ["2"]]
    sent = [records.unpack_task(message.content).broadcast.backbone_catch_up for message in grid.sent if message.metadata.message_type == "train"]
    assert [(c.start, c.end) for c in sent] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert [sorted({d.form for d in c.layers.values()}) for c in sent] == [[], ["low_rank"], ["low_rank"], ["dense"]]
    for version in range(3):  # every merge up to the dense catch-up: bit for bit
        for name, update in simulated["state"].backbone_history[version].items():
            mine = deployed["state"].backbone_history[version][name]
            assert torch.equal(mine.B, update.B) and torch.equal(mine.A, update.A), (version, name)
    for name, weight in simulated["backbone"].items():
        torch.testing.assert_close(deployed["backbone"][name], weight, atol=1e-6, rtol=1e-5)
    ours, theirs = deployed["state"].extras, simulated["state"].extras
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5)
    for mine, reference in zip(deployed["history"], simulated["history"], strict=True):
        assert abs(mine["train_loss"] - reference["train_loss"]) < 1e-6 and mine["downlink_bytes"] == reference["downlink_bytes"]
    assert sorted(p.name for p in tmp_path.glob("node-2/run-*/backbone_catch_ups/*")) == ["v000000-v000003.safetensors"]


def test_a_lost_node_is_dropped_like_a_failed_client(model, tmp_path, caplog):
    settings = small_settings(model, "fedit", tmp_path / "sim")
    simulated = simulate(settings, drop={(1, "1")})
    grid = InProcessGrid(_nodes(tmp_path, 2), lost=lambda round_index, node: (round_index, node) == (1, 101))
    with caplog.at_level(logging.WARNING):
        serve(grid, {**settings, "output_dir": str(tmp_path / "deployed"), "node_wait": 5, "round_retries": 0})
    deployed = deployed_result(tmp_path / "deployed")
    assert_same_result(deployed, simulated)
    assert list(deployed["history"][1]["dropped_clients"]) == ["1"]
    assert "sent no reply" in deployed["history"][1]["dropped_clients"]["1"]
    assert "round 2: client 1 (node 101) sent no reply" in caplog.text


def test_a_node_that_lost_its_folder_restarts_its_client_and_the_next_catch_up_brings_it_back(model, tmp_path, caplog):
    # 2 clients every round; node 101's folder is lost before round 3: it holds no chain of catch-ups to version 1, fails
    # that round in one line and restarts client 1 as a new client at version 0; round 4 sends it the catch-up [0, 3),
    # dense (3 rank-8 updates of a 32 x 32 layer are more numbers than the matrix), and it trains again
    import shutil

    def lose_folder(round_index: int, node: int) -> bool:
        if (round_index, node) == (2, 101):
            shutil.rmtree(tmp_path / "node-1")
        return False

    settings = small_settings(model, "fedsmoothlora", tmp_path / "deployed", num_rounds=4, node_wait=5)
    with caplog.at_level(logging.WARNING):
        serve(InProcessGrid(_nodes(tmp_path, 2), lost=lose_folder), settings)
    deployed = deployed_result(tmp_path / "deployed")
    history = deployed["history"]
    assert [sorted(row["dropped_clients"]) for row in history] == [[], [], ["1"], []]
    assert history[2]["dropped_clients"]["1"].startswith("(node 101) holds no chain of backbone catch-ups from version 0 to 1")
    assert "client 1 restarts as a new client at backbone version 0" in caplog.text
    assert deployed["client_states"]["1"].last_round == 3 and deployed["client_states"]["1"].backbone_version == 3
    (segment,) = [p.name for p in tmp_path.glob("node-1/run-*/backbone_catch_ups/*.safetensors")]
    assert segment == "v000000-v000003.safetensors"
    layers = deployed["state"].backbone_history[0]
    dense = sum(4 * u.shape[0] * u.shape[1] for u in layers.values())
    stacked = sum(u.nbytes for u in layers.values())  # one rank-8 update, float32
    # round 1 sent the heads alone (both clients at version 0); round 4 the heads plus client 0's one missed update
    # and client 1's three, summed dense
    assert history[3]["downlink_bytes"] - history[0]["downlink_bytes"] == stacked + dense


def _poison(round_index: int, node: int, reply: Message) -> Message:
    if round_index != 1 or node != 101:
        return reply
    message = records.unpack_reply(reply.content)
    layer = next(iter(message.upload.layers))
    message.upload.layers[layer]["B"] = torch.full_like(message.upload.layers[layer]["B"], float("nan"))
    reply.content = records.pack_reply(message)
    return reply


def test_a_poisoned_reply_is_dropped_by_the_invalid_upload_policy(model, tmp_path):
    settings = small_settings(model, "fedit", tmp_path / "sim")
    simulated = simulate(settings, drop={(1, "1")})
    grid = InProcessGrid(_nodes(tmp_path, 2), tamper=_poison)
    serve(grid, {**settings, "output_dir": str(tmp_path / "deployed"), "node_wait": 5})
    deployed = deployed_result(tmp_path / "deployed")
    assert_same_result(deployed, simulated)
    assert "NaN" in deployed["history"][1]["dropped_clients"]["1"] or "finite" in deployed["history"][1]["dropped_clients"]["1"]


def test_a_restarted_server_resumes_from_its_checkpoint(model, tmp_path):
    settings = small_settings(model, "fedsmoothlora", tmp_path / "sim", num_clients=3, clients_per_round=2)
    simulated = simulate(settings)
    nodes = _nodes(tmp_path, 3)
    deployed = {**settings, "output_dir": str(tmp_path / "deployed"), "node_wait": 5}
    serve(InProcessGrid(nodes), {**deployed, "num_rounds": 1})  # the server stops after round 1...
    serve(InProcessGrid(nodes), {**deployed, "resume": True})  # ...and a new ServerApp continues the run
    assert_same_result(deployed_result(tmp_path / "deployed"), simulated)


def test_too_few_replies_stop_the_run_with_the_state_of_the_last_good_round(model, tmp_path):
    settings = small_settings(model, "fedit", tmp_path / "deployed", node_wait=5, min_replies=2, round_retries=1)
    grid = InProcessGrid(_nodes(tmp_path, 2), lost=lambda round_index, node: round_index == 1 and node == 100)
    with pytest.raises(TooFewRepliesError, match=r"round 2 got 1 good replies, fewer than min_replies=2, after 2 attempts"):
        serve(grid, settings)
    assert deployed_result(tmp_path / "deployed")["state"].round == 1  # round 1's checkpoint, nothing half-applied
    lines = (tmp_path / "deployed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1]


def test_a_node_of_another_client_range_or_config_is_left_out(model, tmp_path, caplog):
    nodes = {100: {"partition-id": 0, "state-dir": str(tmp_path / "a")}, 101: {"partition-id": 7}, 102: {"colour": "red"}}
    settings = small_settings(model, "fedit", tmp_path / "deployed", num_rounds=1, node_wait=1)
    with caplog.at_level(logging.WARNING):
        serve(InProcessGrid(nodes), settings)
    assert "partition-id=7 but the run has 2 clients" in caplog.text
    assert "unknown node config key(s) ['colour']" in caplog.text
    history = deployed_result(tmp_path / "deployed")["history"]
    assert history[0]["dropped_clients"] == {"1": "has no node connected"}


def test_flower_strategy_start_drives_the_same_rounds(model, tmp_path):
    """``FederatedLoraStrategy`` under Flower's own ``Strategy.start`` loop: the engine's two half-rounds around
    Flower's send/receive give the simulation's state."""
    from flwr.app import ArrayRecord

    from peft_fed import peft_bridge
    from peft_fed.engine import RoundEngine
    from peft_fed.flower import FederatedLoraStrategy, FlowerClientExecutor
    from peft_fed.flower.node import settings_digest
    from peft_fed.runtime.pipeline import FederatedRunConfig, load_run
    from peft_fed.strategies import build_strategy

    settings = small_settings(model, "fedsmoothlora", tmp_path / "sim", num_clients=3, clients_per_round=2)
    simulated = simulate(settings)
    config = FederatedRunConfig.from_dict({**settings, "output_dir": str(tmp_path / "unused")})
    run = load_run(config, tokenize_clients=False)
    flat = run.config.to_dict()
    executor = FlowerClientExecutor(InProcessGrid(_nodes(tmp_path, 3)), run.model, flat, settings_digest(flat))
    executor.discover(3)
    args = config.training_args
    strategy = build_strategy(
        "fedsmoothlora", peft_bridge.layer_specs(run.model), overrides=args.method_kwargs, seed=args.seed,
        num_rounds=args.num_rounds,
    )  # fmt: skip
    engine = RoundEngine(strategy, executor, num_clients=3, clients_per_round=2, seed=args.seed)
    extras = peft_bridge.get_extras(run.model, peft_bridge.trainable_extra_names(run.model))
    engine.initialize(extras=extras, base_weights=peft_bridge.base_weights(run.model))
    result = FederatedLoraStrategy(engine, executor).start(executor.grid, ArrayRecord(), num_rounds=2, timeout=60)
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert result.train_metrics_clientapp[2]["backbone_version"] == 2
    ours, _ = engine.server_state.state_dict()
    theirs, _ = simulated["state"].state_dict()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)
    for name, weight in simulated["backbone"].items():
        torch.testing.assert_close(peft_bridge.base_weights(run.model)[name], weight, atol=1e-6, rtol=1e-5)


def test_a_node_refuses_a_server_of_another_protocol_in_one_line(tmp_path):
    from flwr.app import ConfigRecord, Context, RecordDict

    from peft_fed.flower.app import REFUSED, node_train
    from peft_fed.state import Broadcast, ClientState

    InProcessGrid({})  # sets the process's Flower task identity, as a ClientApp process has it
    content = records.pack_task(records.TaskMessage("0", Broadcast(round=0), ClientState("0"), {}, "run"))
    content["peft_fed.meta"] = ConfigRecord({"protocol": "peft-fed/1", "body": "{}"})
    message = Message(content=content, dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = node_train(message, context)
    assert reply.has_error() and reply.error.code == REFUSED
    assert reply.error.reason == (
        "the server's task speaks protocol 'peft-fed/1', this side 'peft-fed/2': install the same peft-fed version "
        "on the server and every node"
    )


def test_a_node_with_its_own_data_file_trains_as_that_client(model, tmp_path):
    from peft_fed.runtime.pipeline import FederatedRunConfig, prepare_federated_data

    settings = small_settings(model, "fedit", tmp_path / "sim")
    simulated = simulate(settings)
    client_train, *_ = prepare_federated_data(FederatedRunConfig.from_dict(settings))
    own_file = tmp_path / "client-1.jsonl"
    client_train[1].to_json(own_file)  # what client 1's owner holds, in a file of its own
    nodes = _nodes(tmp_path, 2)
    nodes[101] = {"data-path": str(own_file), "client-id": 1, "state-dir": str(tmp_path / "owner")}
    serve(InProcessGrid(nodes), {**settings, "output_dir": str(tmp_path / "deployed"), "node_wait": 5})
    deployed = deployed_result(tmp_path / "deployed")
    assert deployed["history"][0]["client_num_samples"]["1"] == len(client_train[1])
    assert_same_result(deployed, simulated)


def _uploads_aggregated_by(strategy_class, monkeypatch) -> list:
    """Every call's uploads (their layers) that ``strategy_class.aggregate`` is handed from now on."""
    received = []
    original = strategy_class.aggregate

    def spy(self, state, uploads):
        received.append([u.layers for u in uploads])
        return original(self, state, uploads)

    monkeypatch.setattr(strategy_class, "aggregate", spy)
    return received


def test_secure_aggregation_gives_the_mean_and_the_server_never_holds_one_upload(model, tmp_path, monkeypatch):
    from peft_fed.strategies.fedit import FedIT

    received = _uploads_aggregated_by(FedIT, monkeypatch)
    settings = small_settings(model, "fedit", tmp_path / "sim", num_clients=3, clients_per_round=3, num_rounds=1)
    simulated = simulate(settings)
    received.clear()
    serve(InProcessGrid(_nodes(tmp_path, 3)),
          {**settings, "output_dir": str(tmp_path / "deployed"), "node_wait": 5, "secure_aggregation": True})  # fmt: skip
    # SecAgg+ quantises each client's weighted upload with a step of 2 * clipping_range / quantization_range; the
    # sum of 3 clients is off by less than 3 steps per coordinate (the weights sum to 1)
    step = 2 * 8.0 / 2**22
    assert_same_result(deployed_result(tmp_path / "deployed"), simulated, atol=3 * step)
    with pytest.raises(AssertionError):  # and the bound is tight enough to tell: the quantisation is really there
        assert_same_result(deployed_result(tmp_path / "deployed"), simulated, atol=1e-9)
    rounds = [uploads for uploads in received if not any(name.startswith("probe.") for name in uploads[0])]
    assert len(rounds) == 1  # (the others are the linearity probe's, on its own small layers)
    for uploads in rounds:  # every "upload" the strategy saw is the one aggregate, never a client's own
        first = uploads[0]
        assert len(uploads) == 3 and all(
            torch.equal(u[name][key], first[name][key]) for u in uploads[1:] for name in first for key in first[name]
        )


def test_secure_aggregation_refuses_a_method_whose_server_needs_more_than_the_mean(model, tmp_path):
    from peft_fed.flower.secure import SecureAggregationUnsupportedError

    settings = small_settings(model, "flexlora", tmp_path / "deployed", num_rounds=1, node_wait=5, secure_aggregation=True)
    with pytest.raises(SecureAggregationUnsupportedError, match="needs more than the weighted mean of the uploads"):
        serve(InProcessGrid(_nodes(tmp_path, 2)), settings)


def _secure_dp_settings(model, tmp_path, **dp):
    return small_settings(model, "fedit", tmp_path / "sim", num_clients=3, clients_per_round=3, num_rounds=1,
                          dp_clip=0.01, **dp)  # fmt: skip


def _layer_tensors(result) -> torch.Tensor:
    tensors, _ = result["state"].state_dict()
    return torch.cat([tensors[name].double().flatten() for name in sorted(tensors)])


def test_dp_with_secure_aggregation_is_the_central_mechanism_and_the_server_never_holds_one_update(
    model, tmp_path, monkeypatch
):
    """With z = 0 the clients' clipping under SecAgg+ gives the central DP aggregation (the server clipping) within
    SecAgg+'s quantisation error; the strategy is only ever handed the aggregate; the clipped clients are counted."""
    from peft_fed.privacy import ClientLevelDPStrategy

    received = _uploads_aggregated_by(ClientLevelDPStrategy, monkeypatch)
    settings = _secure_dp_settings(model, tmp_path, dp_noise_multiplier=0.0)
    simulated = simulate(settings)  # central DP: the server clips each update
    assert simulated["history"][0]["dp_clipped_clients"] == 3  # (the clip is small enough to bite)
    received.clear()
    serve(InProcessGrid(_nodes(tmp_path, 3)),
          {**settings, "output_dir": str(tmp_path / "deployed"), "node_wait": 5, "secure_aggregation": True})  # fmt: skip
    deployed = deployed_result(tmp_path / "deployed")
    # each client's contribution is quantised with a step of 2 * 8 / 2**22; the mean of 3 is off by under 3 steps
    step = 2 * 8.0 / 2**22
    assert_same_result(deployed, simulated, atol=3 * step)
    row = deployed["history"][0]
    assert row["dp_clipped_clients"] == 3 and row["dp_median_update_norm"] is None and row["dp_clip"] == 0.01
    card = (tmp_path / "deployed" / "final" / "README.md").read_text()
    assert "Noise added by: clients (secure aggregation)" in card and "the server itself" not in card
    (uploads,) = received  # the server's strategy saw the one noised mean, once per client that took part
    assert len(uploads) == 3 and all(
        torch.equal(u[name][key], uploads[0][name][key]) for u in uploads[1:] for name in u for key in u[name]
    )


def test_dp_with_secure_aggregation_adds_the_noise_on_the_clients_at_the_stated_scale(model, tmp_path):
    """The clients' noise shares make the aggregate's noise std ``z C sqrt(n / k) / m`` per coordinate (n = 3
    answering clients, k = 2 = SecAgg+'s threshold for 3, m = 3 sampled): at least the central ``z C / m``."""
    clip, z = 0.01, 2.0
    serve(InProcessGrid(_nodes(tmp_path / "a", 3)),
          {**_secure_dp_settings(model, tmp_path, dp_noise_multiplier=0.0), "output_dir": str(tmp_path / "clip-only"),
           "node_wait": 5, "secure_aggregation": True})  # fmt: skip
    serve(InProcessGrid(_nodes(tmp_path / "b", 3)),
          {**_secure_dp_settings(model, tmp_path, dp_noise_multiplier=z), "output_dir": str(tmp_path / "noised"),
           "node_wait": 5, "secure_aggregation": True})  # fmt: skip
    noise = _layer_tensors(deployed_result(tmp_path / "noised")) - _layer_tensors(deployed_result(tmp_path / "clip-only"))
    expected = z * clip * (3 / 2) ** 0.5 / 3
    assert noise.numel() > 2000
    assert abs(float(noise.std()) / expected - 1) < 0.05, (float(noise.std()), expected)
    assert abs(float(noise.mean())) < 4 * expected / noise.numel() ** 0.5
    assert abs(float(noise.std()) / (z * clip / 3) - 1) > 0.15  # the central scale (no share) would be told apart


def test_dp_with_secure_aggregation_refuses_a_clipping_range_that_would_clip_the_noise(model, tmp_path):
    from peft_fed.flower.secure import SecureAggregationUnsupportedError

    settings = {**_secure_dp_settings(model, tmp_path, dp_noise_multiplier=2.0), "dp_clip": 1.0, "node_wait": 5,
                "secure_aggregation": True, "output_dir": str(tmp_path / "deployed")}  # fmt: skip
    with pytest.raises(SecureAggregationUnsupportedError, match=r"secagg_clipping_range=8 would clip .* >= 13\.7"):
        serve(InProcessGrid(_nodes(tmp_path, 3)), settings)
