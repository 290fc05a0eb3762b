"""``FederatedTrainer``: federated LoRA on top of ``transformers.Trainer`` and Accelerate.

One model per process. A simulated client is adapter state (a :class:`~peft_fed.ClientState` plus the
factors a strategy hands it), never a model copy: each client's local training loads its starting
factors into the one PEFT model, offsets the frozen backbone if the method says so, and runs the
Trainer's own loop (optimizer, scheduler, gradient accumulation, mixed precision, gradient
checkpointing, callbacks) for ``local_steps``. The strategy turns the trained adapter into an upload;
the server side aggregates and merges; every process applies the same merge.

Across processes (``accelerate launch --num_processes P``):

* ``parallel_mode="clients"``: the round's clients are dealt round-robin to the processes; each
  trains its share alone (no gradient all-reduce, no data sharding) and the uploads are gathered, so
  every process aggregates the same uploads in the same order and the result equals a one-process run;
* ``parallel_mode="data"`` (DeepSpeed ZeRO-3): all processes train each client together, the client's
  batches sharded across them, as the Trainer normally does.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType, gather_object, send_to_device
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import IntervalStrategy, set_seed

from .. import peft_bridge
from ..diagnostics import round_diagnostics
from ..state import ClientState, sample_round_clients
from ..strategies import Strategy, get_strategy
from ..strategies.base import NoValidUploadsError
from .arguments import FederatedTrainingArguments
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .client import ClientNumericalError, run_client_round

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass
class ClientRecord:
    """What one client's round produced, as gathered across processes."""

    client_id: str
    upload: Any
    client_state: ClientState | None
    trained: dict | None
    num_samples: int
    loss_first: float
    loss_last: float
    loss_mean: float
    timings: dict[str, float] = field(default_factory=dict)
    failure: str | None = None


def inter_round_loss_jumps(history: Sequence[Mapping[str, Any]], row: Mapping[str, Any]) -> list[float]:
    """For each client of ``row`` that trained before: its first-step loss now minus its last-step loss
    in its previous round (the discontinuity FedSmoothLoRA's Round-Matching targets)."""
    previous_last: dict[str, float] = {}
    for past in history:
        previous_last.update(past["client_loss_last"])
    return [
        first - previous_last[cid]
        for cid, first in row["client_loss_first"].items()
        if cid in previous_last and math.isfinite(first) and math.isfinite(previous_last[cid])
    ]


def _round_seed(seed: int, round_index: int, client_id: str) -> int:
    # Independent of which process trains the client, so 1 and P processes see the same streams.
    return int(np.random.SeedSequence([seed, round_index, int(client_id)]).generate_state(1)[0])


