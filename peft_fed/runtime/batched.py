"""Batched multi-client local training: the K clients of a round train together, one forward/backward per step.

``FederatedTrainer(parallel_mode="batched")`` hands its rounds to :class:`BatchedClientExecutor`. Every step, the
batches of the clients still training are collated into one batch laid out client by client and run once
through the shared frozen backbone. Each adapted layer adds, per client, its own LoRA term and its own frozen
backbone offset::

    y = base(x) + s * bmm(bmm(x_k, A_k^T), B_k^T) + bmm(bmm(x_k, R_k^T), L_k^T)        (rows of client k)

and each trainable head (``modules_to_save`` Linear layers) computes ``x_k W_k^T + b_k`` with the client's
own copy. Each client keeps its own optimizer, learning-rate schedule, gradient clipping and step count; the
step's objective is the sum of the clients' own mean losses, so no gradient mixes clients, and a client that
has finished its local steps (or whose loss became NaN/Inf) leaves the batch and is not stepped again.

The strategy calls are the ones of the sequential client round (``client_begin`` before training,
``client_loss`` every step, ``client_end`` after), so no method's mathematics lives here. What this mode
cannot reproduce exactly, it refuses up front (:func:`batched_refusal`); the trainer then trains the clients
one after another and logs why.

FedSmoothLoRA's backbone offsets ``O_k = L_k R_k`` reach the runtime as dense ``m x n`` matrices
(``ClientStart.backbone_offsets``: ``-s W_ga``, rank r, or the exact-Round-Matching residual); they are factored
once per client round at their numerical rank (:func:`_offset_factors`), so no ``K x m x n`` stack exists unless an
offset is nearly full rank.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import datasets
import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import nn
from transformers import get_scheduler
from transformers.trainer_utils import set_seed

from .. import peft_bridge
from ..engine import ClientRecord, ClientTask, client_seed, step_loss_summary
from ..linalg import LowRank
from ..state import ClientStart
from .client import ClientNumericalError, _check_finite

if TYPE_CHECKING:
    from .trainer import FederatedTrainer

_OPTIMIZER_TAKES_OVER = ("params", "model", "optimizer_dict")
"""``get_optimizer_cls_and_kwargs`` keys with which an optimizer builds its own parameter list (GaLore, LOMO,
layer-wise): it cannot be given one client's parameters."""


def batched_refusal(trainer: FederatedTrainer) -> str | None:
    """Why ``trainer``'s run cannot train its clients batched (one line), or ``None`` when it can."""
    args = trainer.args
    checks = (
        (not trainer.client_datasets, "this process holds no client data (the clients train elsewhere)"),
        (
            trainer.accelerator.num_processes > 1,
            "it runs in several processes (batched mode trains every client in one)",
        ),
        (trainer.is_deepspeed_enabled, "DeepSpeed shards the model"),
        (
            args.gradient_accumulation_steps > 1,
            "gradient_accumulation_steps > 1 is not implemented in batched mode",
        ),
        (args.fp16 or args.bf16, "mixed precision (fp16/bf16) is not implemented in batched mode"),
        (args.gradient_checkpointing, "gradient checkpointing is not implemented in batched mode"),
        (args.label_smoothing_factor != 0, "label smoothing is not implemented in batched mode"),
        (args.neftune_noise_alpha is not None, "NEFTune noise is not implemented in batched mode"),
        (args.torch_compile, "torch_compile is not implemented in batched mode"),
    )
    for refused, reason in checks:
        if refused:
            return reason
    custom = [
        type(c).__name__
        for c in trainer.callback_handler.callbacks
        if not type(c).__module__.startswith("transformers.")
    ]
    if custom:
        return f"per-step callbacks ({', '.join(custom)}) would not be called by the batched loop"
    _, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(args, trainer.model)
    if any(key in optimizer_kwargs for key in _OPTIMIZER_TAKES_OVER):
        return f"optim={args.optim!r} builds its own parameter list, so it cannot be given one client's parameters"
    for name, layer in peft_bridge.lora_layers(trainer.model).items():
        if getattr(layer, "use_dora", {}).get("default") or getattr(layer, "lora_bias", {}).get("default"):
            return f"layer {name} uses DoRA or a LoRA bias, which batched mode does not implement"
        if list(layer.active_adapters) != ["default"]:
            return f"layer {name} has other active adapters than 'default'"
    modules = dict(trainer.model.named_modules())
    for name in trainer.extra_names:
        owner = modules.get(name.rpartition(".")[0])
        if not isinstance(owner, nn.Linear) or isinstance(owner, peft_bridge.LoraLayer):
            return (
                f"trainable parameter {name} is not in a Linear head (batched mode batches Linear heads only)"
            )
    return _loss_refusal(trainer)


