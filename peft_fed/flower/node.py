"""A deployed client: one node's model, data and state, and what it does with a task.

A node trains with exactly the simulation's local loop: its :class:`NodeTrainer` is a
:class:`~peft_fed.FederatedTrainer` over the node's own data, and a task is one call of the trainer's client
executor (``train_clients``), the path every simulated client takes (``runtime/client.py: run_client_round``,
FedSmoothLoRA's gradient estimate, Subspace-Reg's loss term, the NaN guards).

Flower may serve each message with a fresh ClientApp process, so nothing a later round needs lives only in
memory. :class:`NodeStore` keeps on the node's disk (``state-dir``):

* the client's :class:`~peft_fed.state.ClientState` after each round it trained (FedSmoothLoRA's last upload,
  FedSA-LoRA's own ``B``...), by round, the last few: the server knows only its metadata and names the one it
  expects, so a server that resumes from an older checkpoint is answered with the matching state;
* every backbone catch-up the server has sent (a *segment*: the updates ``[start, end)`` summed per layer, in the
  form it travelled, stacked factors or dense), so a restarted node rebuilds its backbone at the version the
  server names: the base weights plus a contiguous chain of segments ``[0, v_1), [v_1, v_2), ... [v_k, v)``. A
  layer that travelled as stacked factors is added update by update (the factors split back at each update's
  rank): bit for bit the simulation's additions. A layer that travelled dense (more missed updates than one dense
  delta is worth) is added as one sum: equal to them up to float rounding. Saving a segment that starts at ``s``
  deletes the stored segments that end after ``s``: the server's record of the client is at ``s``, so versions
  from ``s`` on are restated by this catch-up (a resumed server may have merged other updates there), and every
  chain to a version ``<= s`` is kept.

A node that cannot serve the server's record of its client (no chain of segments reaches the version the catch-up
starts from: its folder was lost, or the server resumed to a version inside a segment; or, for a method that keeps
client state, the state the server names is gone) fails the task with a one-line reason, as before, and restarts
the client: its reply carries the metadata of a *new* client (no last round) at the furthest version its chain
reaches (0 when nothing is left). The server's engine adopts it when the round completes
(``RoundEngine.end_round``), so the next catch-up starts at a version the node can rebuild; with the catch-up
bounded by one dense delta per layer, even a catch-up from version 0 costs at most that.

The model and data are loaded once per process and kept for the next message when Flower reuses the process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import peft_bridge
from ..engine import ClientTask
from ..state import BackboneCatchUp, ClientState
from .records import (
    NodeInfo,
    ReplyMessage,
    TaskMessage,
    client_metadata,
    flatten_catch_up,
    unflatten_catch_up,
)

logger = logging.getLogger(__name__)

#: the node-config keys a SuperNode understands (``flower-supernode --node-config 'partition-id=0 ...'``)
NODE_CONFIG_KEYS = {
    "partition-id": "this node's client: the partition of the run's dataset it trains on (trying it on one machine)",
    "data-path": "a local data file or folder of this node (any format `peft-fed train --dataset` takes)",
    "client-id": "with data-path: which client of the run this node is (0 .. num_clients-1)",
    "state-dir": "where the node keeps its client state and backbone catch-ups between rounds",
}
KEPT_CLIENT_STATES = 3


def settings_digest(settings: Mapping[str, Any]) -> str:
    """Which run a message belongs to: a digest of the run's flat settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class NodeConfigError(ValueError):
    """A SuperNode started with a node config that cannot serve the run."""


@dataclasses.dataclass(frozen=True)
class NodeData:
    """Where a node's data comes from, read from its node config."""

    client_id: str
    data_path: str | None
    state_dir: Path

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeData:
        unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS) - {"num-partitions"})
        if unknown:
            raise NodeConfigError(f"unknown node config key(s) {unknown}; known: {sorted(NODE_CONFIG_KEYS)}")
        data_path = node_config.get("data-path")
        if data_path is not None:
            if "client-id" not in node_config:
                raise NodeConfigError("a node with data-path needs client-id (its index among the run's clients)")
            client = node_config["client-id"]
        elif "partition-id" in node_config:
            client = node_config["partition-id"]
        else:
            raise NodeConfigError("give the node partition-id=K (a partition of the run's dataset) or data-path=... client-id=K")
        try:
            client_id = str(int(client))
        except (TypeError, ValueError):
            raise NodeConfigError(f"the node's client id must be an integer, got {client!r}") from None
        state_dir = Path(str(node_config.get("state-dir") or Path.home() / ".cache" / "peft-fed" / f"node-{client_id}"))
        return cls(client_id, data_path and str(data_path), state_dir)