class FederatedTrainer(Trainer):
    """Federated LoRA fine-tuning with the Trainer's machinery for each client's local training.

    Args:
        model: a ``PeftModel`` with a LoRA adapter (a :class:`~peft_fed.FedSmoothLoraConfig` or
            :class:`~peft_fed.SubspaceRegLoraConfig` supplies its method's hyperparameters).
        args: :class:`FederatedTrainingArguments`.
        client_datasets: one (already preprocessed) training dataset per client.
        eval_dataset: evaluation set of the global model (e.g. the union of the clients' eval splits).
        task: optional task object with ``compute_loss(model, inputs) -> (loss, logits)`` for tasks whose
            model forward does not compute the task loss (multiple choice by log-likelihood).
        strategy: a built :class:`~peft_fed.Strategy`, or ``None`` to build ``args.method``.

    ``train()`` runs all rounds and returns the list of per-round metrics (also written, one JSON
    object per round, to ``OUTPUT_DIR/metrics.jsonl``).

    Example:

        >>> trainer = FederatedTrainer(model=peft_model, args=args, client_datasets=clients,
        ...                            eval_dataset=eval_set, data_collator=collator)
        >>> history = trainer.train()
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: FederatedTrainingArguments,
        client_datasets: Sequence[Any],
        eval_dataset: Any = None,
        task: Any = None,
        strategy: Strategy | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if not isinstance(args, FederatedTrainingArguments):
            raise TypeError("FederatedTrainer needs FederatedTrainingArguments")
        if not client_datasets:
            raise ValueError("FederatedTrainer needs at least one client dataset")
        empty = [i for i, d in enumerate(client_datasets) if len(d) == 0]
        if empty:
            raise ValueError(
                f"client(s) {empty[:10]} have no training samples; re-partition (e.g. a larger Dirichlet alpha "
                "or min_partition_size) or drop those clients"
            )
        self.specs = peft_bridge.layer_specs(model)
        self.client_datasets = list(client_datasets)
        self.num_clients = len(self.client_datasets)
        self.clients_per_round = self._resolve_clients_per_round(args)
        self.task = task
        if task is not None and trainer_kwargs.get("compute_metrics") is None and hasattr(task, "compute_metrics"):
            trainer_kwargs["compute_metrics"] = task.compute_metrics
        self.strategy = strategy or self._build_strategy(model, args)
        if self.strategy.needs_gradient:
            peft_config = getattr(model, "peft_config", {}).get("default")
            self.gradient_batches = args.gradient_estimation_batches or getattr(peft_config, "num_gradient_batches", 8)
        else:
            self.gradient_batches = 0
        self.extra_names = peft_bridge.trainable_extra_names(model)
        self.original_weights = peft_bridge.base_weights(model)
        self.history: list[dict[str, Any]] = []
        self._current_start = None
        self._step_losses: list[float] = []
        super().__init__(model=model, args=args, train_dataset=self.client_datasets[0], eval_dataset=eval_dataset, **trainer_kwargs)
        # Local training is logged and checkpointed per round by us, not per step by the Trainer.
        self.args.save_strategy = IntervalStrategy.NO
        self.args.logging_strategy = IntervalStrategy.NO
        self.args.eval_strategy = IntervalStrategy.NO
        self.args.disable_tqdm = True
        # We draw our own bars over rounds and clients; the Trainer's per-client bar and printed logs would
        # repeat for every client of every round.
        self.remove_callback(ProgressCallback)
        self.remove_callback(PrinterCallback)
        self.parallel_mode = self._resolve_parallel_mode()
        if self.is_zero3_enabled and self._strategy_has_loss_term:
            raise NotImplementedError(
                f"{self.strategy.name!r} adds a loss term on the live LoRA factors, which DeepSpeed ZeRO-3 cannot "
                "provide (its partitioned parameters cannot be gathered with gradients outside their module's "
                "forward pass); use ZeRO stage 1 or 2, or train without DeepSpeed"
            )
        self.server_state, initial_update = self.strategy.init_server(
            extras=peft_bridge.get_extras(model, self.extra_names),
            base_weights=self.original_weights,
        )
        if initial_update:
            peft_bridge.add_to_base_weights(model, initial_update)
        self.client_states = {str(i): ClientState(client_id=str(i)) for i in range(self.num_clients)}
        self.start_round = 0
        if args.resume:
            self._resume()

    # ------------------------------------------------------------------ setup

    def _resolve_clients_per_round(self, args: FederatedTrainingArguments) -> int:
        if args.clients_per_round is not None:
            if args.clients_per_round > self.num_clients:
                raise ValueError(
                    f"clients_per_round={args.clients_per_round} is more than the {self.num_clients} clients"
                )
            return args.clients_per_round
        if args.client_fraction is not None:
            return max(1, round(args.client_fraction * self.num_clients))
        return self.num_clients

    def _build_strategy(self, model: torch.nn.Module, args: FederatedTrainingArguments) -> Strategy:
        from ..strategies import STRATEGIES, canonical_method_name

        name = canonical_method_name(args.method)
        cls = STRATEGIES[name]
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "specs", "kwargs"}
        accepted |= set(inspect.signature(Strategy.__init__).parameters) - {"self", "specs"}
        hyper: dict[str, Any] = {}
        peft_config = getattr(model, "peft_config", {}).get("default")
        config_method = getattr(peft_config, "federated_method", None)
        if config_method is not None and config_method != name:
            raise ValueError(
                f"the model's PEFT config is for {config_method!r} but args.method is {name!r}; "
                "use a plain LoraConfig for other methods or set method to match"
            )
        if peft_config is not None and config_method == name:
            for key in accepted:
                if hasattr(peft_config, key):
                    hyper[key] = getattr(peft_config, key)
        hyper.update(args.method_kwargs or {})
        unknown = set(hyper) - accepted
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)} for method {name!r}; it takes {sorted(accepted)}")
        hyper.setdefault("seed", args.seed)
        hyper.setdefault("invalid_upload", args.invalid_upload)
        if "num_rounds" in accepted:
            hyper.setdefault("num_rounds", args.num_rounds)
        return get_strategy(name, self.specs, **hyper)

    def _resolve_parallel_mode(self) -> str:
        mode = self.args.parallel_mode
        if mode == "auto":
            mode = "data" if self.is_deepspeed_enabled else "clients"
        if mode == "clients" and self.is_deepspeed_enabled and self.accelerator.num_processes > 1:
            raise ValueError("DeepSpeed shards the model across processes: use parallel_mode='data'")
        return mode

    @property
    def _client_parallel(self) -> bool:
        return self.parallel_mode == "clients" and self.accelerator.num_processes > 1

    # ------------------------------------------------------------------ Trainer hooks

    @property
    def _uses_task_loss(self) -> bool:
        """Whether the task computes the loss itself (multiple choice by log-likelihood), not the model."""
        return self.task is not None and getattr(self.task, "needs_custom_loss", True) and hasattr(self.task, "compute_loss")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._uses_task_loss:
            loss, logits = self.task.compute_loss(model, inputs)
            outputs = {"logits": logits}
        else:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and self._current_start is not None:
            self._step_losses.append(self._recorded_loss(loss))
            if self._strategy_has_loss_term:
                extra = self.strategy.client_loss(peft_bridge.live_factors(self.model), self._current_start)
                if extra is not None:
                    loss = loss + extra.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    @property
    def _strategy_has_loss_term(self) -> bool:
        return type(self.strategy).client_loss is not Strategy.client_loss

    def _recorded_loss(self, loss: torch.Tensor) -> float:
        """The step's loss as recorded in the metrics: in data-parallel mode with several processes, the mean
        of the processes' losses (each saw a shard of the batch), so every process records the same value
        and drops a diverging client consistently."""
        if self.parallel_mode == "data" and self.accelerator.num_processes > 1:
            return float(self.accelerator.gather(loss.detach().float().reshape(1)).mean())
        return float(loss.detach())

    @property
    def is_zero3_enabled(self) -> bool:
        """Whether DeepSpeed ZeRO stage 3 partitions the model's parameters."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3

    def _release_deepspeed_engine(self) -> None:
        """Before a client's ``Trainer.train`` under DeepSpeed: retire the previous client's engine.

        ``Trainer.train`` builds a DeepSpeed engine (optimizer, ZeRO partitions of the trainable factors,
        fp32 master copies, hooks) only when ``model_wrapped`` is the bare model; a second call with the old
        engine would pair it with a fresh optimizer it does not know. The old engine is kept alive until
        here, so its hooks keep fetching partitioned parameters for gradient estimation and evaluation between
        clients; it is destroyed (hooks removed, Accelerate's references dropped) right before the next one is
        made. The PEFT model stays the same object throughout; the new engine re-partitions nothing (the
        parameters are already ZeRO-3 parameters) and starts from the adapter the runtime loaded.
        """
        if not self.is_deepspeed_enabled or self.model_wrapped is self.model:
            return
        self.accelerator.free_memory()  # destroys the engine wrapped by the last prepare, resets its lists
        self.model_wrapped = self.model
        self.deepspeed = None
        self.optimizer, self.lr_scheduler = None, None

    def _sync_deepspeed_learning_rate(self) -> None:
        """Give an optimizer/scheduler section of the DeepSpeed config this round's learning rate.

        The Trainer writes ``learning_rate`` into the config's ``"auto"`` fields once, at construction; the
        round schedule (``round_lr_scheduler``) changes it afterwards, and each client's new engine builds
        its optimizer from the config.
        """
        if not self.is_deepspeed_enabled:
            return
        config = self.accelerator.state.deepspeed_plugin.hf_ds_config.config
        optimizer = config.get("optimizer", {}).get("params", {})
        if "lr" in optimizer:
            optimizer["lr"] = self.args.learning_rate
        scheduler = config.get("scheduler", {}).get("params", {})
        if "warmup_max_lr" in scheduler:
            scheduler["warmup_max_lr"] = self.args.learning_rate

    def get_train_dataloader(self) -> DataLoader:
        if not self._client_parallel:
            return super().get_train_dataloader()
        # Process-local: this process trains the whole client alone, so no sharding across processes.
        generator = torch.Generator().manual_seed(torch.initial_seed() % (2**63))
        return DataLoader(
            self._remove_unused_columns(self.train_dataset, description="training"),
            batch_size=self._train_batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=self.data_collator,
            drop_last=self.args.dataloader_drop_last,
        )

    @contextlib.contextmanager
    def _process_local_training(self) -> Iterator[None]:
        """In client-parallel mode, make Accelerate treat this process as alone while it trains a client."""
        if not self._client_parallel:
            yield
            return
        state = self.accelerator.state
        saved_type, saved_average = state.distributed_type, self.args.average_tokens_across_devices
        try:
            state.distributed_type = DistributedType.NO  # no DDP wrapper, no gradient all-reduce
            self.args.average_tokens_across_devices = False
            yield
        finally:
            state.distributed_type = saved_type
            self.args.average_tokens_across_devices = saved_average

    # ------------------------------------------------------------------ federated loop

    def sample_clients(self, round_index: int) -> list[str]:
        """The clients of round ``round_index``: a seeded draw without replacement, sorted."""
        chosen = sample_round_clients(self.num_clients, self.clients_per_round, self.args.seed, round_index)
        return [str(i) for i in chosen]

    def _gradient_batches(self, dataset, seed: int) -> Callable[[], list[Mapping[str, torch.Tensor]]]:
        # In data-parallel mode every process computes the same estimate on the global batch (per-device batch
        # x processes), so it does not depend on how many processes share the client's training.
        batch_size = self._train_batch_size
        if self.parallel_mode == "data":
            batch_size *= self.accelerator.num_processes

        def batches():
            generator = torch.Generator().manual_seed(seed)
            loader = DataLoader(
                self._remove_unused_columns(dataset, description="gradient estimation"),
                batch_size=batch_size,
                shuffle=True,
                generator=generator,
                collate_fn=self.data_collator,
            )
            out = []
            while len(out) < self.gradient_batches:  # cycle a client smaller than N_ga batches
                for batch in loader:
                    out.append(self._prepare_inputs(batch))
                    if len(out) == self.gradient_batches:
                        break
            return out

        return batches

    def _task_loss(self, model, batch) -> torch.Tensor:
        if self._uses_task_loss:
            return self.task.compute_loss(model, batch)[0]
        return model(**batch).loss

    def _train_one_client(self, round_index: int, client_id: str, broadcast) -> ClientRecord:
        dataset = self.client_datasets[int(client_id)]
        seed = _round_seed(self.args.seed, round_index, client_id)
        set_seed(seed)
        self._step_losses = []

        def local_train(start):
            # client_loss runs every step on the training device: its context (CPU, server side) moves there once
            # per client round, not once per step; client_end keeps the CPU original
            self._current_start = replace(start, context=send_to_device(start.context, self.args.device))
            self.train_dataset = dataset
            self.optimizer, self.lr_scheduler = None, None  # fresh optimizer state for every client round
            self.args.learning_rate = self.args.round_learning_rate(round_index)
            if self.args.local_steps is not None:
                self.args.max_steps = self.args.local_steps
            else:
                self.args.max_steps = -1
                self.args.num_train_epochs = self.args.local_epochs
            self._release_deepspeed_engine()
            self._sync_deepspeed_learning_rate()
            try:
                with self._process_local_training():
                    return Trainer.train(self)
            finally:
                self._current_start = None
                self.args.learning_rate = self._base_learning_rate

        try:
            result = run_client_round(
                self.model,
                self.strategy,
                broadcast,
                self.client_states[client_id],
                train=local_train,
                num_samples=len(dataset),
                gradient_batches=self._gradient_batches(dataset, seed) if self.strategy.needs_gradient else None,
                loss_fn=self._task_loss,
                extra_names=self.extra_names,
            )
        except ClientNumericalError as error:
            if self.args.invalid_upload == "raise":
                raise
            return self._failed_record(client_id, len(dataset), str(error))
        losses = self._step_losses
        accumulation = max(1, self.args.gradient_accumulation_steps)
        first = float(np.mean(losses[:accumulation])) if losses else float("nan")
        last = float(np.mean(losses[-accumulation:])) if losses else float("nan")
        if not all(math.isfinite(v) for v in losses):
            return self._failed_record(client_id, len(dataset), "non-finite training loss", first, last)
        return ClientRecord(
            client_id=client_id,
            upload=result.upload,
            client_state=result.client_state,
            trained=result.trained,
            num_samples=len(dataset),
            loss_first=first,
            loss_last=last,
            loss_mean=float(np.mean(losses)) if losses else float("nan"),
            timings=result.timings,
        )

    def _failed_record(self, client_id, num_samples, reason, first=float("nan"), last=float("nan")) -> ClientRecord:
        logger.warning("client %s: %s; its update is dropped from this round", client_id, reason)
        return ClientRecord(client_id, None, None, None, num_samples, first, last, float("nan"), failure=reason)

    def _gather(self, records: list[ClientRecord]) -> list[ClientRecord]:
        if not self._client_parallel:
            return records
        gathered = gather_object([records])
        return [record for chunk in gathered for record in chunk]

    def _load_global_model(self) -> None:
        """Put the global model's factors and heads into the adapter (for evaluation and export)."""
        factors = self.strategy.global_factors(self.server_state, self.client_states)
        peft_bridge.set_factors(self.model, factors)
        if self.server_state.extras:
            peft_bridge.set_extras(self.model, self.server_state.extras)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):  # noqa: D417
        """Run every federated round; returns the per-round metrics (also in ``OUTPUT_DIR/metrics.jsonl``)."""
        args = self.args
        self._base_learning_rate = args.learning_rate
        output_dir = Path(args.output_dir)
        if self.is_world_process_zero():
            output_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_metrics(output_dir / METRICS_FILE, self.start_round)
        rounds = tqdm(
            range(self.start_round, args.num_rounds),
            desc=f"{self.strategy.name} rounds",
            initial=self.start_round,
            total=args.num_rounds,
            disable=not self.is_world_process_zero(),
        )
        # Trainer.train() (once per client round) starts with Accelerate's free_memory(), a full gc.collect()
        # that walks every object of the process: half a second per client here. Freezing what exists now
        # (model, datasets, tokenizer: alive for the whole run anyway) keeps later collections cheap.
        gc.freeze()
        try:
            for round_index in rounds:
                row = self._play_round(round_index)
                rounds.set_postfix(
                    {k: f"{row[k]:.4g}" for k in ("train_loss", "eval_accuracy") if row.get(k) is not None}
                )
                if args.save_every and (round_index + 1) % args.save_every == 0:
                    self.save_federated_checkpoint(round_index + 1)
        finally:
            gc.unfreeze()
        self._load_global_model()
        return self.history

    def _play_round(self, round_index: int) -> dict[str, Any]:
        args = self.args
        selected = self.sample_clients(round_index)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = selected[rank::world] if self._client_parallel else selected
        downlink = 0
        records: list[ClientRecord] = []
        tic = time.perf_counter()
        for client_id in tqdm(mine, desc=f"round {round_index} clients", leave=False, disable=not self.is_world_process_zero()):
            broadcast = self.strategy.configure(self.server_state, self.client_states[client_id])
            downlink += broadcast.nbytes
            records.append(self._train_one_client(round_index, client_id, broadcast))
        local_seconds = time.perf_counter() - tic
        records = sorted(self._gather(records), key=lambda r: int(r.client_id))
        downlink = sum(self._gather_scalar(downlink))

        tic = time.perf_counter()
        good = [r for r in records if r.failure is None]
        dropped = {r.client_id: r.failure for r in records if r.failure is not None}
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
            peft_bridge.add_to_base_weights(self.model, result.backbone_update)
        accepted = set(result.accepted)
        for record in good:
            if record.client_id in accepted:
                self.client_states[record.client_id] = record.client_state
        self.server_state = result.state
        aggregate_seconds = time.perf_counter() - tic

        used = [r for r in good if r.client_id in accepted]
        diagnostics = round_diagnostics(self.specs, [r.trained for r in used], result.weights, result.global_B)
        weights = {r.client_id: w for r, w in zip(used, result.weights, strict=True)}
        row: dict[str, Any] = {
            "round": round_index + 1,
            "method": self.strategy.name,
            "clients": selected,
            "dropped_clients": dropped,
            "learning_rate": args.round_learning_rate(round_index),
            "train_loss": float(sum(weights[r.client_id] * r.loss_mean for r in used)),
            "client_loss_first": {r.client_id: r.loss_first for r in records},
            "client_loss_last": {r.client_id: r.loss_last for r in records},
            "client_num_samples": {r.client_id: r.num_samples for r in records},
            **diagnostics.as_dict(),
            "uplink_bytes": int(sum(r.upload.nbytes for r in good)),
            "downlink_bytes": int(downlink),
            "backbone_version": self.server_state.backbone_version,
            "local_train_seconds": float(sum(r.timings.get("train_seconds", 0.0) for r in records)),
            "init_seconds": float(sum(r.timings.get("init_seconds", 0.0) for r in records)),
            "round_local_wall_seconds": local_seconds,
            "aggregation_seconds": aggregate_seconds,
        }
        row["inter_round_loss_jump"], row["inter_round_loss_jump_abs"] = self._mean_loss_jump(row)
        evaluate_now = (args.eval_every and (round_index + 1) % args.eval_every == 0) or round_index + 1 == args.num_rounds
        row.update({"eval_loss": None, "eval_accuracy": None, "eval_seconds": 0.0})
        if evaluate_now and self.eval_dataset is not None:
            tic = time.perf_counter()
            self._load_global_model()
            metrics = self.evaluate()
            row["eval_loss"] = metrics.get("eval_loss")
            row["eval_accuracy"] = metrics.get("eval_accuracy")
            row["eval_seconds"] = time.perf_counter() - tic
        self.history.append(row)
        if self.is_world_process_zero():
            with open(Path(args.output_dir) / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        self.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None})
        return row

    def _gather_scalar(self, value: float) -> list[float]:
        return gather_object([value]) if self._client_parallel else [value]

    def _mean_loss_jump(self, row: Mapping[str, Any]) -> tuple[float | None, float | None]:
        """Mean (signed, absolute) over this round's returning clients of the inter-round loss jump."""
        jumps = inter_round_loss_jumps(self.history, row)
        if not jumps:
            return None, None
        return float(np.mean(jumps)), float(np.mean(np.abs(jumps)))

    # ------------------------------------------------------------------ checkpoints

    def save_federated_checkpoint(self, completed_rounds: int) -> None:
        """Save the whole federated state (main process) after ``completed_rounds`` rounds."""
        backbone = peft_bridge.base_weights(self.model)  # on every process: gathers the weights under ZeRO-3
        if self.is_world_process_zero():
            save_checkpoint(
                self.args.output_dir,
                completed_rounds,
                self.server_state,
                self.client_states,
                backbone,
                {"method": self.strategy.name, "history": self.history, "num_clients": self.num_clients},
            )
        self.accelerator.wait_for_everyone()

    def _resume(self) -> None:
        path = latest_checkpoint(self.args.output_dir)
        if path is None:
            logger.warning("resume requested but %s has no checkpoint; starting from round 0", self.args.output_dir)
            return
        checkpoint = load_checkpoint(path)
        if checkpoint.meta.get("method") != self.strategy.name:
            raise ValueError(
                f"checkpoint {path} is a {checkpoint.meta.get('method')!r} run, this run is {self.strategy.name!r}"
            )
        if checkpoint.meta.get("num_clients") != self.num_clients:
            raise ValueError(f"checkpoint {path} has {checkpoint.meta.get('num_clients')} clients, this run {self.num_clients}")
        self.server_state = checkpoint.server_state
        self.client_states = checkpoint.client_states
        peft_bridge.set_base_weights(self.model, checkpoint.backbone)
        self.history = list(checkpoint.meta.get("history", []))
        self.start_round = checkpoint.round
        logger.info("resumed from %s at round %d", path, self.start_round)

    @staticmethod
    def _truncate_metrics(path: Path, keep_rounds: int) -> None:
        if not path.exists():
            return
        if keep_rounds == 0:
            path.unlink()
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["round"] <= keep_rounds]
        path.write_text("".join(line + "\n" for line in kept))
