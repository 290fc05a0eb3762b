"""What crosses the network in a Flower deployment: peft-fed's messages <-> Flower records.

One module packs and unpacks every message, so the server and the nodes cannot disagree on a layout:

* a **task** (server -> node, ``message_type="train"``): the :class:`~peft_fed.state.Broadcast` (the layers the
  client starts from; the backbone catch-up, the updates it missed, versions ``[start, backbone_version)``, summed
  per layer in the form the server chose, stacked factors with each update's rank or the dense sum; the averaged
  heads, round and backbone version) and what the server knows of the client (its
  :class:`~peft_fed.state.ClientState` *metadata*: the client's tensors stay on the node, see
  :mod:`peft_fed.flower.node`);
* a **reply** (node -> server): the :class:`~peft_fed.state.Upload`, the client's new metadata, its losses and
  timings, or the reason it failed;
* a **query** (server -> node, ``message_type="query"``) and its reply: which client a node is, how many samples
  it holds and a digest of them (the run's fingerprint), before the first round.

Every message carries :data:`PROTOCOL`; a server and a node of different protocols refuse each other in one line
(:class:`ProtocolMismatchError`). Tensors travel as float32 or their own dtype when NumPy has it (Flower's
``ArrayRecord`` converts through NumPy, which has no bfloat16): the original dtype is recorded and restored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from ..linalg import ExactSum
from ..state import BackboneCatchUp, Broadcast, ClientState, LayerTensors, Upload

#: bump when the layout below changes; a node and a server must agree on it (2: the backbone catch-up, one exact sum
#: per layer, replaced the list of per-version updates)
PROTOCOL = "peft-fed/2"

TRAIN = "train"
QUERY = "query"

_META = "peft_fed.meta"
_LAYERS = "peft_fed.layers"
_EXTRAS = "peft_fed.extras"
_CATCH_UP = "peft_fed.catch_up"
_SEP = "|"


class ProtocolMismatchError(ValueError):
    """A message from a peer that speaks another version of the peft-fed protocol (or is not peft-fed at all)."""


class MalformedMessageError(ValueError):
    """A message with missing or inconsistent parts: it is dropped like an invalid upload."""


# ------------------------------------------------------------------ tensors


def _pack_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, dict[str, str]]:
    """``ArrayRecord`` of CPU tensors (bfloat16 and other NumPy-less dtypes as float32) + their true dtypes."""
    packed, dtypes = {}, {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            dtypes[name] = str(tensor.dtype).removeprefix("torch.")
            tensor = tensor.float()
        packed[name] = tensor
    return ArrayRecord(torch_state_dict=packed), dtypes


def _unpack_tensors(record: ArrayRecord | None, dtypes: Mapping[str, str]) -> dict[str, torch.Tensor]:
    if record is None:
        return {}
    tensors = record.to_torch_state_dict()
    for name, dtype in dtypes.items():
        if name in tensors:
            tensors[name] = tensors[name].to(getattr(torch, dtype))
    return tensors


def _flatten_layers(layers: LayerTensors) -> dict[str, torch.Tensor]:
    return {f"{layer}{_SEP}{key}": tensor for layer, tensors in layers.items() for key, tensor in tensors.items()}


def _unflatten_layers(flat: Mapping[str, torch.Tensor]) -> LayerTensors:
    layers: LayerTensors = {}
    for name, tensor in flat.items():
        layer, sep, key = name.rpartition(_SEP)
        if not sep:
            raise MalformedMessageError(f"tensor {name!r} is not named 'layer{_SEP}key'")
        layers.setdefault(layer, {})[key] = tensor
    return layers


def flatten_catch_up(catch_up: BackboneCatchUp) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Each layer as it travels, ``{"layer|B": B_cat, "layer|A": A_cat}`` or ``{"layer|dense": sum}``, and its layout
    ``{layer: {"form": form, "ranks": [rank of each stacked update]}}`` (no ranks for a dense sum)."""
    flat, layout = {}, {}
    for layer, delta in catch_up.layers.items():
        for key, tensor in delta.tensors().items():
            flat[f"{layer}{_SEP}{key}"] = tensor
        layout[layer] = {"form": delta.form, "ranks": list(delta.term_ranks) if delta.form == "low_rank" else []}
    return flat, layout


