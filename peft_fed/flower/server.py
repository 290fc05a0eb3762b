"""The server of a Flower deployment: the one round engine, with the clients on Flower nodes.

:class:`FlowerClientExecutor` is the engine's client executor for a deployment: it sends each sampled client's
task to the node that holds the client (one message per node: each client gets only the backbone updates it
missed), waits for the replies up to the round's timeout, and turns them into the engine's records. A node
that dies, never answers, or answers with something malformed, of the wrong shape, NaN/Inf or for another
client becomes a failed record: the engine drops it from the round exactly as the simulation drops a failed
client, with a log line, and the metrics row names it. Fewer good replies than ``min_replies`` stops the round
before anything is aggregated (after ``round_retries`` retries): never a half-applied state.

:func:`serve` is the ServerApp's main: the same :class:`~peft_fed.FederatedTrainer` as ``peft-fed train``
(checkpoints each round in the same atomic format, resume, ``metrics.jsonl``, ``report_to``, server-side
evaluation, export of ``final/`` as a stock PEFT adapter with its model card), with this executor in place of
its own local loop. :class:`FederatedLoraStrategy` offers the same round as a Flower message-API ``Strategy`` for
apps that drive rounds with Flower's ``Strategy.start``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from .. import peft_bridge
from ..engine import ClientRecord, ClientTask, RoundEngine
from ..linalg import LowRank
from .records import (
    QUERY,
    TRAIN,
    MalformedMessageError,
    NodeInfo,
    ProtocolMismatchError,
    TaskMessage,
    client_metadata,
    pack_query,
    pack_task,
    record_from_reply,
    serialized_nbytes,
    unpack_node_info,
    unpack_reply,
)
from .settings import DeploymentArguments, deployment_field_names

logger = logging.getLogger(__name__)


class TooFewRepliesError(RuntimeError):
    """A round got fewer good replies than ``min_replies``: it is not aggregated, the state stays as it was."""


class FlowerClientExecutor:
    """The round engine's client executor when the clients are Flower nodes.

    Args:
        grid: the ServerApp's :class:`flwr.serverapp.Grid`.
        model: the server's own ``PeftModel`` (the global model it evaluates and exports); the server's merges
            go into its backbone, the nodes merge them from their tasks.
        settings: the run's flat settings, sent with every task (a fresh node process builds its trainer from them).
        run_digest: what identifies the run to the nodes (they keep each run's state apart under it); :func:`serve`
            sets it from the run's fingerprint and folder, so a resumed run finds its state again.
        deployment: timeouts and the fewest replies a round needs.
    """

    def __init__(
        self,
        grid: Grid,
        model: Any,
        settings: Mapping[str, Any],
        run_digest: str,
        deployment: DeploymentArguments | None = None,
    ) -> None:
        self.grid = grid
        self.model = model
        self.settings = dict(settings)
        self.run_digest = run_digest
        self.deployment = deployment or DeploymentArguments()
        self.strategy = None  # the run's method: secure aggregation lays the uploads out by it (set by serve)
        self.nodes: dict[str, int] = {}  # client id -> node id
        self.node_infos: dict[str, NodeInfo] = {}
        self._queried: set[int] = set()
        self._round_metrics: dict[str, int] = {}

    # ------------------------------------------------------------------ nodes

    def discover(self, num_clients: int) -> dict[str, NodeInfo]:
        """Wait up to ``node_wait`` seconds for a node per client; ask each which client it is.

        Raises when fewer than ``min_nodes`` clients have a node by then."""
        deadline = time.monotonic() + self.deployment.node_wait
        while True:
            self.refresh_nodes(num_clients)
            if len(self.nodes) >= num_clients or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        missing = sorted(set(map(str, range(num_clients))) - set(self.nodes), key=int)
        if len(self.nodes) < self.deployment.min_nodes:
            raise TooFewRepliesError(
                f"after {self.deployment.node_wait:.0f} s only {len(self.nodes)} of the {num_clients} clients have a "
                f"node (min_nodes={self.deployment.min_nodes}); start the SuperNodes (partition-id=0..{num_clients - 1})"
            )
        if missing:
            logger.warning("clients %s have no node yet: they are dropped from the rounds they are sampled in", missing)
        return dict(self.node_infos)

    def refresh_nodes(self, num_clients: int) -> None:
        """Ask every node connected since the last call which client it is (a restarted SuperNode joins anew)."""
        fresh = [node for node in self.grid.get_node_ids() if node not in self._queried]
        if not fresh:
            return
        messages = [
            Message(content=pack_query(self.settings, self.run_digest), dst_node_id=node, message_type=QUERY)
            for node in fresh
        ]
        for reply in self.grid.send_and_receive(messages, timeout=self.deployment.round_timeout):
            node = reply.metadata.src_node_id
            self._queried.add(node)
            if reply.has_error():
                logger.error("node %s refused the run: %s", node, reply.error.reason)
                continue
            try:
                info = unpack_node_info(reply.content)
            except (ProtocolMismatchError, MalformedMessageError) as error:
                logger.error("node %s is left out: %s", node, error)
                continue
            if not 0 <= int(info.client_id) < num_clients:
                logger.error("node %s says it is client %s, outside 0 .. %d: left out", node, info.client_id, num_clients - 1)
                continue
            if info.client_id in self.nodes and self.nodes[info.client_id] != node:
                logger.warning("client %s moved from node %s to node %s", info.client_id, self.nodes[info.client_id], node)
            self.nodes[info.client_id] = node
            self.node_infos[info.client_id] = info
            logger.info("node %s serves client %s (%d samples)", node, info.client_id, info.num_samples)

    # ------------------------------------------------------------------ messages

    def messages(self, tasks: Sequence[ClientTask]) -> list[Message]:
        """One train message per task whose client has a node."""
        out = []
        self._round_metrics = {"downlink_wire_bytes": 0, "uplink_wire_bytes": 0}
        for task in tasks:
            node = self.nodes.get(task.client_id)
            if node is None:
                continue
            content = pack_task(
                TaskMessage(task.client_id, task.broadcast, client_metadata(task.client_state), self.settings, self.run_digest)
            )
            self._round_metrics["downlink_wire_bytes"] += serialized_nbytes(content)
            out.append(Message(content=content, dst_node_id=node, message_type=TRAIN))
        return out

    def records(self, tasks: Sequence[ClientTask], replies: Iterable[Message]) -> list[ClientRecord]:
        """The engine's records of a round's replies; a task without a good reply gets a failed record."""
        expected = {self.nodes[t.client_id]: t.client_id for t in tasks if t.client_id in self.nodes}
        records: dict[str, ClientRecord] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            client = expected.get(node)
            if client is None or client in records:
                logger.warning("a reply from node %s was not expected in this round: ignored", node)
                continue
            records[client] = self._record(client, node, reply)
        for task in tasks:
            if task.client_id not in records:
                why = (
                    "has no node connected"
                    if task.client_id not in self.nodes
                    else f"(node {self.nodes[task.client_id]}) sent no reply within {self.deployment.round_timeout:g} s"
                )
                records[task.client_id] = ClientRecord(task.client_id, None, None, None, 0, failure=why)
        return [records[t.client_id] for t in tasks]

    def _record(self, client: str, node: int, reply: Message) -> ClientRecord:
        def failed(why: str) -> ClientRecord:
            return ClientRecord(client, None, None, None, 0, failure=f"(node {node}) {why}")

        if reply.has_error():
            return failed(f"failed: {reply.error.reason}")
        self._round_metrics["uplink_wire_bytes"] = self._round_metrics.get("uplink_wire_bytes", 0) + serialized_nbytes(reply.content)
        try:
            message = unpack_reply(reply.content)
        except (ProtocolMismatchError, MalformedMessageError) as error:
            return failed(str(error))
        return record_from_reply(client, node, message)

    # ------------------------------------------------------------------ the executor protocol

    def train_clients(self, round_index: int, tasks: Sequence[ClientTask]) -> list[ClientRecord]:
        num_clients = int(self.settings.get("num_clients", len(self.nodes)))
        for attempt in range(self.deployment.round_retries + 1):
            self.refresh_nodes(num_clients)
            if self.deployment.secure_aggregation:
                records = self._secure_round(round_index, tasks)
            else:
                replies = self.grid.send_and_receive(self.messages(tasks), timeout=self.deployment.round_timeout)
                records = self.records(tasks, replies)
            good = sum(record.failure is None for record in records)
            if good >= self.deployment.min_replies:
                return records
            logger.warning(
                "round %d: %d good replies, fewer than min_replies=%d (attempt %d of %d)",
                round_index + 1, good, self.deployment.min_replies, attempt + 1, self.deployment.round_retries + 1,
            )  # fmt: skip
        failures = "; ".join(f"client {r.client_id} {r.failure}" for r in records if r.failure)
        raise TooFewRepliesError(
            f"round {round_index + 1} got {good} good replies, fewer than min_replies={self.deployment.min_replies}, "
            f"after {self.deployment.round_retries + 1} attempts ({failures}); nothing was aggregated: restart the "
            "ServerApp with resume=true once the nodes are back"
        )

    def _secure_round(self, round_index: int, tasks: Sequence[ClientTask]) -> list[ClientRecord]:
        from .secure import secure_round

        self._round_metrics = {}
        broadcast = tasks[0].broadcast if tasks else None
        extras = broadcast.extras if broadcast is not None else {}
        samples = {client: info.num_samples for client, info in self.node_infos.items()}
        records, self._round_metrics = secure_round(
            self.grid, self.nodes, tasks, round_index, self.strategy, extras, self.settings, self.run_digest,
            self.deployment, samples,
        )  # fmt: skip
        return records

    def apply_backbone_update(self, update: Mapping[str, LowRank]) -> None:
        peft_bridge.add_to_base_weights(self.model, update)

    def executor_metrics(self) -> dict[str, int]:
        """Bytes of the round's train messages as serialised for the wire (protobuf); under secure aggregation with
        client-level DP, the number of clients whose update was clipped (the secure sum counts them)."""
        return dict(self._round_metrics)


class FederatedLoraStrategy(FlowerStrategy):
    """A peft-fed method as a Flower message-API strategy, for apps that drive rounds with ``Strategy.start``.

    ``configure_train`` is the engine's first half of a round (sample, ``Strategy.configure`` per client) packed
    into one message per node; ``aggregate_train`` unpacks the replies into uploads and runs the engine's second
    half (the invalid-upload policy, aggregation, merge, metrics). It returns the global LoRA factors and the
    round's numeric metrics. Evaluation is the server's (``evaluate_fn`` of ``start``): nodes are not asked.
    """

    def __init__(self, engine: RoundEngine, executor: FlowerClientExecutor) -> None:
        self.engine = engine
        self.executor = executor
        self._tasks: list[ClientTask] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.executor.grid = grid
        self.executor.refresh_nodes(self.engine.num_clients)
        self._tasks = self.engine.begin_round(server_round - 1)
        return self.executor.messages(self._tasks)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        records = self.executor.records(self._tasks, replies)
        row = self.engine.end_round(server_round - 1, self._tasks, records)
        row.update(self.executor.executor_metrics())
        self.engine.history.append(row)
        factors = self.engine.global_factors()
        arrays = ArrayRecord(
            torch_state_dict={f"{n}|{k}": t for n, f in factors.items() for k, t in (("B", f.B), ("A", f.A))}
        )
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return arrays, MetricRecord(numbers)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        logger.info(
            "peft-fed %s: %d clients, %d per round", self.engine.strategy.name, self.engine.num_clients, self.engine.clients_per_round
        )


def split_run_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], DeploymentArguments]:
    """A Flower app's run config -> (peft-fed's flat run settings, the deployment's settings).

    ``config`` names a peft-fed YAML run file whose settings come first (lists such as ``target_modules`` go there:
    Flower's run config holds scalars); an empty string leaves a setting at its default."""
    from ..runtime.pipeline import read_settings_file

    given = {key.replace("-", "_"): value for key, value in run_config.items() if value != ""}
    deployment = {key: given.pop(key) for key in list(given) if key in deployment_field_names()}
    settings = read_settings_file(given.pop("config")) if "config" in given else {}
    settings.update(given)
    return settings, DeploymentArguments(**deployment)


def serve(grid: Grid, run_config: Mapping[str, Any]):
    """The ServerApp's main: a federated run whose clients are the grid's nodes; returns the run's ``RunResult``."""
    from ..runtime.checkpoint import check_output_dir
    from ..runtime.pipeline import FederatedRunConfig, load_run, train_and_export
    from ..runtime.trainer import FederatedTrainer
    from .node import settings_digest

    settings, deployment = split_run_config(run_config)
    config = FederatedRunConfig.from_dict(settings, source="the Flower app's run config")
    args = config.training_args
    check_output_dir(args.output_dir, resume=args.resume, overwrite=getattr(args, "overwrite_output_dir", False))
    run = load_run(config, tokenize_clients=False)  # the server evaluates; it never trains on client data
    flat = run.config.to_dict()
    executor = FlowerClientExecutor(grid, run.model, flat, settings_digest(flat), deployment)
    num_clients = run.config.data_args.num_clients
    infos = executor.discover(num_clients)
    digests = [infos[str(i)].data_digest if str(i) in infos else "no node at start" for i in range(num_clients)]
    trainer = FederatedTrainer(
        model=run.model,
        args=args,
        client_datasets=None,
        client_executor=executor,
        num_clients=num_clients,
        client_data_digests=digests,
        eval_dataset=run.evaluation,
        **run.trainer_kwargs(),
    )
    executor.strategy = trainer.strategy
    if deployment.secure_aggregation:
        from .secure import SecureAggregationUnsupportedError, secure_aggregation_refusal

        refusal = secure_aggregation_refusal(trainer.strategy, deployment)
        if refusal is not None:
            raise SecureAggregationUnsupportedError(refusal)
        if trainer.strategy.noise_on_clients() is not None:  # client-level DP: the clients clip and noise
            trainer.strategy.expect_noise_from_clients()
    identity = {"fingerprint": trainer.run_record()["fingerprint"], "output_dir": str(Path(args.output_dir).absolute())}
    executor.run_digest = settings_digest(identity)
    return train_and_export(trainer, run)
