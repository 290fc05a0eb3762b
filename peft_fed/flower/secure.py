"""Secure aggregation in a Flower deployment: Flower's SecAgg+, for methods whose server step is a weighted mean.

With ``secure_aggregation=true`` the server never holds one client's upload: a round runs Flower's
:class:`~flwr.server.workflow.SecAggPlusWorkflow` (key agreement, secret-shared masks, dropout recovery: Flower's
implementation, not ours) and learns only the sum of the clients' masked, quantised uploads, each multiplied by its
weight before masking. The weights are the clients' sample counts over the round's total (the server knows the
counts: the nodes report them, in the clear, when they join), so SecAgg+ itself weighs every client equally and the
quantisation keeps its full range; the server rescales the sum by the weights of the clients that answered, which
gives the sample-weighted mean of their uploads. Each client's record then carries that mean as its "upload",
so the strategy's usual aggregation of identical uploads with their weights gives back the mean: exactly the new
server state of a method whose server step is the weighted mean of the uploads (FedIT, FFA-LoRA, FedSA-LoRA's
shared ``A``; checked on the method's behaviour by :func:`~peft_fed.strategies.linearity.aggregates_weighted_mean`).
Any other method is refused in one line before the first round.

With client-level DP (``dp_clip``) the clients add the noise (distributed DP, :class:`~peft_fed.privacy.mechanism.
ClientNoise`): each one clips its own update (against the broadcast it started from) and adds Gaussian noise of std
``z C / sqrt(k)``, where ``k`` is the round's SecAgg+ reconstruction threshold, the fewest clients whose sum the
server can unmask; every client's SecAgg+ weight is then 1 (an unweighted sum), and one more coordinate, 1 if the
client's update was clipped, makes the sum count the clipped clients without saying which. The server divides the
sum by the round's cohort size and hands that noised mean to the DP strategy, which never adds noise itself. A client
computes ``z`` from the run settings it was given (its own copy of the accountant), not from anything the server
sends, and draws its noise from the operating system's entropy. ``secagg_clipping_range`` must then hold the noise:
it is refused below ``clip + 9`` noise stds (at ``k = 2``), so that SecAgg+'s clipping of a coordinate, which the
accounting does not cover, has probability below 1e-18 per coordinate.

What still crosses the network in the clear: the client's metadata, losses and sample count (the weight), its
participation, and the heads' and factors' *mean*. Quantisation: each coordinate is clipped to
``[-secagg_clipping_range, secagg_clipping_range]`` and quantised to ``secagg_quantization_range`` levels: each
client's weighted upload is off by at most ``clipping_range / quantization_range`` per coordinate (about 2e-6 at
the defaults), the mean by that over the answering clients' total weight.

SecAgg+ runs through Flower's legacy ``Strategy`` interface only: :class:`_OneRoundStrategy` hands the workflow the
round's per-node messages and takes back the aggregate, so the round loop stays the round engine's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from ..engine import ClientRecord, ClientTask
from ..privacy.mechanism import secure_noise_generator
from ..state import Broadcast, LayerTensors, Upload
from ..strategies.base import Strategy
from ..strategies.linearity import aggregates_weighted_mean
from .records import (
    MalformedMessageError,
    ProtocolMismatchError,
    ReplyMessage,
    TaskMessage,
    pack_reply,
    pack_task,
    record_from_reply,
    reply_from_metadata,
    reply_metadata,
    unpack_task,
)
from .settings import DeploymentArguments

SECURE_TASK = "peft_fed.task"
SECURE_WEIGHT = "peft_fed.weight"
SECURE_NOISE_SHARES = "peft_fed.noise_shares"  # the round's reconstruction threshold, over which clients split the noise
# With client-side DP noise, SecAgg+'s clipping range must reach this many noise stds beyond the clip (2 Phi(-9) is
# 2.3e-19: a coordinate clipped by SecAgg+, which the accounting does not cover, practically never happens).
NOISE_RANGE_STDS = 9.0
SMALLEST_RECONSTRUCTION_THRESHOLD = 2  # Flower's SecAgg+ never unmasks fewer


class SecureAggregationUnsupportedError(ValueError):
    """The run's method cannot be aggregated securely (its server needs more than the weighted mean)."""


