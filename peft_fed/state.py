"""The data that federated strategies exchange and keep, independent of any trainer or transport.

Everything is a plain tensor container so that a simulation runtime, a Flower deployment and a
checkpoint all move the same objects. Per-layer tensors are in the weight orientation (out x in).

Round and version conventions (used by every strategy):

* ``ServerState.round`` counts completed aggregations; the round being played is ``round``
  (0-based), so ``round == 0`` is the first round.
* the backbone *version* is the number of backbone updates merged so far
  (``len(ServerState.backbone_history)``); a client records the version it last trained against,
  and a broadcast carries the updates it has not seen yet, summed (:class:`BackboneCatchUp`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from .linalg import ExactSum, LowRank, exact_sum, tensor_nbytes

LayerTensors = dict[str, dict[str, torch.Tensor]]
"""``{layer name: {tensor name: tensor}}``; tensor names are the method's own (``"B"``, ``"A"``, ``"U_B"``...)."""


@dataclass(frozen=True)
class LayerSpec:
    """Shape and scale of one LoRA-adapted layer (``W`` is ``out_features x in_features``)."""

    out_features: int
    in_features: int
    rank: int
    scale: float

    def __post_init__(self) -> None:
        if self.out_features < 1 or self.in_features < 1:
            raise ValueError(f"layer dimensions must be positive, got {self.out_features} x {self.in_features}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    @property
    def B_shape(self) -> tuple[int, int]:
        return (self.out_features, self.rank)

    @property
    def A_shape(self) -> tuple[int, int]:
        return (self.rank, self.in_features)


def layer_tensors_nbytes(layers: LayerTensors) -> int:
    return sum(tensor_nbytes(t) for tensors in layers.values() for t in tensors.values())


def low_rank_dict_nbytes(updates: Mapping[str, LowRank]) -> int:
    return sum(update.nbytes for update in updates.values())


def factors_of(layers: LayerTensors, B: str = "B", A: str = "A") -> dict[str, LowRank]:
    return {name: LowRank(tensors[B], tensors[A]) for name, tensors in layers.items()}


def clone_layers(layers: LayerTensors) -> LayerTensors:
    return {name: {k: v.detach().clone() for k, v in tensors.items()} for name, tensors in layers.items()}


@dataclass
class BackboneCatchUp:
    """The backbone updates ``start .. end - 1`` a client has not merged, as one exact sum per layer.

    ``layers[name]`` is ``sum_{v = start}^{end - 1} backbone_history[v][name]`` (scale included: add it to ``W``),
    in whichever exact form is fewer bytes (:func:`~peft_fed.linalg.exact_sum`: the stacked factors, rank
    ``t r`` after ``t`` updates of rank ``r``, or the dense ``m x n`` sum). A client's downlink per layer is
    therefore at most ``min(t r (m + n), m n)`` numbers, never more than one dense delta however long it was away;
    a client at the current version receives nothing (``start == end``, no layers), and a client that missed one
    update receives that update itself (the same tensors, the same bytes as the update) whenever its factors are
    no larger than the dense matrix (always for a rank-``r`` merge with ``2 r <= min(m, n)``).
    """

    start: int = 0
    end: int = 0
    layers: dict[str, ExactSum] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"a backbone catch-up goes from a version to a later one, got [{self.start}, {self.end})")
        if self.start == self.end and self.layers:
            raise ValueError(f"an empty backbone catch-up [{self.start}, {self.end}) cannot carry layers")

    @property
    def num_updates(self) -> int:
        return self.end - self.start

    @property
    def nbytes(self) -> int:
        return sum(delta.nbytes for delta in self.layers.values())

    def dense(self) -> dict[str, torch.Tensor]:
        """``{layer: the m x n sum}``."""
        return {name: delta.dense() for name, delta in self.layers.items()}

    def additions(self) -> list[dict[str, LowRank | torch.Tensor]]:
        """What to add to ``W``, in order (``peft_bridge.add_to_base_weights`` takes each dict): per layer the missed
        updates one by one where they travelled stacked (the simulation's very additions, bit for bit), the dense sum
        where it travelled dense (equal to them up to float rounding)."""
        per_layer = {name: delta.additions() for name, delta in self.layers.items()}
        steps = max((len(adds) for adds in per_layer.values()), default=0)
        return [{name: adds[i] for name, adds in per_layer.items() if i < len(adds)} for i in range(steps)]


