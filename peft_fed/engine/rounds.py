"""The one federated round loop, shared by every runtime.

    sample -> configure each client -> execute the clients -> aggregate -> merge -> diagnostics -> metrics
    -> the runtime's hooks: round metrics (evaluation), record, checkpoint

The engine owns the federated state (the server state and every client's state) and the round's
bookkeeping; it never touches a model. What touches a model is a :class:`ClientExecutor`: it trains the
round's clients (one after another with the Trainer's loop, GAUSS's own loop for unmixing; later all at
once in a batched pass, or on remote Flower nodes) and applies the server's backbone update to the
model(s) it holds. A runtime is an executor plus :class:`RoundHooks`; the loop below is written once.

No transformers import here: the engine runs wherever a strategy does.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from ..diagnostics import round_diagnostics
from ..linalg import LowRank
from ..state import Broadcast, ClientState, ServerState, sample_round_clients
from ..strategies.base import NoValidUploadsError, Strategy
from .client_store import ClientStateStore

logger = logging.getLogger(__name__)


@dataclass
class ClientTask:
    """One sampled client of a round: what the server sends it and the state it returns with."""

    client_id: str
    broadcast: Broadcast
    client_state: ClientState


@dataclass
class ClientRecord:
    """What one client's round produced (``failure`` set, and ``upload`` None, for a client that failed).

    A failed client keeps its previous state (``client_state`` None), unless its record carries the state it restarts
    from: a deployed node that cannot serve the server's record of its client (backbone chain or client state lost)
    restarts it as a new client at the backbone version it can rebuild (``peft_fed/flower/node.py``); the engine adopts
    that state when the round completes, so the client's next broadcast catches it up from there.
    """

    client_id: str
    upload: Any
    client_state: ClientState | None
    trained: dict[str, LowRank] | None
    num_samples: int
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    loss_mean: float = float("nan")
    timings: dict[str, float] = field(default_factory=dict)
    failure: str | None = None


class ClientExecutor(Protocol):
    """Trains the clients of a round on the model(s) it holds, and keeps those models' backbones current."""

    def train_clients(self, round_index: int, tasks: Sequence[ClientTask]) -> list[ClientRecord]:
        """One record per task (a failed client gets a record with ``failure`` set, never an exception
        unless the run should stop)."""

    def apply_backbone_update(self, update: Mapping[str, LowRank]) -> None:
        """Add the server's merged update to the backbone of the model(s) this executor holds."""

    # An executor may also define ``executor_metrics() -> dict``: what it adds to the row of the round it just played.


class RoundHooks:
    """What a runtime does around the loop; every hook is optional (the defaults do nothing)."""

    def round_metrics(self, round_index: int) -> Mapping[str, Any]:
        """What the runtime adds to the row of round ``round_index`` (0-based): the global model's evaluation
        when it is due, the round's learning rate..."""
        return {}

    def record(self, row: Mapping[str, Any]) -> None:
        """The finished row of a round (metrics file, ``report_to``, progress)."""

    def checkpoint(self, completed_rounds: int) -> None:
        """Called after each round; the runtime decides whether to save."""


def inter_round_loss_jumps(history: Sequence[Mapping[str, Any]], row: Mapping[str, Any]) -> list[float]:
    """For each client of ``row`` that trained before: its first-step loss now minus its last-step loss
    in its previous round (the discontinuity FedSmoothLoRA's Round-Matching targets)."""
    previous_last: dict[str, float] = {}
    for past in history:
        previous_last.update(past.get("client_loss_last", {}))
    return [
        first - previous_last[cid]
        for cid, first in row["client_loss_first"].items()
        if cid in previous_last and math.isfinite(first) and math.isfinite(previous_last[cid])
    ]


def client_seed(seed: int, round_index: int, client_id: str | int) -> int:
    """The seed of one client's round: independent of which process or executor trains the client, so
    1 and P processes, and a resumed run, replay the same streams."""
    return int(np.random.SeedSequence([seed, round_index, int(client_id)]).generate_state(1)[0])


def step_loss_summary(losses: Sequence[float], accumulation: int = 1) -> tuple[float, float, float]:
    """``(first, last, mean)`` of a client's per-forward losses; first and last average one optimizer step
    (``accumulation`` forwards)."""
    if not losses:
        return float("nan"), float("nan"), float("nan")
    step = max(1, accumulation)
    return float(np.mean(losses[:step])), float(np.mean(losses[-step:])), float(np.mean(losses))


