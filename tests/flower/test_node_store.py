"""A node's backbone from the catch-ups it stored: rebuilt from a contiguous chain of segments from version 0 in a
fresh process, the segments a resumed server restates replaced, and a node that cannot rebuild (folder lost, the
server resumed inside a segment) failing in one line and restarting where the next catch-up can bring it back.

The model is a dict of dense weights (the bridge's two calls replaced), so the node's logic runs on pure tensors."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from peft_fed.flower import node as node_module  # noqa: E402
from peft_fed.flower.node import NodeData, NodeRuntime  # noqa: E402
from peft_fed.flower.records import TaskMessage  # noqa: E402
from peft_fed.linalg import LowRank  # noqa: E402
from peft_fed.state import Broadcast, ClientState, ServerState  # noqa: E402

SHAPES = {"q": (6, 5), "v": (5, 6)}  # rank-1 updates: stacked for up to 2 missed, dense from 3 on (3 * 11 > 30)


class _DictBridge:
    @staticmethod
    def add_to_base_weights(model, deltas):  # as the bridge: a LowRank delta is formed densely, then added
        for name, delta in deltas.items():
            model[name] += delta.dense() if isinstance(delta, LowRank) else delta

    @staticmethod
    def set_base_weights(model, weights):
        for name, weight in weights.items():
            model[name] = weight.clone()


def _history(versions: int, seed: int) -> list[dict[str, LowRank]]:
    g = torch.Generator().manual_seed(seed)
    return [{n: LowRank(torch.randn(m, 1, generator=g, dtype=torch.float64), torch.randn(1, k, generator=g, dtype=torch.float64))
             for n, (m, k) in SHAPES.items()} for _ in range(versions)]  # fmt: skip


class _Node:
    """A node runtime over a dict model; ``fresh()`` drops what a process held (Flower may start one per message)."""

    def __init__(self, state_dir, monkeypatch):
        monkeypatch.setattr(node_module, "peft_bridge", _DictBridge)
        g = torch.Generator().manual_seed(9)
        self.base = {n: torch.randn(*shape, generator=g, dtype=torch.float64) for n, shape in SHAPES.items()}
        self.state_dir = state_dir
        self.fresh()

    def fresh(self) -> None:
        self.runtime = object.__new__(NodeRuntime)
        self.runtime.node = NodeData("0", None, self.state_dir)
        self.runtime.trainer = SimpleNamespace(model={n: w.clone() for n, w in self.base.items()}, original_weights=self.base)
        self.runtime.store, self.runtime.backbone_version = None, None

    def task(self, history, start: int, end: int) -> TaskMessage:
        state = ServerState(backbone_history=history[:end])
        broadcast = Broadcast(round=end, backbone_catch_up=state.catch_up(start), backbone_version=end)
        return TaskMessage("0", broadcast, ClientState("0", start - 1 if start else None, start), {}, "run")

    def bring(self, history, start: int, end: int, *, bitwise: bool = False) -> str | None:
        """Catch the node up to ``end``; its backbone must be the simulation's (every update added in order): bit for
        bit where every segment on its chain travelled stacked (``bitwise``), up to float rounding otherwise."""
        task = self.task(history, start, end)
        self.runtime._open_store(task.run_digest)
        problem = self.runtime._bring_backbone_to(task)
        if problem is None:
            assert self.runtime.backbone_version == end
            for name, weight in self.runtime.trainer.model.items():
                expected = self.base[name].clone()
                for update in history[:end]:
                    expected += update[name].dense()
                if bitwise:
                    assert torch.equal(weight, expected), name
                torch.testing.assert_close(weight, expected, rtol=1e-12, atol=1e-12)
        return problem


def test_a_fresh_node_rebuilds_its_backbone_from_the_chain_of_catch_ups(tmp_path, monkeypatch):
    node, history = _Node(tmp_path, monkeypatch), _history(12, seed=0)
    assert node.bring(history, 0, 2, bitwise=True) is None  # 2 updates, stacked: added one by one
    node.fresh()
    assert node.bring(history, 2, 3, bitwise=True) is None  # rebuilt: base + [0, 2), then this catch-up
    node.fresh()
    assert node.bring(history, 3, 8) is None  # 5 updates, dense: one sum
    node.fresh()
    assert node.bring(history, 8, 9) is None  # base + [0, 2) + [2, 3) + [3, 8), then [8, 9)
    segments = [(0, 2), (2, 3), (3, 8), (8, 9)]
    assert node.runtime.store.segments() == segments
    assert [node.runtime.store.catch_up(*s).layers["q"].form for s in segments] == ["low_rank", "low_rank", "dense", "low_rank"]
    assert node.bring(history, 9, 9) is None  # the same process, nothing missed: the backbone is already there


def test_a_resumed_server_restates_the_versions_after_the_clients_record(tmp_path, monkeypatch):
    node, history = _Node(tmp_path, monkeypatch), _history(12, seed=0)
    for start, end in [(0, 3), (3, 8), (8, 9)]:
        assert node.bring(history, start, end) is None
    resumed = history[:5] + _history(7, seed=1)  # the server resumed from version 5 and merged other updates since
    node.fresh()
    assert node.bring(resumed, 3, 10) is None  # the client's record there is version 3: [3, 8) and [8, 9) are stale
    assert node.runtime.store.segments() == [(0, 3), (3, 10)]
    node.fresh()
    assert node.bring(resumed, 10, 11) is None


def _fails_then_catches_up(node: _Node, history, start: int, end: int, restart_at: int) -> None:
    """A fresh process cannot rebuild version ``start``: one line, a restart at ``restart_at``, and the server's next
    catch-up, from ``restart_at``, brings the node to ``end``."""
    node.fresh()
    problem = node.bring(history, start, end)
    assert problem.startswith(f"holds no chain of backbone catch-ups from version 0 to {start}") and "\n" not in problem
    restart = node.runtime._restart_metadata(node.task(history, start, end))
    assert (restart.last_round, restart.backbone_version) == (None, restart_at)  # a new client
    node.fresh()
    assert node.bring(history, restart_at, end) is None


def test_a_node_that_cannot_rebuild_fails_in_one_line_and_the_next_catch_up_brings_it_back(tmp_path, monkeypatch):
    node, history = _Node(tmp_path, monkeypatch), _history(12, seed=0)
    assert node.bring(history, 0, 4) is None
    assert node.bring(history, 4, 10) is None
    # the node's folder is lost: it restarts at the base weights; the catch-up from 0 costs one dense delta per layer
    shutil.rmtree(node.runtime.store.root)
    _fails_then_catches_up(node, history, 10, 11, restart_at=0)
    # the server resumed to a version inside a stored catch-up ([0, 11)): no chain reaches 5; the catch-up from 5
    # restates everything after 5, so the furthest version the node's chain still reaches is 0
    _fails_then_catches_up(node, history, 5, 12, restart_at=0)


def test_a_restart_keeps_the_furthest_version_the_chain_reaches(tmp_path, monkeypatch):
    node, history = _Node(tmp_path, monkeypatch), _history(12, seed=0)
    assert node.bring(history, 0, 3) is None
    assert node.bring(history, 3, 6) is None
    # a method that keeps client state whose state file is gone: the backbone is fine, the client restarts at 6
    assert node.runtime._restart_metadata(node.task(history, 3, 6)).backbone_version == 6