@dataclass
class Broadcast:
    """What the server sends one client at the start of a round (downlink).

    Attributes:
        round: the round being played (0-based).
        layers: per-layer tensors the client starts from (e.g. the global ``B`` and ``A``).
        backbone_catch_up: the backbone updates the client has not merged yet (from its version to
            ``backbone_version``), summed per layer (:class:`BackboneCatchUp`: exact, scale included, to *add*
            to ``W``). A deployed client adds it to its copy of the backbone; FedSmoothLoRA also reads it as
            ``D_c``. A simulation whose processes share one backbone does not merge it again.
        backbone_version: the version the client holds after adding ``backbone_catch_up``.
        extras: averaged non-LoRA trainable tensors (classification heads, ``modules_to_save``).
    """

    round: int
    layers: LayerTensors = field(default_factory=dict)
    backbone_catch_up: BackboneCatchUp = field(default_factory=BackboneCatchUp)
    backbone_version: int = 0
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone_catch_up.num_updates and self.backbone_catch_up.end != self.backbone_version:
            raise ValueError(
                f"the backbone catch-up ends at version {self.backbone_catch_up.end}, the broadcast's backbone is "
                f"version {self.backbone_version}"
            )

    @property
    def nbytes(self) -> int:
        """Exact bytes of every tensor this message carries (the catch-up in the form it travels)."""
        return (
            layer_tensors_nbytes(self.layers)
            + self.backbone_catch_up.nbytes
            + sum(tensor_nbytes(t) for t in self.extras.values())
        )


@dataclass
class Upload:
    """What one client sends back at the end of its round (uplink).

    ``layers`` holds only what the method shares (FFA-LoRA and FedSVD send ``B`` alone, FedSA-LoRA
    ``A`` alone), so :attr:`nbytes` is the real uplink size.
    """

    client_id: str
    num_samples: int
    layers: LayerTensors
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return layer_tensors_nbytes(self.layers) + sum(tensor_nbytes(t) for t in self.extras.values())


@dataclass
class ClientStart:
    """A client's starting point for local training, produced by ``Strategy.client_begin``.

    Attributes:
        round: the round being played.
        factors: initial LoRA factors to load into the adapter, per layer.
        train_A / train_B: which factors local training updates (the other is frozen).
        backbone_offsets: dense ``m x n`` matrices added to the frozen backbone for this client's
            local training only (FedSmoothLoRA's ``-s*W_ga``); the runtime removes them afterwards.
        extras: initial values of the non-LoRA trainable tensors.
        context: per-layer tensors the method needs again in ``client_loss``/``client_end``.
        info: scalars for logging (e.g. the zeta used).
    """

    round: int
    factors: dict[str, LowRank]
    train_A: bool = True
    train_B: bool = True
    backbone_offsets: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    context: LayerTensors = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)


class _TensorStateMixin:
    """(De)serialisation of a state to a flat ``{key: tensor}`` dict plus JSON metadata (safetensors-ready)."""

    def _flatten(self) -> dict[str, torch.Tensor]:
        flat: dict[str, torch.Tensor] = {}
        for layer, tensors in self.layers.items():
            for name, tensor in tensors.items():
                flat[f"layers|{layer}|{name}"] = tensor
        for name, tensor in self.extras.items():
            flat[f"extras|{name}"] = tensor
        return flat

    @staticmethod
    def _unflatten(flat: Mapping[str, torch.Tensor]) -> tuple[LayerTensors, dict[str, torch.Tensor], dict]:
        layers: LayerTensors = {}
        extras: dict[str, torch.Tensor] = {}
        rest: dict[str, torch.Tensor] = {}
        for key, tensor in flat.items():
            kind, _, remainder = key.partition("|")
            if kind == "layers":
                layer, _, name = remainder.rpartition("|")
                layers.setdefault(layer, {})[name] = tensor
            elif kind == "extras":
                extras[remainder] = tensor
            else:
                rest[key] = tensor
        return layers, extras, rest