def secure_aggregation_refusal(strategy: Strategy, deployment: DeploymentArguments) -> str | None:
    """Why ``strategy`` cannot run with secure aggregation under ``deployment``'s SecAgg+ settings, or ``None``."""
    noise = strategy.noise_on_clients()
    if noise is not None:
        needed = noise.clip + NOISE_RANGE_STDS * noise.noise_std(SMALLEST_RECONSTRUCTION_THRESHOLD)
        if deployment.secagg_clipping_range < needed:
            return (
                f"secagg_clipping_range={deployment.secagg_clipping_range:g} would clip the clients' DP noise: set it "
                f">= {needed:.4g} (dp_clip + {NOISE_RANGE_STDS:g} noise stds of a client when 2 share the noise)"
            )
    # (a client-level DP strategy exists only over a method that passed the same check on its own)
    if noise is None and not aggregates_weighted_mean(strategy):
        return (
            f"{strategy.name}'s server needs more than the weighted mean of the uploads (it merges, or aggregates "
            "products or SVDs of the clients' factors), which is all secure aggregation reveals; use a method whose "
            "server step is the mean (FedIT, FFA-LoRA, FedSA-LoRA)"
        )
    return None


def secure_aggregation_refusal_of_run(config: Any, deployment: DeploymentArguments) -> str | None:
    """:func:`secure_aggregation_refusal` of a run's method and DP settings (a ``FederatedRunConfig``), checked
    before any model loads or process starts: the method is built on the linearity probe's small layers."""
    from ..runtime.trainer import build_run_strategy, resolve_clients_per_round
    from ..strategies.linearity import PROBE_SPECS

    args, num_clients = config.training_args, config.data_args.num_clients
    strategy = build_run_strategy(
        args, PROBE_SPECS, num_clients=num_clients, clients_per_round=resolve_clients_per_round(args, num_clients)
    )
    return secure_aggregation_refusal(strategy, deployment)


# ------------------------------------------------------------------ the upload as one list of arrays


