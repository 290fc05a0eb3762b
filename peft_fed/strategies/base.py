"""The one interface every federated LoRA method implements.

A strategy is pure tensor code over per-layer LoRA factors (in the weight orientation, ``W`` is
out x in). It never imports a trainer, a model or a transport, so the in-process simulation, the
multi-process Accelerate runtime and a Flower deployment all drive the same object:

    server:  state = init_server(...)                       once
             broadcast = configure(state, client_version)   per sampled client
             result = aggregate(state, uploads)             per round -> new state, backbone update
    client:  start = client_begin(broadcast, client_state, gradient_fn)
             ... local training on start.factors (+ client_loss) ...
             upload, client_state = client_end(trained, extras, start, client_state, num_samples)

States are never mutated: ``aggregate`` and ``client_end`` return new objects, so a rejected
aggregation leaves the server exactly as it was.
"""

from __future__ import annotations

import logging
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from ..linalg import LowRank, stack_low_rank
from ..state import (
    BackboneCatchUp,
    Broadcast,
    ClientStart,
    ClientState,
    LayerSpec,
    LayerTensors,
    ServerState,
    Upload,
    sample_weights,
)
from .hyperparameters import NoHyperparameters

if TYPE_CHECKING:
    from ..privacy.mechanism import ClientNoise

logger = logging.getLogger(__name__)

GradientFn = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
"""``gradient_fn(offsets) -> {layer: dLoss/dW}``: the mean full-weight gradient of each adapted layer over
the client's gradient-estimation batches, taken at ``W + offsets[layer]`` with the adapters out of the
forward pass. Supplied by the runtime (it owns the model and the data)."""

InvalidUploadPolicy = Literal["drop", "raise"]


class InvalidUploadError(ValueError):
    """An upload that does not match the model (missing or unknown layer, tensor or extra, wrong shape,
    NaN/Inf, a sample count that is not a positive integer, a client id that is not a str/int, a duplicate)."""


class AggregationError(ValueError):
    """An aggregation that would give a non-finite server state (NaN/Inf in a layer tensor, an extra or the
    backbone update) or whose linear algebra failed. The whole round is rejected under both policies (no
    single client can be blamed in general); the server state is left unchanged."""


class NoValidUploadsError(RuntimeError):
    """Every upload of a round was invalid; the server state is left unchanged."""


@dataclass
class AggregationResult:
    """What ``Strategy.aggregate`` returns.

    Attributes:
        state: the new server state (the old one is untouched).
        backbone_update: per-layer low-rank delta to add to ``W`` this round (scale included), or empty
            for methods that do not merge.
        global_B: the new global ``B`` per layer, used for the basis-overlap diagnostic (``None`` for
            methods without one: the diagnostic then uses the aggregated update's left singular vectors).
        accepted: client ids whose uploads were aggregated, in order; ``weights`` their ``p_c``.
        dropped: ``(client id, reason)`` for every rejected upload.
        metrics: scalars the aggregation adds to the round's metrics row (e.g. the ``dp_*`` facts of a
            differentially private aggregation); empty for the plain methods.
    """

    state: ServerState
    backbone_update: dict[str, LowRank]
    global_B: dict[str, torch.Tensor] | None
    accepted: list[str]
    weights: list[float]
    dropped: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def _client_key(client_id: object) -> str | None:
    """The normalised id of a client (``0`` and ``"0"`` are one client), or ``None`` if it is not a str/int."""
    if isinstance(client_id, str):
        return client_id
    if isinstance(client_id, numbers.Integral) and not isinstance(client_id, bool):
        return str(int(client_id))
    return None


def _sample_count(num_samples: object) -> int | None:
    """``num_samples`` as a positive ``int``, or ``None`` if it is not a finite positive integral number.

    An integral float (``2.0``, as JSON or a Flower config may carry a count) is accepted as that int;
    ``bool`` is not a count.
    """
    if isinstance(num_samples, bool):
        return None
    if isinstance(num_samples, numbers.Integral):
        count = int(num_samples)
    elif isinstance(num_samples, numbers.Real) and math.isfinite(num_samples) and float(num_samples).is_integer():
        count = int(num_samples)
    else:
        return None
    return count if count > 0 else None