class NodeStore:
    """A client's state and the backbone catch-ups it received, on the node's disk (safetensors, atomic writes)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        (self.root / "client_states").mkdir(parents=True, exist_ok=True)
        (self.root / "backbone_catch_ups").mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _save(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        partial = path.with_name(path.name + ".partial")
        save_file({k: v.contiguous() for k, v in tensors.items()}, partial, metadata=dict(meta))
        os.replace(partial, path)

    def save_client_state(self, state: ClientState) -> None:
        tensors, meta = state.state_dict()
        self._save(self.root / "client_states" / f"after-round-{state.last_round:06d}.safetensors", tensors, meta)
        kept = sorted((self.root / "client_states").glob("after-round-*.safetensors"))
        for old in kept[:-KEPT_CLIENT_STATES]:
            old.unlink(missing_ok=True)

    def client_state(self, expected: ClientState) -> ClientState | None:
        """The stored state the server's metadata ``expected`` names (``None`` when this node does not hold it)."""
        if expected.last_round is None:
            return ClientState(client_id=expected.client_id)
        path = self.root / "client_states" / f"after-round-{expected.last_round:06d}.safetensors"
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            meta = handle.metadata()
        state = ClientState.from_state_dict(load_file(path), meta)
        return state if state.backbone_version == expected.backbone_version else None

    def _segment_path(self, start: int, end: int) -> Path:
        return self.root / "backbone_catch_ups" / f"v{start:06d}-v{end:06d}.safetensors"

    def segments(self) -> list[tuple[int, int]]:
        """The stored catch-ups, ``(start, end)``, by start."""
        found = []
        for path in (self.root / "backbone_catch_ups").glob("v*-v*.safetensors"):
            start, _, end = path.name.removesuffix(".safetensors").partition("-")
            found.append((int(start[1:]), int(end[1:])))
        return sorted(found)

    def save_catch_up(self, catch_up: BackboneCatchUp) -> None:
        """Store ``catch_up`` (when it carries anything) and delete the segments that end after its start."""
        for start, end in self.segments():
            if end > catch_up.start:
                self._segment_path(start, end).unlink(missing_ok=True)
        if catch_up.num_updates:
            flat, layout = flatten_catch_up(catch_up)
            self._save(self._segment_path(catch_up.start, catch_up.end), flat, {"layout": json.dumps(layout)})

    def catch_up(self, start: int, end: int) -> BackboneCatchUp:
        path = self._segment_path(start, end)
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            layout = json.loads(handle.metadata()["layout"])
        return unflatten_catch_up(load_file(path), layout, start, end)

    def chains(self) -> dict[int, list[tuple[int, int]]]:
        """``{version: the segments that rebuild it from the base weights, in order}`` for every version a
        contiguous chain of stored segments reaches from 0 (``{0: []}`` with nothing stored)."""
        reached: dict[int, list[tuple[int, int]]] = {0: []}
        for start, end in self.segments():  # by start: every chain to ``start`` is known when its segments come
            if start in reached and end not in reached:
                reached[end] = [*reached[start], (start, end)]
        return reached


def _node_trainer_class():
    from ..runtime.trainer import FederatedTrainer

    class NodeTrainer(FederatedTrainer):
        """The simulation's trainer over one node's data: its client executor is what the node runs."""

        def __init__(self, *args: Any, client_id: str, federation: tuple[int, int], **kwargs: Any) -> None:
            self.node_client_id = client_id
            self.federation = federation
            super().__init__(*args, **kwargs)

        def federation_size(self) -> tuple[int, int]:
            return self.federation  # the run's, not this node's one client (client-level DP's noise depends on it)

        def client_dataset(self, client_id: str) -> Any:
            if client_id != self.node_client_id:
                raise ValueError(f"this node holds client {self.node_client_id}'s data, not client {client_id}'s")
            return self.client_datasets[0]

    return NodeTrainer