def upload_layout(strategy: Strategy, extras: Mapping[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    """The order and shapes in which a client's upload is flattened for SecAgg+: the method's uploaded tensors of
    every layer (sorted), then the heads (sorted)."""
    layout = [
        ("layers", f"{name}|{key}", tuple(strategy._uploaded_shape(spec, key)))
        for name, spec in sorted(strategy.specs.items())
        for key in sorted(strategy.uploaded)
    ]
    layout += [("extras", name, tuple(tensor.shape)) for name, tensor in sorted(extras.items())]
    return layout


def upload_arrays(upload: Upload) -> list[np.ndarray]:
    """A client's upload in :func:`upload_layout`'s order (float64: quantisation is SecAgg+'s only rounding)."""
    arrays = [upload.layers[name][key] for name in sorted(upload.layers) for key in sorted(upload.layers[name])]
    arrays += [upload.extras[name] for name in sorted(upload.extras)]
    return [tensor.detach().cpu().double().numpy() for tensor in arrays]


def mean_upload(arrays: Sequence[np.ndarray], layout: Sequence[tuple[str, str, tuple[int, ...]]], dtype: torch.dtype):
    """The aggregate's arrays back into per-layer tensors and heads."""
    if len(arrays) != len(layout) or any(a.shape != shape for a, (_, _, shape) in zip(arrays, layout, strict=False)):
        raise MalformedMessageError("the securely aggregated vector does not have the method's upload layout")
    layers: LayerTensors = {}
    extras: dict[str, torch.Tensor] = {}
    for array, (kind, name, _) in zip(arrays, layout, strict=True):
        tensor = torch.from_numpy(np.array(array)).to(dtype)
        if kind == "layers":
            layer, _, key = name.rpartition("|")
            layers.setdefault(layer, {})[key] = tensor
        else:
            extras[name] = tensor
    return layers, extras


# ------------------------------------------------------------------ node side


def _record_dict_bytes(content: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


def _record_dict_from_bytes(data: bytes) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def is_secure_task(content: RecordDict) -> bool:
    config = content.config_records.get("fitins.config")
    return config is not None and SECURE_TASK in config


def unpack_secure_task(content: RecordDict) -> TaskMessage:
    return unpack_task(_record_dict_from_bytes(bytes(content.config_records["fitins.config"][SECURE_TASK])))


def secure_weight(content: RecordDict) -> float:
    return float(content.config_records["fitins.config"][SECURE_WEIGHT])


def secure_contribution(reply: ReplyMessage, content: RecordDict, broadcast: Broadcast, strategy: Strategy):
    """What this client adds to the round's secure sum: its upload times its weight; with client-level DP, its
    clipped update plus its share of the noise, and 1 if it was clipped (see the module docstring)."""
    noise = strategy.noise_on_clients()
    if noise is None:
        return [secure_weight(content) * array for array in upload_arrays(reply.upload)]
    shares = int(content.config_records["fitins.config"][SECURE_NOISE_SHARES])
    if not SMALLEST_RECONSTRUCTION_THRESHOLD <= shares <= strategy.clients_per_round:
        raise MalformedMessageError(
            f"the server asks the noise to be shared by {shares} clients, outside [2, clients_per_round="
            f"{strategy.clients_per_round}]: refused (that would weaken the guarantee)"
        )
    contribution, clipped = noise.contribution(broadcast, reply.upload, shares, secure_noise_generator())
    return upload_arrays(contribution) + [np.array([1.0 if clipped else 0.0])]


def pack_secure_reply(reply: ReplyMessage, arrays: Sequence[np.ndarray]) -> RecordDict:
    """The node's reply in the legacy ``FitRes`` layout SecAgg+'s client mod reads: its contribution to the secure
    sum (:func:`secure_contribution`) as arrays, which the mod replaces by their masked, quantised form before
    anything leaves the node, and the metadata. SecAgg+'s own weight is 1 for every client: any weighting is done
    in the contribution, before quantisation."""
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(list(arrays)),
        num_examples=1,
        metrics=dict(reply_metadata(pack_reply(reply, with_upload=False))),  # the plain reply's metadata, as is
    )
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def secure_aggregation_mod(message: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a secure round; every other message passes through."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


# ------------------------------------------------------------------ server side


class _OneRoundStrategy(LegacyStrategy):
    """What ``SecAggPlusWorkflow`` asks of a legacy strategy, for one round: the per-node messages and where the
    aggregate goes."""

    def __init__(self, fit_instructions: Mapping[int, FitIns]) -> None:
        self.fit_instructions = dict(fit_instructions)
        self.results: list[tuple[Any, FitRes]] = []

    def configure_fit(self, server_round, parameters, client_manager):
        clients = client_manager.all()
        return [(clients[str(node)], fitins) for node, fitins in self.fit_instructions.items() if str(node) in clients]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _NoiseSharingWorkflow(SecAggPlusWorkflow):
    """SecAgg+ telling each client, with its task, the round's reconstruction threshold: Flower computes it in the
    setup stage, before the tasks go out, and no sum of fewer clients can be unmasked."""

    def setup_stage(self, grid, context, state) -> bool:
        ready = super().setup_stage(grid, context, state)
        for content in state.nid_to_fitins.values():
            content.config_records["fitins.config"][SECURE_NOISE_SHARES] = int(state.threshold)
        return ready


def secure_round(
    grid: Any,
    nodes: Mapping[str, int],
    tasks: Sequence[ClientTask],
    round_index: int,
    strategy: Strategy,
    extras: Mapping[str, torch.Tensor],
    settings: Mapping[str, Any],
    run_digest: str,
    deployment: DeploymentArguments,
    num_samples: Mapping[str, int],
) -> tuple[list[ClientRecord], dict[str, Any]]:
    """One round's client work under SecAgg+, and the round's metrics: every record of a client that took part
    carries the weighted mean of the uploads, or with client-level DP the noised mean of the clipped updates (no
    record holds a client's own upload); with DP the metrics count the clipped clients."""
    from .records import client_metadata

    noise = strategy.noise_on_clients()
    fit_instructions = {}
    client_of_node = {}
    reachable = [task for task in tasks if task.client_id in nodes]
    total = sum(num_samples[task.client_id] for task in reachable)
    weights = {  # DP: an unweighted sum (sample counts must not scale a client's sensitivity)
        task.client_id: 1.0 if noise is not None else num_samples[task.client_id] / total for task in reachable
    }
    for task in reachable:
        node = nodes[task.client_id]
        content = pack_task(TaskMessage(task.client_id, task.broadcast, client_metadata(task.client_state), dict(settings), run_digest))
        fit_instructions[node] = FitIns(
            Parameters(tensors=[], tensor_type="numpy.ndarray"),
            {SECURE_TASK: _record_dict_bytes(content), SECURE_WEIGHT: weights[task.client_id]},
        )
        client_of_node[node] = task.client_id
    manager = SimpleClientManager()
    for node in fit_instructions:
        manager.register(GridClientProxy(node, grid, 0))
    shim = _OneRoundStrategy(fit_instructions)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=shim,
        client_manager=manager,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_index + 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    if len(fit_instructions) >= 2:
        _NoiseSharingWorkflow(
            num_shares=deployment.secagg_num_shares,
            reconstruction_threshold=deployment.secagg_reconstruction_threshold,
            max_weight=1.0,  # every client's SecAgg+ weight is 1: the sample weights are applied before masking
            clipping_range=deployment.secagg_clipping_range,
            quantization_range=deployment.secagg_quantization_range,
            modulus_range=deployment.secagg_modulus_range,
            timeout=deployment.round_timeout,
        )(grid, context)
    records: dict[str, ClientRecord] = {}
    metrics: dict[str, Any] = {}
    if shim.results:
        # SecAgg+ returns the plain mean of the answering clients' weighted uploads: rescale it to their weighted mean
        answered = [client_of_node[proxy.node_id] for proxy, _ in shim.results]
        rescale = len(answered) / sum(weights[client] for client in answered)
        arrays = [rescale * array for array in parameters_to_ndarrays(shim.results[0][1].parameters)]
        if noise is not None:  # rescale is 1: back from the mean of the contributions to their sum
            *arrays, clipped = [len(answered) * array for array in arrays]
            metrics["dp_clipped_clients"] = int(round(float(clipped.reshape(-1)[0])))
        layers, heads = mean_upload(arrays, upload_layout(strategy, extras), strategy.dtype)
        if noise is not None:
            private = noise.noised_mean_upload(tasks[0].broadcast, Upload("sum", 1, layers, heads), len(tasks))
            layers, heads = private.layers, private.extras
        for proxy, fitres in shim.results:
            client = client_of_node[proxy.node_id]
            try:
                reply = reply_from_metadata(fitres.metrics)
            except (ProtocolMismatchError, MalformedMessageError) as error:
                records[client] = ClientRecord(client, None, None, None, 0, failure=f"(node {proxy.node_id}) {error}")
                continue
            reply.upload = Upload(client, reply.num_samples, layers, heads)
            records[client] = record_from_reply(client, proxy.node_id, reply)
    why = "fewer than 2 clients with a node: secure aggregation needs 2" if len(fit_instructions) < 2 else (
        "sent no masked upload (dropped from the secure aggregation)"
    )
    return [
        records.get(task.client_id) or ClientRecord(task.client_id, None, None, None, 0, failure=why) for task in tasks
    ], metrics