def _first_non_finite(
    layers: LayerTensors, extras: Mapping[str, torch.Tensor], backbone_update: Mapping[str, LowRank]
) -> str | None:
    """Where a NaN/Inf sits in a new server state (one ``isfinite`` pass per tensor), or ``None``."""
    for name, tensors in layers.items():
        for key, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                return f"layer {name!r} tensor {key!r}"
    for key, tensor in extras.items():
        if not torch.isfinite(tensor).all():
            return f"extra tensor {key!r}"
    for name, update in backbone_update.items():
        for key in ("B", "A"):
            if not torch.isfinite(getattr(update, key)).all():
                return f"backbone update of layer {name!r} factor {key!r}"
    return None


def pick_factors(factors: Mapping[str, LowRank], keys: Sequence[str]) -> LayerTensors:
    """Detached copies of the named factors (``"B"``, ``"A"``) of every layer."""
    return {name: {key: getattr(f, key).detach().clone() for key in keys} for name, f in factors.items()}


def lora_default_init(spec: LayerSpec, generator: torch.Generator, dtype: torch.dtype) -> LowRank:
    """PEFT's default LoRA init: ``A`` Kaiming-uniform with ``a = sqrt(5)`` (as ``nn.Linear``), ``B = 0``."""
    bound = 1.0 / math.sqrt(spec.in_features)  # kaiming_uniform_(a=sqrt(5)) on a (r x n) weight
    A = (torch.rand(spec.A_shape, generator=generator, dtype=dtype) * 2 - 1) * bound
    return LowRank(torch.zeros(spec.B_shape, dtype=dtype), A)


