"""The client side of a round on a real PEFT model, shared by every runtime.

:func:`run_client_round` turns a strategy's :class:`ClientStart` into adapter weights and a backbone
offset on the model, lets the runtime train (the Trainer's loop in simulation, a Flower client's
loop in deployment), and turns the trained adapter back into the strategy's upload. It holds no
method-specific maths: that stays in the strategy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import peft_bridge
from ..engine import ClientRecord, ClientTask, step_loss_summary
from ..linalg import LowRank
from ..state import Broadcast, ClientStart, ClientState, Upload
from ..strategies.base import Strategy

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


class ClientNumericalError(FloatingPointError):
    """A client's gradient estimate or trained adapter holds NaN/Inf: its update must not be used."""


def _check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise ClientNumericalError(f"{what} of {bad[:3]} contain NaN or Inf")


@dataclass
class ClientRoundResult:
    upload: Upload
    client_state: ClientState
    trained: dict[str, LowRank]
    """The client's full trained factors (diagnostics need them even when only one factor is uploaded)."""
    start: ClientStart
    train_output: object = None
    timings: dict[str, float] = field(default_factory=dict)


def run_client_round(
    model: nn.Module,
    strategy: Strategy,
    broadcast: Broadcast,
    client_state: ClientState,
    *,
    train: Callable[[ClientStart], object],
    num_samples: int,
    gradient_batches: Callable[[], Iterable[Mapping[str, torch.Tensor]]] | None = None,
    loss_fn: LossFn | None = None,
    extra_names: Iterable[str] = (),
    adapter_name: str = "default",
) -> ClientRoundResult:
    """One client's round: ``client_begin`` -> load -> ``train(start)`` -> read back -> ``client_end``.

    ``train`` runs the local optimisation on ``model`` (whose adapter and backbone offset are already
    set) and may return anything (e.g. the Trainer's output); it should add
    ``strategy.client_loss(peft_bridge.live_factors(model), start)`` to its loss when that is not None.
    ``gradient_batches``/``loss_fn`` feed FedSmoothLoRA's gradient estimate. The backbone is restored
    exactly afterwards; the model's adapter then holds the trained factors. Raises
    :class:`ClientNumericalError` when the gradient estimate or the trained weights are not finite.
    """
    timings: dict[str, float] = {}
    gradient_fn = None
    if strategy.needs_gradient:
        if gradient_batches is None or loss_fn is None:
            raise ValueError(f"{strategy.name} needs gradient_batches and loss_fn for its initialisation")

        def gradient_fn(offsets):
            gradients = peft_bridge.full_weight_gradients(model, gradient_batches(), loss_fn, offsets, adapter_name)
            _check_finite(gradients, "the gradient estimates")
            return gradients

    if broadcast.extras:
        # before client_begin: a gradient estimate must see the global heads, not the last client's
        peft_bridge.set_extras(model, broadcast.extras)
    tic = time.perf_counter()
    start = strategy.client_begin(broadcast, client_state, gradient_fn)
    timings["init_seconds"] = time.perf_counter() - tic
    peft_bridge.set_factors(model, start.factors, adapter_name, train_A=start.train_A, train_B=start.train_B)
    if start.extras:
        peft_bridge.set_extras(model, start.extras)
    tic = time.perf_counter()
    with peft_bridge.backbone_offsets(model, start.backbone_offsets, adapter_name):
        train_output = train(start)
    timings["train_seconds"] = time.perf_counter() - tic
    trained = peft_bridge.get_factors(model, adapter_name)
    extras = peft_bridge.get_extras(model, extra_names)
    _check_finite({f"{n}.{k}": t for n, f in trained.items() for k, t in (("B", f.B), ("A", f.A))}, "the trained factors")
    _check_finite(extras, "the trained extra parameters")
    upload, new_state = strategy.client_end(
        trained, extras, start, client_state, num_samples, broadcast.backbone_version
    )
    return ClientRoundResult(upload, new_state, trained, start, train_output, timings)


def run_client(
    model: nn.Module,
    strategy: Strategy,
    task: ClientTask,
    *,
    train: Callable[[ClientStart], object],
    step_losses: Callable[[object], Sequence[float]],
    num_samples: int,
    gradient_batches: Callable[[], Iterable[Mapping[str, torch.Tensor]]] | None = None,
    loss_fn: LossFn | None = None,
    extra_names: Iterable[str] = (),
    accumulation: int = 1,
    raise_on_failure: bool = False,
) -> ClientRecord:
    """:func:`run_client_round` for one engine task, as the engine's :class:`~peft_fed.engine.ClientRecord`.

    ``step_losses(train_output)`` gives the client's per-forward task losses. A client whose gradient
    estimate, trained weights or training loss are not finite gets a record with ``failure`` set (its update
    is dropped and it keeps its previous state); with ``raise_on_failure`` the error propagates instead.
    """
    try:
        result = run_client_round(
            model,
            strategy,
            task.broadcast,
            task.client_state,
            train=train,
            num_samples=num_samples,
            gradient_batches=gradient_batches,
            loss_fn=loss_fn,
            extra_names=extra_names,
        )
    except ClientNumericalError as error:
        if raise_on_failure:
            raise
        return ClientRecord(task.client_id, None, None, None, num_samples, failure=str(error))
    losses = list(step_losses(result.train_output))
    first, last, mean = step_loss_summary(losses, accumulation)
    if not all(math.isfinite(v) for v in losses):
        if raise_on_failure:
            raise ClientNumericalError(f"client {task.client_id}: non-finite training loss")
        return ClientRecord(task.client_id, None, None, None, num_samples, first, last, failure="non-finite training loss")
    return ClientRecord(
        client_id=task.client_id,
        upload=result.upload,
        client_state=result.client_state,
        trained=result.trained,
        num_samples=num_samples,
        loss_first=first,
        loss_last=last,
        loss_mean=mean,
        timings=result.timings,
    )