@dataclass
class ClientState(_TensorStateMixin):
    """What a client keeps between its rounds (FedSmoothLoRA's last upload, FedSA-LoRA's own ``B``).

    ``backbone_version`` is the version of the backbone its last local training ran against, and
    ``last_round`` that round (``None`` if it never trained).
    """

    client_id: str
    last_round: int | None = None
    backbone_version: int = 0
    layers: LayerTensors = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        meta = {
            "client_id": self.client_id,
            "last_round": json.dumps(self.last_round),
            "backbone_version": str(self.backbone_version),
        }
        return {k: v.contiguous() for k, v in self._flatten().items()}, meta

    @classmethod
    def from_state_dict(cls, flat: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> ClientState:
        layers, extras, _ = cls._unflatten(flat)
        return cls(
            client_id=meta["client_id"],
            last_round=json.loads(meta["last_round"]),
            backbone_version=int(meta["backbone_version"]),
            layers=layers,
            extras=extras,
        )

    @property
    def nbytes(self) -> int:
        return layer_tensors_nbytes(self.layers) + sum(tensor_nbytes(t) for t in self.extras.values())


@dataclass
class ServerState(_TensorStateMixin):
    """The server's whole state: global per-layer tensors, averaged extras and the merge history.

    ``backbone_history[v]`` is the update that took the backbone from version ``v`` to ``v + 1``
    (low-rank, scale included). Keeping it lets the server send a returning client exactly what it
    missed, and lets FedSmoothLoRA compute ``D_c`` under partial participation.
    """

    round: int = 0
    layers: LayerTensors = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    backbone_history: list[dict[str, LowRank]] = field(default_factory=list)

    @property
    def backbone_version(self) -> int:
        return len(self.backbone_history)

    def updates_since(self, version: int) -> list[dict[str, LowRank]]:
        """The per-version updates a client at ``version`` has not merged, oldest first."""
        if not 0 <= version <= self.backbone_version:
            raise ValueError(f"client backbone version {version} is outside [0, {self.backbone_version}]")
        return self.backbone_history[version:]

    def catch_up(self, version: int) -> BackboneCatchUp:
        """What a client at ``version`` is sent: :meth:`updates_since` summed per layer, each layer in the exact form
        of fewer bytes (:func:`~peft_fed.linalg.exact_sum`). The history's tensors are referenced, not copied; a
        dense sum is formed only when something reads it."""
        updates = self.updates_since(version)
        names = list(dict.fromkeys(name for update in updates for name in update))
        layers = {name: exact_sum([update[name] for update in updates if name in update]) for name in names}
        return BackboneCatchUp(start=version, end=self.backbone_version, layers=layers)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        flat = self._flatten()
        for version, update in enumerate(self.backbone_history):
            for layer, low_rank in update.items():
                flat[f"history|{version}|{layer}|B"] = low_rank.B
                flat[f"history|{version}|{layer}|A"] = low_rank.A
        meta = {"round": str(self.round), "backbone_version": str(self.backbone_version)}
        return {k: v.contiguous() for k, v in flat.items()}, meta

    @classmethod
    def from_state_dict(cls, flat: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> ServerState:
        layers, extras, rest = cls._unflatten(flat)
        versions = int(meta["backbone_version"])
        history: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(versions)]
        for key, tensor in rest.items():
            kind, version, remainder = key.split("|", 2)
            if kind != "history":
                raise ValueError(f"unknown key {key!r} in a server state")
            layer, _, name = remainder.rpartition("|")
            history[int(version)].setdefault(layer, {})[name] = tensor
        return cls(
            round=int(meta["round"]),
            layers=layers,
            extras=extras,
            backbone_history=[factors_of(update) for update in history],
        )


def sample_weights(num_samples: Iterable[int]) -> list[float]:
    """FedAvg weights ``p_c = n_c / sum n_c``."""
    counts = list(num_samples)
    total = sum(counts)
    if total <= 0:
        raise ValueError(f"aggregation weights need a positive total sample count, got {counts}")
    return [n / total for n in counts]


def sample_round_clients(num_clients: int, per_round: int, seed: int, round_index: int) -> list[int]:
    """The clients of round ``round_index`` (0-based): a draw without replacement seeded by ``(seed, round)``,
    sorted, so every runtime that samples this way picks the same clients for the same seed."""
    rng = np.random.default_rng([seed, round_index])
    return sorted(rng.choice(num_clients, size=per_round, replace=False).tolist())