def default_initial_factors(
    specs: Mapping[str, LayerSpec], seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, LowRank]:
    """PEFT's default LoRA init of every layer, drawn in order from one generator seeded by ``seed``: the
    global factors a FedAvg-style method starts from (and what a non-federated reference should start from)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: lora_default_init(spec, generator, dtype) for name, spec in specs.items()}


class Strategy(ABC):
    """Base class of every federated LoRA method.

    Args:
        specs: the adapted layers, ``{layer name: LayerSpec}``.
        seed: seeds every random tensor the method creates (initial factors), so runs are reproducible.
        invalid_upload: ``"drop"`` (default) drops an invalid upload, logs why (once, through the logger) and
            aggregates the rest; ``"raise"`` rejects the whole aggregation with :class:`InvalidUploadError`.
            An aggregation whose result would be non-finite is rejected whole with :class:`AggregationError`
            under both policies. In every case the server state never half-changes.
        dtype: dtype of the factors the method creates and aggregates in.
        num_rounds: the length of the run, for methods whose hyperparameters follow a schedule over rounds
            (every runtime passes it; ``None`` when unknown).
        **hyperparameters: the fields of the method's :attr:`Hyperparameters` dataclass, validated by it and
            kept as ``self.hyperparameters``.

    A method declares what it needs from a runtime as class attributes, so no runtime ever tests a method's
    name or which functions it overrides.
    """

    name: ClassVar[str]
    #: the method's hyperparameters, declared once (see ``strategies/hyperparameters.py``)
    Hyperparameters: ClassVar[type] = NoHyperparameters
    #: the tensors each client uploads per layer
    uploaded: ClassVar[tuple[str, ...]] = ("B", "A")
    #: whether aggregation changes the backbone (then the result must be exported as a delta)
    merges_into_backbone: ClassVar[bool] = False
    #: whether ``client_begin`` needs a ``gradient_fn``
    needs_gradient: ClassVar[bool] = False
    #: whether ``client_loss`` adds a term to the local objective (the runtime then evaluates it every step)
    has_client_loss: ClassVar[bool] = False
    #: whether a client keeps tensors between its rounds (``ClientState.layers``): a deployed client must store them
    keeps_client_state: ClassVar[bool] = False

    def __init__(
        self,
        specs: Mapping[str, LayerSpec],
        *,
        seed: int = 0,
        invalid_upload: InvalidUploadPolicy = "drop",
        dtype: torch.dtype = torch.float32,
        num_rounds: int | None = None,
        **hyperparameters,
    ) -> None:
        if not specs:
            raise ValueError(f"{type(self).__name__} needs at least one adapted layer")
        if invalid_upload not in ("drop", "raise"):
            raise ValueError(f"invalid_upload must be 'drop' or 'raise', got {invalid_upload!r}")
        if num_rounds is not None and num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        try:
            self.hyperparameters = self.Hyperparameters(**hyperparameters)
        except TypeError as error:  # an unknown keyword: say which method takes which
            from .hyperparameters import hyperparameter_names

            raise TypeError(
                f"{type(self).__name__} got unknown hyperparameter(s) "
                f"{sorted(set(hyperparameters) - set(hyperparameter_names(self.Hyperparameters)))}; "
                f"it takes {hyperparameter_names(self.Hyperparameters)}"
            ) from error
        self.specs = dict(specs)
        self.seed = seed
        self.invalid_upload = invalid_upload
        self.dtype = dtype
        self.num_rounds = num_rounds

    def gradient_batches(self) -> int:
        """How many of a client's batches the runtime averages for ``gradient_fn`` (0 without one)."""
        return 0

    def repeats_small_client_data(self) -> bool:
        """For a method with a gradient estimate: whether a runtime cycles a client with fewer than
        ``gradient_batches()`` batches up to that count (``True``) or averages the batches it has (``False``)."""
        return True

    def model_card_facts(self, rounds: int) -> dict[str, Any]:
        """What the exported adapter's model card must state about this method after ``rounds`` rounds (a
        privacy guarantee); nothing for a plain method."""
        return {}

    def noise_on_clients(self) -> ClientNoise | None:
        """Under secure aggregation, the :class:`~peft_fed.privacy.mechanism.ClientNoise` with which each client
        clips and noises its own update (client-level DP, whose server never sees one update), or ``None``: the
        clients send their weighted uploads as they are."""
        return None

    def follows_run_length(self) -> str | None:
        """What of this method follows the run's length ``num_rounds`` (a schedule over rounds), as a short
        ``setting=value`` text, or ``None``: then changing ``num_rounds`` on resume leaves past rounds as they were."""
        return None

    # ------------------------------------------------------------------ server side

    def init_server(
        self,
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
        base_weights: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[ServerState, dict[str, LowRank]]:
        """The state before round 0, and a backbone update to apply once before training (FRLoRA only).

        ``extras`` are the initial non-LoRA trainable tensors (heads); ``base_weights`` the frozen
        ``W`` of each adapted layer, needed only by methods that initialise from it.
        """
        generator = torch.Generator().manual_seed(self.seed)
        layers = self._init_layers(generator, base_weights)
        state = ServerState(
            round=0, layers=layers, extras={k: v.detach().clone() for k, v in (extras or {}).items()}
        )
        initial_update = self._initial_backbone_update(state)
        if initial_update:
            state.backbone_history.append(initial_update)
        return state, initial_update

    def _init_layers(
        self, generator: torch.Generator, base_weights: Mapping[str, torch.Tensor] | None
    ) -> LayerTensors:
        layers: LayerTensors = {}
        for name, spec in self.specs.items():
            init = lora_default_init(spec, generator, self.dtype)
            layers[name] = {"B": init.B, "A": init.A}
        return layers  # the same draws as default_initial_factors(specs, seed), from init_server's generator

    def _initial_backbone_update(self, state: ServerState) -> dict[str, LowRank]:
        return {}

    def configure(self, state: ServerState, client: ClientState | None = None) -> Broadcast:
        """The downlink message for one client.

        Only the client's metadata is read (``backbone_version``, ``last_round``), never its tensors, so a
        deployed server can pass what the client reported. ``None`` means a client seen for the first time.

        A method that merges sends the backbone updates the client missed as one exact sum per layer
        (``ServerState.catch_up``: the stacked factors or the dense sum, whichever is fewer bytes), so the
        downlink never exceeds one dense delta per layer however long the client was away.
        """
        client = client if client is not None else ClientState(client_id="")
        return Broadcast(
            round=state.round,
            layers=self._broadcast_layers(state, client),
            backbone_catch_up=(
                state.catch_up(client.backbone_version)
                if self.merges_into_backbone
                else BackboneCatchUp(start=state.backbone_version, end=state.backbone_version)
            ),
            backbone_version=state.backbone_version,
            extras=dict(state.extras),
        )

    def _broadcast_layers(self, state: ServerState, client: ClientState) -> LayerTensors:
        return {name: dict(tensors) for name, tensors in state.layers.items()}

    def aggregate(self, state: ServerState, uploads: Sequence[Upload]) -> AggregationResult:
        """Validate the uploads, weight them by sample count, and compute the next server state.

        An upload is valid when every one of its keys is accounted for: exactly the method's layers, each
        holding exactly the :attr:`uploaded` tensors (right shape, finite), exactly the server's extras
        (right shape, finite); ``num_samples`` a positive integer (an ``int``, or a finite float with an
        integral value such as ``2.0``, counted as that int; ``bool``, NaN, Inf and fractions are refused);
        ``client_id`` a ``str`` or an ``int``, normalised with ``str`` before the duplicate check (``0``
        and ``"0"`` are one client) and reported so in ``accepted``. Invalid uploads are handled by the
        ``invalid_upload`` policy.

        The new server state (layers, extras, backbone update) is checked finite before it is returned;
        if it is not, or the method's linear algebra fails (``torch.linalg.LinAlgError``), the round is
        rejected whole with :class:`AggregationError` under both policies, the state unchanged.
        """
        valid, dropped = self._validate(state, uploads)
        if not valid:
            raise NoValidUploadsError(
                f"round {state.round}: no valid upload to aggregate "
                f"({'; '.join(f'{c}: {r}' for c, r in dropped) or 'no uploads'}); the server state is unchanged"
            )
        weights = sample_weights(_sample_count(u.num_samples) for u in valid)
        accepted = [_client_key(u.client_id) for u in valid]
        try:
            new_layers, backbone_update, global_B = self._aggregate_layers(state, valid, weights)
        except torch.linalg.LinAlgError as error:
            raise AggregationError(
                f"round {state.round}: aggregation rejected: linear algebra failed in {self.name} ({error}) "
                f"aggregating clients {accepted} (uploads too large for {self.dtype} or numerically broken); "
                "the server state is unchanged"
            ) from error
        new_layers = {n: {k: t.contiguous() for k, t in tensors.items()} for n, tensors in new_layers.items()}
        new_extras = {
            key: sum(w * u.extras[key].to(torch.float64) for w, u in zip(weights, valid, strict=True)).to(value.dtype)
            for key, value in state.extras.items()
        }
        non_finite = _first_non_finite(new_layers, new_extras, backbone_update)
        if non_finite is not None:
            raise AggregationError(
                f"round {state.round}: aggregation rejected: the new server state would contain NaN or Inf in "
                f"{non_finite} ({self.name}, clients {accepted}); the server state is unchanged"
            )
        history = list(state.backbone_history)
        if backbone_update:
            history.append(backbone_update)
        new_state = ServerState(
            round=state.round + 1, layers=new_layers, extras=new_extras, backbone_history=history
        )
        return AggregationResult(
            state=new_state,
            backbone_update=backbone_update,
            global_B=global_B,
            accepted=accepted,
            weights=weights,
            dropped=dropped,
        )

    @abstractmethod
    def _aggregate_layers(
        self, state: ServerState, uploads: Sequence[Upload], weights: Sequence[float]
    ) -> tuple[LayerTensors, dict[str, LowRank], dict[str, torch.Tensor] | None]:
        """Per-layer aggregation: ``(new server layers, backbone update, global B for diagnostics)``."""

    def _validate(
        self, state: ServerState, uploads: Sequence[Upload]
    ) -> tuple[list[Upload], list[tuple[str, str]]]:
        valid: list[Upload] = []
        dropped: list[tuple[str, str]] = []
        seen: set[str] = set()
        for upload in uploads:
            key = _client_key(upload.client_id)
            problem = self._upload_problem(state, upload)
            if problem is None and key in seen:
                problem = f"duplicate upload from the same client in one round (client id {key!r})"
            if problem is None:
                valid.append(upload)
                seen.add(key)
                continue
            message = f"round {state.round}: upload of client {upload.client_id!r} rejected: {problem}"
            if self.invalid_upload == "raise":
                raise InvalidUploadError(message + " (invalid_upload='raise': nothing was aggregated)")
            logger.warning(message + "; dropping this client for the round")
            dropped.append((key if key is not None else repr(upload.client_id), problem))
        return valid, dropped

    def _upload_problem(self, state: ServerState, upload: Upload) -> str | None:
        """Why ``upload`` cannot be aggregated (``None``: it can). Every key of the upload is accounted for."""
        if _client_key(upload.client_id) is None:
            return f"client id must be a str or an int, got {type(upload.client_id).__name__} {upload.client_id!r}"
        if _sample_count(upload.num_samples) is None:
            return f"num_samples must be positive and a finite integer count, got {upload.num_samples!r}"
        missing = sorted(set(self.specs) - set(upload.layers))
        if missing:
            return f"missing layer(s) {missing[:3]}{'...' if len(missing) > 3 else ''}"
        unknown = sorted(set(upload.layers) - set(self.specs), key=repr)
        if unknown:
            return f"unknown layer(s) {unknown[:3]}"
        for name, spec in self.specs.items():
            tensors = upload.layers[name]
            if not isinstance(tensors, Mapping):
                return f"layer {name!r} is a {type(tensors).__name__}, not a mapping of tensors"
            unexpected = sorted(set(tensors) - set(self.uploaded), key=repr)
            if unexpected:
                return f"layer {name!r} has unexpected tensor(s) {unexpected} ({self.name} uploads {list(self.uploaded)})"
            for key in self.uploaded:
                if key not in tensors:
                    return f"layer {name!r} lacks tensor {key!r}"
                if not isinstance(tensors[key], torch.Tensor):
                    return f"layer {name!r} tensor {key!r} is a {type(tensors[key]).__name__}, not a tensor"
                expected = self._uploaded_shape(spec, key)
                if tuple(tensors[key].shape) != expected:
                    return f"layer {name!r} tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {expected}"
                if not torch.isfinite(tensors[key]).all():
                    return f"layer {name!r} tensor {key!r} contains NaN or Inf"
        unknown_extras = sorted(set(upload.extras) - set(state.extras), key=repr)
        if unknown_extras:
            return f"unknown extra tensor(s) {unknown_extras[:3]} (the server state has no such extra)"
        for key, reference in state.extras.items():
            if key not in upload.extras:
                return f"missing extra tensor {key!r}"
            if not isinstance(upload.extras[key], torch.Tensor):
                return f"extra tensor {key!r} is a {type(upload.extras[key]).__name__}, not a tensor"
            if upload.extras[key].shape != reference.shape:
                return f"extra tensor {key!r} has shape {tuple(upload.extras[key].shape)}, expected {tuple(reference.shape)}"
            if not torch.isfinite(upload.extras[key]).all():
                return f"extra tensor {key!r} contains NaN or Inf"
        return None

    def _uploaded_shape(self, spec: LayerSpec, key: str) -> tuple[int, int]:
        return {"B": spec.B_shape, "A": spec.A_shape}[key]

    def global_factors(
        self, state: ServerState, client_states: Mapping[str, ClientState] | None = None
    ) -> dict[str, LowRank]:
        """The LoRA factors of the *global* model (what is evaluated and exported on top of the backbone).

        Default: the server's ``B`` and ``A``. Methods that keep everything in the backbone return zero
        ``B``; FedSA-LoRA, whose server never sees a ``B``, needs the clients' states.
        """
        return {name: LowRank(t["B"], t["A"]) for name, t in state.layers.items()}

    def _zero_factors(self) -> dict[str, LowRank]:
        return {
            name: LowRank(torch.zeros(spec.B_shape, dtype=self.dtype), torch.zeros(spec.A_shape, dtype=self.dtype))
            for name, spec in self.specs.items()
        }

    # ------------------------------------------------------------------ client side

    def client_begin(
        self,
        broadcast: Broadcast,
        client_state: ClientState,
        gradient_fn: GradientFn | None = None,
    ) -> ClientStart:
        """The starting point of a client's local training. Default: the broadcast factors, both trained."""
        return ClientStart(
            round=broadcast.round,
            factors={name: LowRank(t["B"], t["A"]) for name, t in broadcast.layers.items()},
            extras=dict(broadcast.extras),
        )

    def client_loss(self, factors: Mapping[str, LowRank], start: ClientStart) -> torch.Tensor | None:
        """An extra term added to the task loss during local training (``None``: nothing to add).

        ``factors`` are the live adapter tensors (they carry gradients).
        """
        return None

    def client_end(
        self,
        trained: Mapping[str, LowRank],
        extras: Mapping[str, torch.Tensor],
        start: ClientStart,
        client_state: ClientState,
        num_samples: int,
        backbone_version: int,
    ) -> tuple[Upload, ClientState]:
        """The upload after local training and the client's new state (see :meth:`_client_end_layers`)."""
        shared, kept = self._client_end_layers(trained, start)
        return self._upload(client_state, num_samples, shared, extras), self._next_client_state(
            client_state, start, backbone_version, kept
        )

    def _client_end_layers(
        self, trained: Mapping[str, LowRank], start: ClientStart
    ) -> tuple[LayerTensors, LayerTensors | None]:
        """``(what the client uploads, what it keeps for its next round)``; ``None`` keeps its old state.

        Default: upload the factors named in :attr:`uploaded`, keep nothing new.
        """
        return pick_factors(trained, self.uploaded), None

    # ------------------------------------------------------------------ helpers for subclasses

    def _upload(
        self,
        client_state: ClientState,
        num_samples: int,
        layers: LayerTensors,
        extras: Mapping[str, torch.Tensor],
    ) -> Upload:
        return Upload(
            client_id=client_state.client_id,
            num_samples=num_samples,
            layers={n: {k: t.contiguous() for k, t in tensors.items()} for n, tensors in layers.items()},
            extras={k: v.detach().clone() for k, v in extras.items()},
        )

    @staticmethod
    def _next_client_state(
        client_state: ClientState,
        start: ClientStart,
        backbone_version: int,
        layers: LayerTensors | None = None,
    ) -> ClientState:
        return ClientState(
            client_id=client_state.client_id,
            last_round=start.round,
            backbone_version=backbone_version,
            layers=(
                {n: {k: t.contiguous() for k, t in tensors.items()} for n, tensors in layers.items()}
                if layers is not None
                else client_state.layers
            ),
            extras=client_state.extras,
        )

    @staticmethod
    def _weighted_mean(uploads: Sequence[Upload], weights: Sequence[float], layer: str, key: str) -> torch.Tensor:
        tensors = [u.layers[layer][key] for u in uploads]
        out = sum(w * t.to(torch.float64) for w, t in zip(weights, tensors, strict=True))
        return out.to(tensors[0].dtype)

    @staticmethod
    def _weighted_product_sum(
        uploads: Sequence[Upload], weights: Sequence[float], layer: str, scale: float = 1.0
    ) -> LowRank:
        """Exact factors of ``scale * sum_c p_c B_c A_c`` (stacked, rank ``|S_t| r``)."""
        return stack_low_rank(
            [(scale * w, LowRank(u.layers[layer]["B"], u.layers[layer]["A"])) for w, u in zip(weights, uploads, strict=True)]
        )