class NodeRuntime:
    """What one node loads once per process: the model, its data, its trainer; and the version of its backbone."""

    def __init__(self, settings: Mapping[str, Any], node: NodeData) -> None:
        from ..runtime.pipeline import FederatedRunConfig, load_run
        from ..runtime.trainer import resolve_clients_per_round

        self.node = node
        self.settings_digest = settings_digest(settings)
        self.store: NodeStore | None = None
        overrides: dict[str, Any] = {
            "output_dir": str(node.state_dir / "trainer"),
            "resume": False,
            "overwrite_output_dir": False,
            "report_to": "none",
            "disable_tqdm": True,
        }
        if node.data_path is not None:
            # the node's own file, all of it this client's training data (naming it as its own eval file keeps the
            # loader from holding a share out; the node never evaluates)
            overrides.update(dataset=node.data_path, dataset_kwargs={"eval_path": node.data_path}, num_clients=1,
                             partition="iid", client_eval_fraction=0.0, max_train_samples=None)  # fmt: skip
        federation = FederatedRunConfig.from_dict(settings, source="the server's run settings")
        num_clients = federation.data_args.num_clients
        federation_size = (num_clients, resolve_clients_per_round(federation.training_args, num_clients))
        config = FederatedRunConfig.from_dict({**settings, **overrides}, source="the server's run settings")
        run = load_run(config, tokenize_clients=False, tokenize_eval=False)
        index = 0 if node.data_path is not None else int(node.client_id)
        if not 0 <= index < len(run.client_train):
            raise NodeConfigError(
                f"partition-id={node.client_id} but the run has {len(run.client_train)} clients (0 .. {len(run.client_train) - 1})"
            )
        self.dataset = run.task.preprocess(run.client_train[index], run.tokenizer, name=f"client {node.client_id}")
        args = config.training_args
        args.clients_per_round = None
        args.client_fraction = None
        self.trainer = _node_trainer_class()(
            model=run.model, args=args, client_datasets=[self.dataset], client_id=node.client_id,
            federation=federation_size, **run.trainer_kwargs(),
        )  # fmt: skip
        # constructing a trainer applies a method's initial backbone update (FRLoRA) to the model: the backbone's
        # version is unknown until the first task resets it (a node takes every update from the server)
        self.backbone_version: int | None = None

    def info(self) -> NodeInfo:
        from ..runtime.checkpoint import digest_dataset

        return NodeInfo(self.node.client_id, len(self.dataset), digest_dataset(self.dataset))

    def _open_store(self, run_digest: str) -> NodeStore:
        """The folder of the run ``run_digest`` (what identifies the run across a server's restarts, not its free
        settings such as ``num_rounds``): a different run starts again from the base weights."""
        if self.store is None or self.store.root.name != f"run-{run_digest}":
            self.store = NodeStore(self.node.state_dir / f"run-{run_digest}")
            self._reset_backbone()
        return self.store

    def _reset_backbone(self) -> None:
        """The base weights, version 0."""
        peft_bridge.set_base_weights(self.trainer.model, self.trainer.original_weights)
        self.backbone_version = 0

    def _bring_backbone_to(self, task: TaskMessage) -> str | None:
        """Make the model's backbone the server's version ``task`` names; the reason when it cannot.

        The backbone must be at the catch-up's start first: kept when it is there already (this process trained the
        client last), otherwise rebuilt from the base weights through the stored chain of segments."""
        catch_up = task.broadcast.backbone_catch_up
        self.store.save_catch_up(catch_up)
        if self.backbone_version != catch_up.start:
            chain = self.store.chains().get(catch_up.start)
            if chain is None:
                return (
                    f"holds no chain of backbone catch-ups from version 0 to {catch_up.start} (its state folder "
                    f"{self.store.root} was lost, or the server resumed inside a stored catch-up); it restarts as a new "
                    "client"
                )
            self._reset_backbone()
            for start, end in chain:
                self._add(self.store.catch_up(start, end))
        self._add(catch_up)
        return None

    def _add(self, catch_up: BackboneCatchUp) -> None:
        for addition in catch_up.additions():
            peft_bridge.add_to_base_weights(self.trainer.model, addition)
        self.backbone_version = catch_up.end

    def _restart_metadata(self, task: TaskMessage) -> ClientState:
        """A new client at the furthest version this node's chain reaches up to what it was sent (see the module)."""
        reached = self.store.chains()
        version = max(v for v in reached if v <= task.broadcast.backbone_version)
        return ClientState(client_id=task.client_id, last_round=None, backbone_version=version)

    def train(self, task: TaskMessage) -> ReplyMessage:
        """One task: catch the backbone up, load the client's stored state, train, store the new state."""
        if task.client_id != self.node.client_id:
            return ReplyMessage(task.client_id, None, None, failure=f"was sent client {task.client_id}'s task")
        if not task.run_digest:
            return ReplyMessage(task.client_id, None, None, failure="was sent a task without a run identity")
        self._open_store(task.run_digest)
        problem = self._bring_backbone_to(task)
        state = self.store.client_state(task.client_state)
        if state is None and self.trainer.strategy.keeps_client_state:
            problem = problem or (
                f"holds no client state after round {task.client_state.last_round} (the server's record of this "
                "client); it restarts as a new client"
            )
        if problem is not None:  # fails this round; the server's next catch-up starts where this node can rebuild
            logger.warning("client %s: %s", task.client_id, problem)
            return ReplyMessage(task.client_id, None, self._restart_metadata(task), failure=problem)
        state = state or task.client_state
        (record,) = self.trainer.train_clients(task.broadcast.round, [ClientTask(task.client_id, task.broadcast, state)])
        if record.failure is None:
            self.store.save_client_state(record.client_state)
        return ReplyMessage(
            client_id=record.client_id,
            upload=record.upload,
            client_state=client_metadata(record.client_state) if record.client_state is not None else None,
            num_samples=record.num_samples,
            losses={"first": record.loss_first, "last": record.loss_last, "mean": record.loss_mean},
            timings=dict(record.timings),
            failure=record.failure,
        )


_RUNTIMES: dict[tuple[str, NodeData], NodeRuntime] = {}


def node_runtime(settings: Mapping[str, Any], node_config: Mapping[str, Any]) -> NodeRuntime:
    """The node's runtime for these settings: loaded once per process (Flower may reuse a ClientApp process)."""
    node = NodeData.from_node_config(node_config)
    key = (settings_digest(settings), node)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one run at a time per process: free the previous model
        _RUNTIMES[key] = NodeRuntime(settings, node)
    return _RUNTIMES[key]
