"""The round engine on pure tensors: the loop every runtime shares, checked against the protocol played by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))
from strategy_sim import fake_training, quadratic_gradient_fn  # noqa: E402

from peft_fed.engine import ClientRecord, RoundEngine, RoundHooks, client_seed  # noqa: E402
from peft_fed.state import ClientState, LayerSpec  # noqa: E402
from peft_fed.strategies import STRATEGIES, NoValidUploadsError, get_strategy  # noqa: E402

SPECS = {
    "layer.0.query": LayerSpec(out_features=12, in_features=10, rank=2, scale=2.0),
    "layer.1.value": LayerSpec(out_features=8, in_features=14, rank=3, scale=0.5),
}
SAMPLES = {"0": 3, "1": 5, "2": 2, "3": 7}


class TensorExecutor:
    """Clients that "train" by a seeded random move of their factors; ``failing`` clients report a failure."""

    def __init__(self, strategy, failing=()):
        self.strategy = strategy
        self.failing = set(failing)
        self.backbone = {n: torch.zeros(s.out_features, s.in_features, dtype=torch.float64) for n, s in SPECS.items()}
        self.gradient_fn = quadratic_gradient_fn(SPECS)

    def train_clients(self, round_index, tasks):
        records = []
        for task in tasks:
            if task.client_id in self.failing:
                records.append(ClientRecord(task.client_id, None, None, None, SAMPLES[task.client_id], failure="NaN"))
                continue
            start = self.strategy.client_begin(task.broadcast, task.client_state, self.gradient_fn)
            generator = torch.Generator().manual_seed(client_seed(0, round_index, task.client_id))
            trained = fake_training(start, generator)
            upload, state = self.strategy.client_end(
                trained, {}, start, task.client_state, SAMPLES[task.client_id], task.broadcast.backbone_version
            )
            records.append(ClientRecord(task.client_id, upload, state, trained, SAMPLES[task.client_id], 1.0, 0.5, 0.7))
        return records[::-1]  # the engine must not depend on the order records come back in

    def apply_backbone_update(self, update):
        for name, delta in update.items():
            self.backbone[name] += delta.dense()


class Recorder(RoundHooks):
    def __init__(self):
        self.calls = []

    def round_metrics(self, round_index):
        self.calls.append(("metrics", round_index))
        return {"eval_accuracy": 0.5}

    def record(self, row):
        self.calls.append(("record", row["round"]))

    def checkpoint(self, completed_rounds):
        self.calls.append(("checkpoint", completed_rounds))


def engine_for(method, failing=(), per_round=3, seed=0):
    strategy = get_strategy(method, SPECS, dtype=torch.float64, seed=seed, num_rounds=3)
    executor = TensorExecutor(strategy, failing)
    engine = RoundEngine(strategy, executor, num_clients=4, clients_per_round=per_round, seed=seed)
    engine.initialize(base_weights={n: torch.randn(s.out_features, s.in_features, dtype=torch.float64,
                                                   generator=torch.Generator().manual_seed(1))
                                    for n, s in SPECS.items()})
    return engine, executor


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_engine_plays_the_protocol_exactly(method):
    """Three rounds through the engine equal the protocol played by hand with the same draws."""
    engine, _ = engine_for(method)
    engine.run(3, show_progress=False)
    reference, _ = engine_for(method)  # same strategy seed: same initial state
    strategy, state = reference.strategy, reference.server_state
    clients = {str(i): ClientState(str(i)) for i in range(4)}
    for round_index in range(3):
        selected = reference.sample_clients(round_index)
        uploads = []
        for cid in selected:  # the same generator per client as the executor's

            broadcast = strategy.configure(state, clients[cid])
            start = strategy.client_begin(broadcast, clients[cid], reference.executor.gradient_fn)
            trained = fake_training(start, torch.Generator().manual_seed(client_seed(0, round_index, cid)))
            upload, clients[cid] = strategy.client_end(trained, {}, start, clients[cid], SAMPLES[cid],
                                                       broadcast.backbone_version)
            uploads.append(upload)
        state = strategy.aggregate(state, uploads).state
    for name, tensors in state.layers.items():
        for key, tensor in tensors.items():
            assert torch.equal(tensor, engine.server_state.layers[name][key])
    assert state.backbone_version == engine.server_state.backbone_version
    assert engine.completed_rounds == 3 and [row["round"] for row in engine.history] == [1, 2, 3]


def test_hooks_run_in_order_and_rows_carry_their_metrics():
    engine, _ = engine_for("fedsmoothlora")
    hooks = Recorder()
    history = engine.run(2, hooks, show_progress=False)
    assert hooks.calls == [("metrics", 0), ("record", 1), ("checkpoint", 1),
                           ("metrics", 1), ("record", 2), ("checkpoint", 2)]
    assert all(row["eval_accuracy"] == 0.5 for row in history)
    assert history[1]["inter_round_loss_jump"] is not None  # returning clients: 1.0 first - 0.5 last
    assert history[1]["inter_round_loss_jump"] == pytest.approx(0.5)


def test_failed_client_is_dropped_and_keeps_its_state():
    engine, _ = engine_for("fedsmoothlora", failing={"1"}, per_round=4)
    row = engine.play_round(0)
    assert row["dropped_clients"] == {"1": "NaN"}
    assert engine.client_states["1"].last_round is None
    assert all(engine.client_states[c].last_round == 0 for c in ("0", "2", "3"))


def test_every_client_failing_leaves_the_state_unchanged():
    engine, _ = engine_for("fedit", failing={"0", "1", "2", "3"}, per_round=4)
    before = engine.server_state
    with pytest.raises(NoValidUploadsError, match="every client failed"):
        engine.play_round(0)
    assert engine.server_state is before and engine.completed_rounds == 0


def test_backbone_updates_reach_the_executor():
    engine, executor = engine_for("fedsmoothlora")
    engine.run(2, show_progress=False)
    merged = sum(update["layer.0.query"].dense() for update in engine.server_state.backbone_history)
    assert torch.allclose(executor.backbone["layer.0.query"], merged)


def test_restore_continues_exactly():
    full, _ = engine_for("fedsmoothlora")
    full.run(3, show_progress=False)
    part, executor = engine_for("fedsmoothlora")
    part.run(2, show_progress=False)
    resumed, resumed_executor = engine_for("fedsmoothlora")
    resumed.restore(part.server_state, part.client_states, part.history)
    resumed_executor.backbone = {n: t.clone() for n, t in executor.backbone.items()}
    resumed.run(3, show_progress=False)
    assert [r["round"] for r in resumed.history] == [1, 2, 3]
    for name in SPECS:
        assert torch.equal(resumed_executor.backbone[name], full.executor.backbone[name])


def test_rounds_must_follow_in_order():
    engine, _ = engine_for("fedit")
    with pytest.raises(ValueError, match="cannot follow"):
        engine.play_round(1)


def test_downlink_bytes_are_the_catch_ups_really_sent():
    """``downlink_bytes`` counts each broadcast's backbone catch-up in the form it travels: per layer the smaller of
    the stacked factors of the missed rank-r updates and the dense m x n sum (float64 here)."""
    engine, _ = engine_for("fedsmoothlora", per_round=2)
    sent: list[list] = []
    configure = engine.strategy.configure

    def recording(state, client=None):
        broadcast = configure(state, client)
        if len(sent) <= state.round:
            sent.append([])
        sent[state.round].append((state.backbone_version - client.backbone_version, broadcast))
        return broadcast

    engine.strategy.configure = recording
    history = engine.run(6, show_progress=False)
    for row, broadcasts in zip(history, sent, strict=True):
        assert row["downlink_bytes"] == sum(b.nbytes for _, b in broadcasts)
        for away, broadcast in broadcasts:
            assert broadcast.nbytes == sum(8 * min(away * s.rank * (s.out_features + s.in_features), s.out_features * s.in_features)
                                           for s in SPECS.values())  # fmt: skip
    assert max(away for broadcasts in sent for away, _ in broadcasts) >= 2  # some client was away for several merges


def test_a_failed_client_that_restarts_becomes_a_new_client_at_the_version_it_reports(caplog):
    """A deployed node that lost what the server's record of its client names fails the round and restarts the
    client (a new client at a version it can rebuild): the engine adopts that state, so the next catch-up starts there."""
    engine, executor = engine_for("fedsmoothlora", per_round=4)
    engine.play_round(0)
    original = executor.train_clients

    def restarting(round_index, tasks, restart=None):
        restart = restart or ClientState("1", None, 0)
        return [ClientRecord("1", None, restart, None, 0, failure="holds no chain") if r.client_id == "1" else r
                for r in original(round_index, tasks)]  # fmt: skip

    executor.train_clients = restarting
    row = engine.play_round(1)
    assert row["dropped_clients"] == {"1": "holds no chain"}
    state = engine.client_states["1"]
    assert (state.last_round, state.backbone_version, state.layers) == (None, 0, {})
    assert engine.strategy.configure(engine.server_state, state).backbone_catch_up.start == 0
    assert engine.client_states["0"].last_round == 1  # the others trained as usual
    for wrong in (ClientState("1", None, 7), ClientState("1", 0, 0)):  # a version the server lacks; not a new client
        executor.train_clients = lambda round_index, tasks, wrong=wrong: restarting(round_index, tasks, wrong)
        before = engine.client_states["1"]
        engine.play_round(engine.completed_rounds)
        assert engine.client_states["1"] == before
    assert "asked to restart at backbone version 7" in caplog.text