def _loss_refusal(trainer: FederatedTrainer) -> str | None:
    """Batched mode computes each client's loss as the cross-entropy of its rows of the logits; check on one
    example of client 0 that this is the run's loss."""
    from ..data.tasks import TaskSpec

    task = trainer.task
    if task is not None and not isinstance(task, TaskSpec):
        return (
            f"the task {type(task).__name__} computes its own loss over the whole batch; batched mode needs each "
            "client's loss (the cross-entropy over the logits of TaskSpec tasks and of the models' own "
            "classification losses)"
        )
    if isinstance(task, TaskSpec) and task.needs_custom_loss:
        if task.is_multiple_choice:  # its documented loss: cross-entropy over the choices' scores
            return None
        return f"the task type {task.name!r} has its own loss, which batched mode does not split by client"
    first = trainer.client_datasets[0]
    if isinstance(first, datasets.Dataset):  # as the Trainer's loader sees it
        first = trainer._remove_unused_columns(first, description="batched-mode check")
    probe = trainer._prepare_inputs(trainer.data_collator([first[0]]))
    labels = probe.get("labels")
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        with torch.no_grad():
            output = trainer.model(**probe)
    finally:
        trainer.model.train(was_training)
    logits = getattr(output, "logits", None)
    if (
        labels is None
        or logits is None
        or logits.dim() != 2
        or labels.dim() != 1
        or labels.is_floating_point()
    ):
        return "the model's loss is not a cross-entropy over one row of logits per example (e.g. causal LM, regression)"
    expected = F.cross_entropy(logits.float(), labels)
    if output.loss is None or not torch.allclose(output.loss.float(), expected, rtol=1e-4, atol=1e-6):
        return "the model's own loss is not the cross-entropy of its logits"
    return None


# ---------------------------------------------------------------------------------------- one client's pieces


@dataclass
class _ClientSlot:
    """One client of the batched round: its start, trainable tensors, optimizer and progress."""

    task: ClientTask
    seed: int
    num_samples: int
    start: ClientStart | None = None
    loss_start: ClientStart | None = None  # start with its context on the training device, for client_loss
    factors: dict[str, tuple[nn.Parameter, nn.Parameter]] = field(default_factory=dict)
    offsets: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    heads: dict[str, nn.Parameter] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    batches: Iterator[list[dict]] | None = None
    total_steps: int = 0
    steps_done: int = 0
    losses: list[float] = field(default_factory=list)
    failure: str | None = None
    init_seconds: float = 0.0

    @property
    def trainable(self) -> list[nn.Parameter]:
        params = [p for pair in self.factors.values() for p in pair] + list(self.heads.values())
        return [p for p in params if p.requires_grad]

    @property
    def active(self) -> bool:
        return self.failure is None and self.steps_done < self.total_steps


def _row_sizes(x: torch.Tensor, examples: Sequence[int]) -> list[int]:
    """Rows of ``x`` per client: layers see ``examples x f`` rows (``f`` choices of a multiple-choice item)."""
    total = sum(examples)
    if x.shape[0] % total:
        raise RuntimeError(
            f"a layer input of {x.shape[0]} rows cannot be split over clients with {examples} examples"
        )
    per_example = x.shape[0] // total
    return [n * per_example for n in examples]


def _per_client_matmul(x: torch.Tensor, sizes: Sequence[int], *stacks: torch.Tensor) -> torch.Tensor:
    """``x_k @ M1_k @ M2_k ...`` for the rows of each client (``stacks[i][k]`` is client k's matrix)."""
    lead = x.shape[:-1]
    if len(set(sizes)) == 1:  # equal shares: one bmm per factor
        out = x.reshape(len(sizes), -1, x.shape[-1])
        for stack in stacks:
            out = torch.bmm(out, stack)
        return out.reshape(*lead, out.shape[-1])
    parts = []
    for k, chunk in enumerate(torch.split(x, list(sizes), dim=0)):
        out = chunk
        for stack in stacks:
            out = out @ stack[k]
        parts.append(out)
    return torch.cat(parts, dim=0)