def unflatten_catch_up(
    flat: Mapping[str, torch.Tensor], layout: Mapping[str, Mapping[str, Any]], start: int, end: int
) -> BackboneCatchUp:
    """The catch-up ``[start, end)`` from its tensors; every layer must carry exactly the tensors of its announced form."""
    parts = _unflatten_layers(flat)
    if set(parts) != set(layout):
        raise MalformedMessageError(
            f"the backbone catch-up announces layers {sorted(layout)[:3]}... but carries {sorted(parts)[:3]}..."
        )
    layers = {}
    for layer, announced in layout.items():
        try:
            form, ranks = str(announced["form"]), [int(r) for r in announced["ranks"]]
            delta = ExactSum.from_tensors(parts[layer], ranks)
        except (KeyError, TypeError, ValueError) as error:
            raise MalformedMessageError(f"the backbone catch-up of layer {layer!r}: {error}") from None
        if delta.form != form:
            raise MalformedMessageError(f"the backbone catch-up of layer {layer!r} is announced {form!r}, sent {delta.form!r}")
        layers[layer] = delta
    try:
        return BackboneCatchUp(start=start, end=end, layers=layers)
    except ValueError as error:
        raise MalformedMessageError(str(error)) from None


# ------------------------------------------------------------------ meta


def _meta(record_dict: RecordDict, what: str) -> dict[str, Any]:
    if _META not in record_dict:
        raise ProtocolMismatchError(f"{what} is not a peft-fed message (no {_META!r} record)")
    config = record_dict[_META]
    if not isinstance(config, ConfigRecord):
        raise MalformedMessageError(f"{what}: {_META!r} is not a ConfigRecord")
    protocol = config.get("protocol")
    if protocol != PROTOCOL:
        raise ProtocolMismatchError(
            f"{what} speaks protocol {protocol!r}, this side {PROTOCOL!r}: install the same peft-fed version on the "
            "server and every node"
        )
    try:
        return json.loads(str(config["body"]))
    except (KeyError, json.JSONDecodeError) as error:
        raise MalformedMessageError(f"{what}: unreadable metadata ({error})") from None


def _record_dict(body: Mapping[str, Any], **arrays: ArrayRecord) -> RecordDict:
    records: dict[str, Any] = {_META: ConfigRecord({"protocol": PROTOCOL, "body": json.dumps(body)})}
    records.update(arrays)
    return RecordDict(records)


# ------------------------------------------------------------------ task: server -> node


@dataclass
class TaskMessage:
    """One client's round as sent to its node."""

    client_id: str
    broadcast: Broadcast
    client_state: ClientState
    """The server's view of the client: metadata only (``client_id``, ``last_round``, ``backbone_version``)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The run's flat settings (``FederatedRunConfig.to_dict()``): a fresh node process builds its trainer from them."""
    run_digest: str = ""
    """Which run the task belongs to (a digest of the run's fingerprint and folder): a node keeps each run's state
    apart, and a resumed run finds its state again."""


def client_metadata(state: ClientState) -> ClientState:
    """``state`` without its tensors: all a server needs, and all it is sent."""
    return ClientState(client_id=state.client_id, last_round=state.last_round, backbone_version=state.backbone_version)