class RoundEngine:
    """The federated state and the one round loop.

    Args:
        strategy: the method (pure tensor code).
        executor: trains the clients and updates the model backbone(s).
        num_clients: clients are ``"0" .. str(num_clients - 1)``.
        clients_per_round: sampled per round (a seeded draw by ``(seed, round)``).
        seed: the run's seed.
        invalid_upload: ``"raise"`` stops the run when a client fails numerically; ``"drop"`` drops it.
        client_state_memory_budget: most bytes of kept client state held in memory; beyond it the least recently
            used clients' states go to disk (:class:`~peft_fed.engine.ClientStateStore`). ``None``: all in memory.
        client_state_dir: where spilled client states go (default: a temporary folder removed with the engine).
    """

    def __init__(
        self,
        strategy: Strategy,
        executor: ClientExecutor,
        *,
        num_clients: int,
        clients_per_round: int,
        seed: int,
        invalid_upload: str = "drop",
        client_state_memory_budget: int | None = None,
        client_state_dir: str | os.PathLike | None = None,
    ) -> None:
        if not 1 <= clients_per_round <= num_clients:
            raise ValueError(f"clients_per_round must be in [1, {num_clients}], got {clients_per_round}")
        self.strategy = strategy
        self.executor = executor
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.invalid_upload = invalid_upload
        self.server_state: ServerState | None = None
        self.client_states: MutableMapping[str, ClientState] = ClientStateStore(
            ((str(i), ClientState(client_id=str(i))) for i in range(num_clients)),
            memory_budget_bytes=client_state_memory_budget,
            spill_dir=client_state_dir,
        )
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ state

    def initialize(self, *, extras=None, base_weights=None) -> None:
        """Round-0 server state; applies the strategy's initial backbone update (FRLoRA) through the executor."""
        self.server_state, initial_update = self.strategy.init_server(extras=extras, base_weights=base_weights)
        if initial_update:
            self.executor.apply_backbone_update(initial_update)

    def restore(
        self, server_state: ServerState, client_states: Mapping[str, ClientState], history: Sequence[Mapping]
    ) -> None:
        """Continue from a checkpoint (the executor's backbone must be restored by the runtime)."""
        self.server_state = server_state
        if client_states is not self.client_states:
            # the store keeps its budget and folder; the checkpoint's states replace what it held
            self.client_states.clear()
            self.client_states.update(client_states)
        self.history = [dict(row) for row in history]

    @property
    def completed_rounds(self) -> int:
        return self.server_state.round if self.server_state is not None else 0

    def global_factors(self) -> dict[str, LowRank]:
        """The global model's LoRA factors (what is evaluated and exported on top of the backbone)."""
        return self.strategy.global_factors(self.server_state, self.client_states)

    def sample_clients(self, round_index: int) -> list[str]:
        """The clients of round ``round_index``: a seeded draw without replacement, sorted."""
        chosen = sample_round_clients(self.num_clients, self.clients_per_round, self.seed, round_index)
        return [str(i) for i in chosen]

    # ------------------------------------------------------------------ the loop

    def run(
        self, num_rounds: int, hooks: RoundHooks | None = None, *, show_progress: bool = True
    ) -> list[dict[str, Any]]:
        """Play rounds ``completed_rounds .. num_rounds - 1``; return the whole history."""
        if self.server_state is None:
            raise RuntimeError("call initialize() (or restore()) before run()")
        hooks = hooks or RoundHooks()
        rounds = tqdm(
            range(self.completed_rounds, num_rounds),
            desc=f"{self.strategy.name} rounds",
            initial=self.completed_rounds,
            total=num_rounds,
            disable=not show_progress,
        )
        for round_index in rounds:
            row = self.play_round(round_index)
            row.update(hooks.round_metrics(round_index))
            self.history.append(row)
            hooks.record(row)
            hooks.checkpoint(round_index + 1)
            rounds.set_postfix(
                {k: f"{v:.4g}" for k, v in row.items() if k in ("train_loss", "eval_accuracy") and v is not None}
            )
        return self.history

    def play_round(self, round_index: int) -> dict[str, Any]:
        """One round, without evaluation: the metrics row (the history is not appended to)."""
        tasks = self.begin_round(round_index)
        tic = time.perf_counter()
        records = self.executor.train_clients(round_index, tasks)
        row = self.end_round(round_index, tasks, records, local_seconds=time.perf_counter() - tic)
        executor_metrics = getattr(self.executor, "executor_metrics", None)  # optional: e.g. a deployment's wire bytes
        if executor_metrics is not None:
            row.update(executor_metrics())
        return row

    def begin_round(self, round_index: int) -> list[ClientTask]:
        """The first half of a round: sample the clients and configure each (nothing changes yet).

        :meth:`play_round` is ``begin_round`` -> the executor -> :meth:`end_round`; a runtime whose own loop sends
        the tasks (Flower's ``Strategy.start``) calls the two halves around it."""
        if round_index != self.completed_rounds:
            raise ValueError(f"round {round_index} cannot follow {self.completed_rounds} completed rounds")
        return [
            ClientTask(cid, self.strategy.configure(self.server_state, self.client_states[cid]), self.client_states[cid])
            for cid in self.sample_clients(round_index)
        ]

    def _restart_client(self, round_index: int, client_id: str, state: ClientState) -> None:
        """Adopt the state a failed client restarts from (a new client at a backbone version the server holds)."""
        version = state.backbone_version
        if state.last_round is not None or not 0 <= version <= self.server_state.backbone_version:
            logger.warning(
                "round %d: client %s asked to restart at backbone version %s (last round %s): not a new client at a "
                "version in [0, %d], ignored", round_index + 1, client_id, version, state.last_round,
                self.server_state.backbone_version,
            )  # fmt: skip
            return
        logger.warning(
            "round %d: client %s restarts as a new client at backbone version %d (its node could not serve its "
            "previous state)", round_index + 1, client_id, version,
        )  # fmt: skip
        self.client_states[client_id] = ClientState(client_id=client_id, backbone_version=version)

    def end_round(
        self,
        round_index: int,
        tasks: Sequence[ClientTask],
        records: Sequence[ClientRecord],
        *,
        local_seconds: float = float("nan"),
    ) -> dict[str, Any]:
        """The second half of a round: aggregate the records of ``tasks`` (a task without a record counts as a
        client that failed), merge, and return the metrics row; the state changes only if aggregation succeeds."""
        if round_index != self.completed_rounds:
            raise ValueError(f"round {round_index} cannot follow {self.completed_rounds} completed rounds")
        selected = [task.client_id for task in tasks]
        by_id = {record.client_id: record for record in records if record.client_id in selected}
        records = sorted(
            [by_id.get(cid) or ClientRecord(cid, None, None, None, 0, failure="sent no reply") for cid in selected],
            key=lambda r: int(r.client_id),
        )
        tic = time.perf_counter()
        good = [r for r in records if r.failure is None]
        dropped = {r.client_id: r.failure for r in records if r.failure is not None}
        for client_id, reason in dropped.items():
            logger.warning("round %d: client %s %s; its update is dropped from this round", round_index + 1, client_id, reason)
        try:
            result = self.strategy.aggregate(self.server_state, [r.upload for r in good])
        except NoValidUploadsError:
            if good:
                raise
            raise NoValidUploadsError(
                f"round {round_index}: every client failed ({dropped}); the federated state is unchanged"
            ) from None
        dropped.update(dict(result.dropped))
        if result.backbone_update:
            self.executor.apply_backbone_update(result.backbone_update)
        accepted = set(result.accepted)
        for record in good:
            if record.client_id in accepted:
                self.client_states[record.client_id] = record.client_state
        for record in records:
            if record.failure is not None and record.client_state is not None:
                self._restart_client(round_index, record.client_id, record.client_state)
        self.server_state = result.state
        aggregate_seconds = time.perf_counter() - tic

        used = [r for r in good if r.client_id in accepted]
        trained = [r.trained for r in used]
        # a deployed client sends only what its method uploads: without every client's trained factors the
        # round's diagnostics cannot be computed and are left out of the row
        diagnostics = (
            round_diagnostics(self.strategy.specs, trained, result.weights, result.global_B).as_dict()
            if all(factors is not None for factors in trained)
            else {}
        )
        weights = {r.client_id: w for r, w in zip(used, result.weights, strict=True)}
        row: dict[str, Any] = {
            "round": round_index + 1,
            "method": self.strategy.name,
            "clients": selected,
            "dropped_clients": dropped,
            "train_loss": float(sum(weights[r.client_id] * r.loss_mean for r in used)),
            "client_loss_first": {r.client_id: r.loss_first for r in records},
            "client_loss_last": {r.client_id: r.loss_last for r in records},
            "client_num_samples": {r.client_id: r.num_samples for r in records},
            **diagnostics,
            "uplink_bytes": int(sum(r.upload.nbytes for r in good)),
            "downlink_bytes": int(sum(task.broadcast.nbytes for task in tasks)),
            "backbone_version": self.server_state.backbone_version,
            "local_train_seconds": float(sum(r.timings.get("train_seconds", 0.0) for r in records)),
            "init_seconds": float(sum(r.timings.get("init_seconds", 0.0) for r in records)),
            "round_local_wall_seconds": local_seconds,
            "aggregation_seconds": aggregate_seconds,
            **result.metrics,
        }
        jumps = inter_round_loss_jumps(self.history, row)
        row["inter_round_loss_jump"] = float(np.mean(jumps)) if jumps else None
        row["inter_round_loss_jump_abs"] = float(np.mean(np.abs(jumps))) if jumps else None
        return row