def _offset_factors(offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A client's dense ``m x n`` backbone offset as ``(R^T, L^T)`` with ``offset = L R`` at its numerical rank
    (``x O^T = x R^T L^T``), or ``(O^T, None)`` when low-rank factors would be larger than the matrix.

    FedSmoothLoRA's ``-s W_ga`` is rank r and its Round-Matching residual rank ``r (1 + missed updates)``, but the
    strategy hands them over dense; factoring them here keeps a step's offset terms ``O(r (m + n))`` per token."""
    U, S, Vh = torch.linalg.svd(offset.float(), full_matrices=False)
    # singular values below matrix_rank's tolerance are rounding noise of a lower-rank product
    tolerance = S[0] * max(offset.shape) * torch.finfo(torch.float32).eps if S.numel() else 0.0
    rank = int((S > tolerance).sum())
    m, n = offset.shape
    if rank * (m + n) >= m * n:
        return offset.mT.contiguous(), None
    left = (U[:, :rank] * S[:rank]).to(offset.dtype)  # m x k
    return Vh[:rank].mT.to(offset.dtype).contiguous(), left.mT.contiguous()


def _stacked_offsets(
    offsets: Sequence[tuple[torch.Tensor, torch.Tensor | None] | None], A_t: torch.Tensor, B_t: torch.Tensor
) -> tuple[torch.Tensor, ...] | None:
    """The step's clients' offsets as stacks for :func:`_per_client_matmul`: low-rank factors padded with zero
    columns to the largest rank, or dense ``K x n x m`` when one client's is dense; a client without one adds 0."""
    if all(o is None for o in offsets):
        return None
    n, m = A_t.shape[1], B_t.shape[2]
    if any(o is not None and o[1] is None for o in offsets):
        dense = [
            A_t.new_zeros(n, m) if o is None else (o[0] if o[1] is None else o[0] @ o[1]) for o in offsets
        ]
        return (torch.stack(dense),)
    rank = max(o[0].shape[1] for o in offsets if o is not None)
    right = [A_t.new_zeros(n, rank) if o is None else F.pad(o[0], (0, rank - o[0].shape[1])) for o in offsets]
    left = [
        A_t.new_zeros(rank, m) if o is None else F.pad(o[1], (0, 0, 0, rank - o[1].shape[0])) for o in offsets
    ]
    return torch.stack(right), torch.stack(left)


class BatchedClientExecutor:
    """Trains the round's clients of a :class:`FederatedTrainer` together; see the module docstring."""

    def __init__(self, trainer: FederatedTrainer) -> None:
        self.trainer = trainer
        self.layers = peft_bridge.lora_layers(trainer.model)
        modules = dict(trainer.model.named_modules())
        self.head_modules: dict[str, nn.Linear] = {}
        for name in trainer.extra_names:
            self.head_modules.setdefault(name.rpartition(".")[0], modules[name.rpartition(".")[0]])
        self.decay_names = set(trainer.get_decay_parameter_names(trainer.model))
        parameter_names = {id(p): n for n, p in trainer.model.named_parameters()}
        self.factor_names = {  # the model's names of each layer's (B, A): weight decay is chosen by name
            name: (
                parameter_names[id(layer.lora_B["default"].weight)],
                parameter_names[id(layer.lora_A["default"].weight)],
            )
            for name, layer in self.layers.items()
        }
        self._step_examples: list[int] = []
        self._step_stacks: dict[str, tuple[torch.Tensor, ...]] = {}
        # token positions computed: in the joint batches, and what each client's own batches would have padded to
        # (a joint batch pads every client to the longest row of the step)
        self.positions = {"joint": 0, "per_client": 0}

    # ------------------------------------------------------------------ the engine's executor

    def train_clients(self, round_index: int, tasks: Sequence[ClientTask]) -> list[ClientRecord]:
        trainer = self.trainer
        slots = [self._begin(round_index, task) for task in tasks]
        ready = [s for s in slots if s.failure is None]
        tic = time.perf_counter()
        if ready:
            self._train_together(ready)
        train_seconds = (time.perf_counter() - tic) / max(1, len(ready))
        raise_on_failure = trainer.args.invalid_upload == "raise"
        return [self._finish(slot, train_seconds, raise_on_failure) for slot in slots]

    def apply_backbone_update(self, update: Mapping[str, LowRank]) -> None:
        self.trainer.apply_backbone_update(update)

    # ------------------------------------------------------------------ begin / finish (the strategy's calls)

    def _begin(self, round_index: int, task: ClientTask) -> _ClientSlot:
        trainer, strategy, model = self.trainer, self.trainer.strategy, self.trainer.model
        dataset = trainer.client_datasets[int(task.client_id)]
        slot = _ClientSlot(task, client_seed(trainer.args.seed, round_index, task.client_id), len(dataset))
        set_seed(slot.seed)
        gradient_fn = None
        if strategy.needs_gradient:
            batches = trainer._gradient_batches(dataset, slot.seed)

            def gradient_fn(offsets):
                gradients = peft_bridge.full_weight_gradients(model, batches(), trainer._task_loss, offsets)
                _check_finite(gradients, "the gradient estimates")
                return gradients

        if task.broadcast.extras:  # a gradient estimate must see the global heads
            peft_bridge.set_extras(model, task.broadcast.extras)
        tic = time.perf_counter()
        try:
            slot.start = strategy.client_begin(task.broadcast, task.client_state, gradient_fn)
        except ClientNumericalError as error:
            slot.failure = str(error)
            return slot
        self._load_client(slot)
        slot.init_seconds = (
            time.perf_counter() - tic
        )  # with the offsets' factoring and the optimizer's set-up
        return slot

    def _load_client(self, slot: _ClientSlot) -> None:
        """The client's own trainable copies (on the training device), optimizer and schedule."""
        trainer, args, start = self.trainer, self.trainer.args, slot.start
        device = args.device
        for name, layer in self.layers.items():
            dtype = layer.lora_A["default"].weight.dtype
            A = nn.Parameter(start.factors[name].A.to(device, dtype).clone(), requires_grad=start.train_A)
            B = nn.Parameter(start.factors[name].B.to(device, dtype).clone(), requires_grad=start.train_B)
            slot.factors[name] = (B, A)
            if name in start.backbone_offsets:
                slot.offsets[name] = _offset_factors(start.backbone_offsets[name].to(device, dtype))
        if start.backbone_offsets:
            # client_end needs the dense offsets after training, but the round's K clients' m x n matrices are not
            # held on the device together (their factors train): they wait on the CPU, where client_end forms the
            # upload. The sequential round keeps its one client's offsets on the device instead.
            start = slot.start = replace(start, backbone_offsets={n: o.to("cpu") for n, o in start.backbone_offsets.items()})
        params = dict(trainer.model.named_parameters())
        for name in trainer.extra_names:
            value = start.extras.get(name, params[name].detach())
            slot.heads[name] = nn.Parameter(value.to(device, params[name].dtype).clone())
        slot.loss_start = replace(start, context=send_to_device(start.context, device))

        args.learning_rate = args.round_learning_rate(slot.task.broadcast.round)
        try:
            optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(args, trainer.model)
        finally:
            args.learning_rate = trainer._base_learning_rate
        named = self._named_trainable(slot)
        groups = [
            {"params": [p for n, p in named if n in self.decay_names], "weight_decay": args.weight_decay},
            {"params": [p for n, p in named if n not in self.decay_names], "weight_decay": 0.0},
        ]
        slot.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        slot.batches, loader_length = self._client_batches(slot)
        if args.local_steps is not None:
            slot.total_steps = args.local_steps
        else:  # as the Trainer counts an epoch budget
            slot.total_steps = math.ceil(args.local_epochs * loader_length)
        slot.scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer=slot.optimizer,
            num_warmup_steps=args.get_warmup_steps(slot.total_steps),
            num_training_steps=slot.total_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )

    def _named_trainable(self, slot: _ClientSlot) -> list[tuple[str, nn.Parameter]]:
        """The client's trainable tensors under the model's parameter names (for the weight-decay groups)."""
        named = [(self.factor_names[name][0], B) for name, (B, A) in slot.factors.items()]
        named += [(self.factor_names[name][1], A) for name, (B, A) in slot.factors.items()]
        named += list(slot.heads.items())
        return [(n, p) for n, p in named if p.requires_grad]

    def _client_batches(self, slot: _ClientSlot) -> tuple[Iterator[list[dict]], int]:
        """The client's batches in the order its sequential ``Trainer.train`` would draw them (the Trainer's own
        dataloader and sampler, re-seeded by epoch), as lists of features for one joint collation."""
        trainer = self.trainer
        collator = trainer.data_collator
        trainer.train_dataset = trainer.client_datasets[int(slot.task.client_id)]
        set_seed(slot.seed)
        trainer.data_collator = list  # keep the features: the K clients' batches are collated together
        try:
            loader = trainer.get_train_dataloader()
        finally:
            trainer.data_collator = collator
        # the Trainer forgets its loaders in free_memory() at each Trainer.train; batched rounds never call it
        with contextlib.suppress(ValueError, AttributeError):
            trainer.accelerator._dataloaders.remove(loader)

        def batches() -> Iterator[list[dict]]:
            epoch = 0
            while True:
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
                inner = getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)
                if hasattr(inner, "set_epoch"):
                    inner.set_epoch(epoch)
                yield from loader
                epoch += 1

        return batches(), len(loader)

    def _finish(self, slot: _ClientSlot, train_seconds: float, raise_on_failure: bool) -> ClientRecord:
        task, trainer = slot.task, self.trainer
        first, last, mean = step_loss_summary(slot.losses)
        timings = {"init_seconds": slot.init_seconds, "train_seconds": train_seconds}
        if slot.failure is None:
            trained = {
                name: LowRank(B.detach().to("cpu", copy=True), A.detach().to("cpu", copy=True))
                for name, (B, A) in slot.factors.items()
            }
            extras = {name: p.detach().to("cpu", copy=True) for name, p in slot.heads.items()}
            try:
                _check_finite({f"{n}.{k}": t for n, f in trained.items() for k, t in (("B", f.B), ("A", f.A))},
                              "the trained factors")  # fmt: skip
                _check_finite(extras, "the trained extra parameters")
            except ClientNumericalError as error:
                slot.failure = str(error)
        if slot.failure is not None:
            if raise_on_failure:
                raise ClientNumericalError(f"client {task.client_id}: {slot.failure}")
            return ClientRecord(task.client_id, None, None, None, slot.num_samples, first, last, timings=timings,
                                failure=slot.failure)  # fmt: skip
        upload, new_state = trainer.strategy.client_end(
            trained, extras, slot.start, task.client_state, slot.num_samples, task.broadcast.backbone_version
        )
        return ClientRecord(
            client_id=task.client_id,
            upload=upload,
            client_state=new_state,
            trained=trained,
            num_samples=slot.num_samples,
            loss_first=first,
            loss_last=last,
            loss_mean=mean,
            timings=timings,
        )

    # ------------------------------------------------------------------ the batched loop

    def _train_together(self, slots: list[_ClientSlot]) -> None:
        trainer, model, strategy = self.trainer, self.trainer.model, self.trainer.strategy
        set_seed(slots[0].seed)  # one dropout stream for the joint batch
        was_training = model.training
        model.train()
        try:
            with self._patched_forwards():
                while True:
                    active = [s for s in slots if s.active]
                    if not active:
                        break
                    features = [next(s.batches) for s in active]
                    inputs = trainer._prepare_inputs(
                        trainer.data_collator([f for chunk in features for f in chunk])
                    )
                    self._set_step(active, [len(chunk) for chunk in features])
                    self._count_positions(inputs.get("attention_mask"))
                    losses = self._client_losses(inputs, active)
                    objective = None
                    stepped = []
                    for slot, loss in zip(active, losses, strict=True):
                        value = float(loss.detach())
                        slot.losses.append(value)
                        if not math.isfinite(value):
                            slot.failure = "non-finite training loss"  # leaves the batch; the others go on
                            continue
                        if strategy.has_client_loss:
                            live = {name: LowRank(B, A) for name, (B, A) in slot.factors.items()}
                            extra = strategy.client_loss(live, slot.loss_start)
                            if extra is not None:
                                loss = loss + extra.to(loss.dtype)
                        objective = loss if objective is None else objective + loss
                        stepped.append(slot)
                    if objective is not None and objective.requires_grad:
                        objective.backward()
                    for slot in stepped:
                        if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
                            torch.nn.utils.clip_grad_norm_(slot.trainable, trainer.args.max_grad_norm)
                        slot.optimizer.step()
                        slot.scheduler.step()
                        slot.optimizer.zero_grad(set_to_none=True)
                    for slot in active:
                        slot.steps_done += 1
        finally:
            self._step_stacks = {}
            model.train(was_training)

    def _set_step(self, active: list[_ClientSlot], examples: list[int]) -> None:
        """Stack the active clients' tensors for this step's forward (differentiable: gradients reach each
        client's own parameters)."""
        self._step_examples = examples
        stacks: dict[str, tuple[torch.Tensor, ...]] = {}
        for name in self.layers:
            A_t = torch.stack([s.factors[name][1] for s in active]).mT  # K x n x r
            B_t = torch.stack([s.factors[name][0] for s in active]).mT  # K x r x m
            stacks[name] = (A_t, B_t, _stacked_offsets([s.offsets.get(name) for s in active], A_t, B_t))
        for module_name in self.head_modules:
            W_t = torch.stack([s.heads[f"{module_name}.weight"] for s in active]).mT
            bias_name = f"{module_name}.bias"
            bias = torch.stack([s.heads[bias_name] for s in active]) if bias_name in active[0].heads else None
            stacks[module_name] = (W_t, bias)
        self._step_stacks = stacks

    def _count_positions(self, attention_mask: torch.Tensor | None) -> None:
        if attention_mask is None:
            return
        lengths = attention_mask.reshape(sum(self._step_examples), -1, attention_mask.shape[-1]).sum(-1)
        self.positions["joint"] += attention_mask.numel()
        for rows in torch.split(lengths, self._step_examples):
            self.positions["per_client"] += int(rows.max()) * rows.numel()

    def _client_losses(
        self, inputs: dict[str, torch.Tensor], active: list[_ClientSlot]
    ) -> list[torch.Tensor]:
        """Each client's mean task loss: the cross-entropy of its rows of the joint forward's logits."""
        trainer = self.trainer
        features = {k: v for k, v in inputs.items() if k != "labels"}
        if trainer._uses_task_loss:
            _, logits = trainer.task.compute_loss(trainer.model, features)
        else:
            logits = trainer.model(**features).logits
        labels = inputs["labels"]
        logit_rows = torch.split(logits.float(), self._step_examples)
        label_rows = torch.split(labels, self._step_examples)
        return [F.cross_entropy(lg, lb) for lg, lb in zip(logit_rows, label_rows, strict=True)]

    @contextlib.contextmanager
    def _patched_forwards(self) -> Iterator[None]:
        """The adapted layers and heads compute each client's rows with that client's tensors."""
        patched: list[nn.Module] = []
        try:
            for name, layer in self.layers.items():
                layer.forward = self._lora_forward(name, layer)
                patched.append(layer)
            for module_name, module in self.head_modules.items():
                module.forward = self._head_forward(module_name)
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward

    def _lora_forward(self, name: str, layer: nn.Module) -> Callable[..., torch.Tensor]:
        scale = float(layer.scaling["default"])
        dropout = layer.lora_dropout["default"]

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = layer.base_layer(x, *args, **kwargs)
            A_t, B_t, offset = self._step_stacks[name]
            sizes = _row_sizes(x, self._step_examples)
            update = _per_client_matmul(dropout(x).to(A_t.dtype), sizes, A_t, B_t) * scale
            if offset is not None:  # the client's frozen backbone offset, on the undropped input as W sees it
                update = update + _per_client_matmul(x.to(A_t.dtype), sizes, *offset)
            return result + update.to(result.dtype)

        return forward

    def _head_forward(self, module_name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            W_t, bias = self._step_stacks[module_name]
            sizes = _row_sizes(x, self._step_examples)
            out = _per_client_matmul(x.to(W_t.dtype), sizes, W_t)
            if bias is not None:
                out = out + torch.repeat_interleave(
                    bias, torch.tensor(sizes, device=bias.device), dim=0
                ).view(-1, *([1] * (out.dim() - 2)), bias.shape[-1])
            return out

        return forward