def pack_task(task: TaskMessage) -> RecordDict:
    broadcast, state = task.broadcast, task.client_state
    layers, layer_dtypes = _pack_tensors(_flatten_layers(broadcast.layers))
    extras, extra_dtypes = _pack_tensors(broadcast.extras)
    catch_up_tensors, catch_up_layout = flatten_catch_up(broadcast.backbone_catch_up)
    catch_up, catch_up_dtypes = _pack_tensors(catch_up_tensors)
    body = {
        "client_id": task.client_id,
        "run_digest": task.run_digest,
        "settings": task.settings,
        "round": broadcast.round,
        "backbone_version": broadcast.backbone_version,
        "catch_up": {"start": broadcast.backbone_catch_up.start, "layout": catch_up_layout},
        "client_last_round": state.last_round,
        "client_backbone_version": state.backbone_version,
        "dtypes": {"layers": layer_dtypes, "extras": extra_dtypes, "catch_up": catch_up_dtypes},
    }
    return _record_dict(body, **{_LAYERS: layers, _EXTRAS: extras, _CATCH_UP: catch_up})


def unpack_task(content: RecordDict) -> TaskMessage:
    body = _meta(content, "the server's task")
    try:
        dtypes = body["dtypes"]
        layers = _unflatten_layers(_unpack_tensors(content.get(_LAYERS), dtypes["layers"]))
        extras = _unpack_tensors(content.get(_EXTRAS), dtypes["extras"])
        version = int(body["backbone_version"])
        catch_up = unflatten_catch_up(
            _unpack_tensors(content.get(_CATCH_UP), dtypes["catch_up"]),
            {str(layer): dict(announced) for layer, announced in dict(body["catch_up"]["layout"]).items()},
            int(body["catch_up"]["start"]),
            version,
        )
        broadcast = Broadcast(
            round=int(body["round"]), layers=layers, backbone_catch_up=catch_up, backbone_version=version, extras=extras
        )
        state = ClientState(
            client_id=str(body["client_id"]),
            last_round=body["client_last_round"],
            backbone_version=int(body["client_backbone_version"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, MalformedMessageError):
            raise
        raise MalformedMessageError(f"the server's task is malformed: {error!r}") from None
    return TaskMessage(str(body["client_id"]), broadcast, state, dict(body.get("settings") or {}), str(body.get("run_digest", "")))


# ------------------------------------------------------------------ reply: node -> server


@dataclass
class ReplyMessage:
    """What a node sends back for one task."""

    client_id: str
    upload: Upload | None
    client_state: ClientState | None
    """The client's new metadata (its tensors stay on the node)."""
    num_samples: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    """``first``, ``last``, ``mean`` of the local training loss."""
    timings: dict[str, float] = field(default_factory=dict)
    failure: str | None = None


def reply_metadata(content: RecordDict) -> ConfigRecord:
    """The metadata record of a packed reply (what a secure reply carries beside its masked upload)."""
    return content[_META]


def reply_from_metadata(metadata: Mapping[str, Any]) -> ReplyMessage:
    """A reply whose only record is its metadata (a secure round's: the upload went into the masked sum)."""
    return unpack_reply(RecordDict({_META: ConfigRecord(dict(metadata))}))


def record_from_reply(client_id: str, node_id: int, reply: ReplyMessage):
    """The round engine's record of ``reply`` from client ``client_id`` on node ``node_id``: a failure when the reply
    names another client or the client failed. ``trained`` is left out: a node sends what its method uploads.

    A failure that carries client metadata is a node that could not serve the server's record of its client (its
    backbone chain or its client state is gone) and restarts it as a new client at the version it can rebuild: the
    record carries that metadata and the engine adopts it (``RoundEngine.end_round``), so the next catch-up the
    server sends starts there."""
    from ..engine import ClientRecord

    if reply.client_id != client_id or (reply.upload is not None and str(reply.upload.client_id) != client_id):
        return ClientRecord(client_id, None, None, None, 0, failure=f"(node {node_id}) replied for client {reply.client_id}")
    if reply.failure is not None or reply.upload is None:
        why = reply.failure or "sent no upload"
        restart = reply.client_state if reply.failure is not None else None
        return ClientRecord(client_id, None, restart, None, reply.num_samples, failure=f"(node {node_id}) {why}")
    losses = reply.losses
    return ClientRecord(
        client_id=client_id,
        upload=reply.upload,
        client_state=reply.client_state,
        trained=None,
        num_samples=reply.num_samples,
        loss_first=losses.get("first", float("nan")),
        loss_last=losses.get("last", float("nan")),
        loss_mean=losses.get("mean", float("nan")),
        timings=reply.timings,
    )


def pack_reply(reply: ReplyMessage, *, with_upload: bool = True) -> RecordDict:
    upload = reply.upload if with_upload else None
    layers, layer_dtypes = _pack_tensors(_flatten_layers(upload.layers) if upload else {})
    extras, extra_dtypes = _pack_tensors(upload.extras if upload else {})
    state = reply.client_state
    body = {
        "client_id": reply.client_id,
        "num_samples": reply.num_samples,
        "has_upload": upload is not None,
        "upload_client_id": upload.client_id if upload else None,
        "upload_num_samples": upload.num_samples if upload else None,
        "last_round": state.last_round if state else None,
        "backbone_version": state.backbone_version if state else None,
        "losses": reply.losses,
        "timings": reply.timings,
        "failure": reply.failure,
        "dtypes": {"layers": layer_dtypes, "extras": extra_dtypes},
    }
    return _record_dict(body, **{_LAYERS: layers, _EXTRAS: extras})


def unpack_reply(content: RecordDict) -> ReplyMessage:
    body = _meta(content, "a node's reply")
    try:
        client_id = str(body["client_id"])
        upload = state = None
        if body["has_upload"]:
            dtypes = body["dtypes"]
            upload = Upload(
                client_id=body["upload_client_id"],
                num_samples=body["upload_num_samples"],
                layers=_unflatten_layers(_unpack_tensors(content.get(_LAYERS), dtypes["layers"])),
                extras=_unpack_tensors(content.get(_EXTRAS), dtypes["extras"]),
            )
        if body["backbone_version"] is not None:
            state = ClientState(
                client_id=client_id, last_round=body["last_round"], backbone_version=int(body["backbone_version"])
            )
        losses = {k: float(v) for k, v in dict(body.get("losses") or {}).items()}
        timings = {k: float(v) for k, v in dict(body.get("timings") or {}).items()}
        failure = body.get("failure")
        return ReplyMessage(client_id, upload, state, int(body["num_samples"]), losses, timings, failure and str(failure))
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, MalformedMessageError):
            raise
        raise MalformedMessageError(f"a node's reply is malformed: {error!r}") from None


# ------------------------------------------------------------------ query: which client is a node


@dataclass
class NodeInfo:
    """A node's answer to the query before the first round."""

    client_id: str
    num_samples: int
    data_digest: str


def pack_query(settings: Mapping[str, Any], run_digest: str) -> RecordDict:
    return _record_dict({"settings": dict(settings), "run_digest": run_digest})


def unpack_query(content: RecordDict) -> tuple[dict[str, Any], str]:
    body = _meta(content, "the server's query")
    try:
        return dict(body["settings"]), str(body["run_digest"])
    except (KeyError, TypeError) as error:
        raise MalformedMessageError(f"the server's query is malformed: {error!r}") from None


def pack_node_info(info: NodeInfo) -> RecordDict:
    return _record_dict({"client_id": info.client_id, "num_samples": info.num_samples, "data_digest": info.data_digest})


def unpack_node_info(content: RecordDict) -> NodeInfo:
    body = _meta(content, "a node's answer to the query")
    try:
        return NodeInfo(str(body["client_id"]), int(body["num_samples"]), str(body["data_digest"]))
    except (KeyError, TypeError, ValueError) as error:
        raise MalformedMessageError(f"a node's answer to the query is malformed: {error!r}") from None


def serialized_nbytes(content: RecordDict) -> int:
    """Bytes of ``content`` as Flower serialises it for the wire (protobuf, before HTTP and TLS framing): what
    the deployment compares with :attr:`Broadcast.nbytes`/:attr:`Upload.nbytes` (tensors alone)."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(content).ByteSize())
