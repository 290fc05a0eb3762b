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

In one process, ``parallel_mode="batched"`` trains the round's clients together, one forward/backward through
the shared backbone per step with per-client factors (``runtime/batched.py``; what it supports and refuses is in
``docs/performance.md``); it falls back to one client after another, with a log line, where it cannot apply.
A Flower deployment's server passes its own executor instead (``client_executor``, ``peft_fed/flower/``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, broadcast_object_list, gather_object, send_to_device
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Trainer, TrainerState
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import IntervalStrategy, set_seed

from .. import peft_bridge
from ..engine import ClientExecutor, ClientRecord, ClientTask, RoundEngine, RoundHooks, client_seed
from ..linalg import LowRank
from ..state import ClientState, LayerSpec, ServerState
from ..strategies import Strategy, build_strategy, canonical_method_name
from .arguments import FederatedTrainingArguments
from .checkpoint import (
    RUN_FINGERPRINT_FILE,
    OutputDirInUseError,
    ResumeMismatchError,
    check_output_dir,
    checkpoint_dir,
    clean_stale_files,
    digest_dataset,
    digest_tensors,
    fingerprint_differences,
    jsonable,
    latest_checkpoint,
    load_checkpoint,
    package_versions,
    remove_run_files,
    save_checkpoint,
    structure_differences,
    write_text_atomic,
)
from .client import run_client

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Trainer settings for per-step work inside a client's few local steps; the engine does it per round.
_PER_ROUND_SETTINGS = {
    "save_strategy": "save_every (federated checkpoints of the whole state)",
    "logging_strategy": "one log per round to report_to, at step = round",
    "eval_strategy": "eval_every (the global model, between rounds)",
}
# TrainingArguments fields that change what a client's local training computes (part of the run's fingerprint; the
# federation's own and the method's hyperparameters are added by FederatedTrainer.run_record)
_RESULT_TRAINING_FIELDS = (
    "seed", "data_seed", "full_determinism", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "optim", "optim_args", "optim_target_modules", "lr_scheduler_type",
    "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "bf16", "fp16", "tf32", "label_smoothing_factor", "dataloader_drop_last",
    "group_by_length", "neftune_noise_alpha", "torch_compile",
    # client-level differential privacy: another guarantee is another run
    "dp_clip", "dp_noise_multiplier", "dp_target_epsilon", "dp_delta",
)  # fmt: skip
# settings of a whole run (pipeline.FederatedRunConfig.to_dict()) that change the result: model, data, partition, LoRA
_RESULT_RUN_SETTINGS = (
    "model", "task_type", "init_adapter", "dataset", "dataset_kwargs", "num_clients", "partition", "partition_column",
    "dirichlet_alpha", "max_train_samples", "max_eval_samples", "client_eval_fraction", "max_length", "r",
    "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
)  # fmt: skip
# recorded with a run but free to change on resume: they do not change the rounds' results
_FREE_SETTINGS = (
    "num_rounds", "eval_every", "save_every", "save_total_limit", "output_dir", "report_to", "run_name",
    "logging_dir", "disable_tqdm", "log_level", "per_device_eval_batch_size", "parallel_mode", "export_rank",
    "export_max_error",
)  # fmt: skip
# fingerprint entries computed from the model and data (they follow from the settings above when those differ)
_DERIVED_FINGERPRINT = ("adapted_layers", "trainable_heads", "initial_weights", "client_data", "eval_data")


def build_run_strategy(
    args: FederatedTrainingArguments,
    specs: Mapping[str, LayerSpec],
    *,
    num_clients: int,
    clients_per_round: int,
    hyperparameter_source: Any = None,
) -> Strategy:
    """The run's strategy on ``specs``: ``args.method`` with its hyperparameters (from ``hyperparameter_source``,
    e.g. the model's typed PEFT config, overridden by ``args.method_kwargs``), wrapped in client-level DP for a
    federation of ``num_clients`` sampling ``clients_per_round`` when ``args.dp_clip`` is set."""
    strategy = build_strategy(
        canonical_method_name(args.method),
        specs,
        hyperparameter_source=hyperparameter_source,
        overrides=args.method_kwargs,
        seed=args.seed,
        invalid_upload=args.invalid_upload,
        num_rounds=args.num_rounds,
    )
    privacy = args.differential_privacy()
    if privacy is None:
        return strategy
    from ..privacy import ClientLevelDPStrategy

    return ClientLevelDPStrategy(
        strategy, privacy, num_clients=num_clients, clients_per_round=clients_per_round, num_rounds=args.num_rounds
    )


def resolve_clients_per_round(args: FederatedTrainingArguments, num_clients: int) -> int:
    """How many of ``num_clients`` clients a round samples: ``clients_per_round``, else ``client_fraction`` of them,
    else all."""
    if args.clients_per_round is not None:
        if args.clients_per_round > num_clients:
            raise ValueError(
                f"clients_per_round={args.clients_per_round} is more than the {num_clients} clients "
                "(set clients_per_round=None to train every client each round)"
            )
        return args.clients_per_round
    if args.client_fraction is not None:
        return max(1, round(args.client_fraction * num_clients))
    return num_clients


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
        client_executor: who trains the clients (an :class:`~peft_fed.engine.ClientExecutor`): ``None`` for this
            trainer itself (the simulation); a Flower deployment's server passes its
            :class:`~peft_fed.flower.FlowerClientExecutor`, and then ``client_datasets`` may be ``None``.
        num_clients: the number of clients when ``client_datasets`` is ``None``.
        client_data_digests: what identifies each client's data in the run's fingerprint when this process does not
            hold it (the digests the deployed clients reported).
        run_config: optional flat settings of the whole run (``FederatedRunConfig.to_dict()``: model, data,
            partition, LoRA...): written to ``OUTPUT_DIR/run_config.json`` once the output folder is checked, and
            their result-changing ones join the run's fingerprint.

    A run folder records what made it (``OUTPUT_DIR/run_fingerprint.json`` and every checkpoint's ``meta.json``):
    a fingerprint of every setting that changes the result, the other settings and the package versions. A new
    run into a folder that already holds one is refused (:class:`OutputDirInUseError`) unless
    ``overwrite_output_dir``; a resume whose fingerprint differs from the checkpoint's is refused
    (:class:`ResumeMismatchError`, one line listing ``setting: checkpoint -> this run``).

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
        client_datasets: Sequence[Any] | None,
        eval_dataset: Any = None,
        task: Any = None,
        strategy: Strategy | None = None,
        run_config: Mapping[str, Any] | None = None,
        *,
        client_executor: ClientExecutor | None = None,
        num_clients: int | None = None,
        client_data_digests: Sequence[str] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if not isinstance(args, FederatedTrainingArguments):
            raise TypeError("FederatedTrainer needs FederatedTrainingArguments")
        if client_datasets is None:
            if client_executor is None or num_clients is None or num_clients < 1:
                raise ValueError("without client_datasets, give the client_executor that trains them and num_clients")
        elif not client_datasets:
            raise ValueError("FederatedTrainer needs at least one client dataset")
        empty = [i for i, d in enumerate(client_datasets or ()) if len(d) == 0]
        if empty:
            raise ValueError(
                f"client(s) {empty[:10]} have no training samples; re-partition (e.g. a larger Dirichlet alpha "
                "or min_partition_size) or drop those clients"
            )
        self.specs = peft_bridge.layer_specs(model)
        self.client_datasets = list(client_datasets or ())
        self.num_clients = num_clients if client_datasets is None else len(self.client_datasets)
        self.client_data_digests = list(client_data_digests) if client_data_digests is not None else None
        self.clients_per_round = self._resolve_clients_per_round(args)
        self.task = task
        if task is not None and trainer_kwargs.get("compute_metrics") is None and hasattr(task, "compute_metrics"):
            trainer_kwargs["compute_metrics"] = task.compute_metrics
        self.strategy = strategy or self._build_strategy(model, args)
        self.gradient_batches = self.strategy.gradient_batches() if self.strategy.needs_gradient else 0
        self.extra_names = peft_bridge.trainable_extra_names(model)
        self.original_weights = peft_bridge.base_weights(model)
        self.run_config = dict(run_config) if run_config is not None else None
        # what the run starts from: the adapted layers' weights and the trainable heads (e.g. a seeded classifier)
        self._initial_digest = digest_tensors(
            {**self.original_weights, **{f"extra|{k}": v for k, v in peft_bridge.get_extras(model, self.extra_names).items()}}
        )
        self._base_learning_rate = args.learning_rate
        self._prepared_dir: str | None = None  # the output_dir whose checks this trainer passed
        self._output_dir_ready = False  # prepare_output_dir() ran for the next train()
        self._record: dict[str, Any] | None = None  # run_record() of the current train()
        self._current_start = None
        self._step_losses: list[float] = []
        self._in_rounds = False
        first_dataset = self.client_datasets[0] if self.client_datasets else None
        super().__init__(model=model, args=args, train_dataset=first_dataset, eval_dataset=eval_dataset, **trainer_kwargs)
        # A PEFT model's forward takes **kwargs, so the Trainer would assume the loss is already normalised over all
        # micro-batches (num_items_in_batch) and skip its 1/gradient_accumulation_steps; the models', the tasks' and
        # Subspace-Reg's losses are per-micro-batch means: without this, accumulation over k micro-batches sums
        # them, a k-times larger gradient (tests/strategies/test_official_subspace_reg.py)
        self.model_accepts_loss_kwargs = False
        self._take_over_per_step_settings()
        # We draw our own bars over rounds and clients (both follow disable_tqdm); the Trainer's per-client bar
        # and printed logs would repeat for every client of every round.
        self.remove_callback(ProgressCallback)
        self.remove_callback(PrinterCallback)
        self.parallel_mode = self._resolve_parallel_mode()
        if self.is_zero3_enabled and self.strategy.has_client_loss:
            raise NotImplementedError(
                f"{self.strategy.name!r} adds a loss term on the live LoRA factors, which DeepSpeed ZeRO-3 cannot "
                "provide (its partitioned parameters cannot be gathered with gradients outside their module's "
                "forward pass); use ZeRO stage 1 or 2, or train without DeepSpeed"
            )
        self.engine = RoundEngine(
            self.strategy,
            client_executor or self,
            num_clients=self.num_clients,
            clients_per_round=self.clients_per_round,
            seed=args.seed,
            invalid_upload=args.invalid_upload,
            client_state_memory_budget=(
                None if args.client_state_memory_budget_mib is None else int(args.client_state_memory_budget_mib * 2**20)
            ),
            client_state_dir=Path(args.output_dir) / "client_states" if args.client_state_memory_budget_mib is not None else None,
        )
        self.engine.initialize(
            extras=peft_bridge.get_extras(model, self.extra_names), base_weights=self.original_weights
        )
        # One TrainerState for the whole run: each client's Trainer.train() makes its own, but report_to
        # integrations must see one log per round at step = round.
        self.run_state = TrainerState(max_steps=args.num_rounds)
        if args.resume:
            if self.is_world_process_zero():
                clean_stale_files(args.output_dir)  # e.g. put back a round whose re-save was killed
            self.accelerator.wait_for_everyone()
            self._resume(latest_checkpoint(args.output_dir), required=False)

    # ------------------------------------------------------------------ federated state (held by the engine)

    @property
    def server_state(self) -> ServerState:
        return self.engine.server_state

    @property
    def client_states(self) -> Mapping[str, ClientState]:
        return self.engine.client_states

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.engine.history

    @property
    def start_round(self) -> int:
        return self.engine.completed_rounds

    # ------------------------------------------------------------------ setup

    def _resolve_clients_per_round(self, args: FederatedTrainingArguments) -> int:
        return resolve_clients_per_round(args, self.num_clients)

    def federation_size(self) -> tuple[int, int]:
        """``(N, m)``: the federation's clients and how many a round samples, what the privacy accountant counts. A
        process that trains only part of the federation (a deployment's node) gives the whole federation's."""
        return self.num_clients, self.clients_per_round

    def _build_strategy(self, model: torch.nn.Module, args: FederatedTrainingArguments) -> Strategy:
        """``args.method`` with the hyperparameters of the model's typed PEFT config, overridden by
        ``args.method_kwargs``; wrapped in client-level DP when ``args.dp_clip`` is set."""
        name = canonical_method_name(args.method)
        peft_config = getattr(model, "peft_config", {}).get("default")
        config_method = getattr(peft_config, "federated_method", None)
        if config_method is not None and config_method != name:
            raise ValueError(
                f"the model's PEFT config is for {config_method!r} but args.method is {name!r}; "
                "use a plain LoraConfig for other methods or set method to match"
            )
        num_clients, clients_per_round = self.federation_size()
        return build_run_strategy(
            args, self.specs, num_clients=num_clients, clients_per_round=clients_per_round,
            hyperparameter_source=peft_config if config_method == name else None,
        )  # fmt: skip

    def _take_over_per_step_settings(self) -> None:
        """Saving, logging and evaluation happen per round (the engine), not per step inside a client's
        local training; a user who asked for per-step ones is told, once, what replaces them."""
        for name, replacement in _PER_ROUND_SETTINGS.items():
            value = getattr(self.args, name)
            if str(getattr(value, "value", value)) != IntervalStrategy.NO.value:
                warnings.warn(
                    f"{name}={getattr(value, 'value', value)!r} cannot apply inside a client's local steps; "
                    f"federated runs use {replacement}",
                    stacklevel=3,
                )
            setattr(self.args, name, IntervalStrategy.NO)

    def _resolve_parallel_mode(self) -> str:
        mode = self.args.parallel_mode
        self._batched_executor = None
        if mode == "batched":
            from .batched import BatchedClientExecutor, batched_refusal

            reason = batched_refusal(self)
            if reason is None:
                self._batched_executor = BatchedClientExecutor(self)
                return mode
            logger.warning("parallel_mode='batched' falls back to training the clients one after another: %s", reason)
            mode = "auto"
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
            if self.strategy.has_client_loss:
                extra = self.strategy.client_loss(peft_bridge.live_factors(self.model), self._current_start)
                if extra is not None:
                    loss = loss + extra.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

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
        """In client-parallel mode, make Accelerate treat this process as alone while it trains a client.

        Both the distributed type and the process count: ``prepare_data_loader`` shards a data loader's batches
        across ``num_processes`` whatever the distributed type, so with the count left at N each process would
        train its client on 1/N of the client's batches (in another order), and a run would depend on how many
        processes it had."""
        if not self._client_parallel:
            yield
            return
        state = self.accelerator.state
        saved = state.distributed_type, state.num_processes, self.args.average_tokens_across_devices
        try:
            state.distributed_type = DistributedType.NO  # no DDP wrapper, no gradient all-reduce
            state.num_processes = 1  # the client's whole data loader, unsharded
            self.args.average_tokens_across_devices = False
            yield
        finally:
            state.distributed_type, state.num_processes, self.args.average_tokens_across_devices = saved

    # ------------------------------------------------------------------ federated loop

    def sample_clients(self, round_index: int) -> list[str]:
        """The clients of round ``round_index``: a seeded draw without replacement, sorted."""
        return self.engine.sample_clients(round_index)

    def _gradient_batches(self, dataset, seed: int) -> Callable[[], list[Mapping[str, torch.Tensor]]]:
        # In data-parallel mode every process computes the same estimate on the global batch (per-device batch
        # x processes), so it does not depend on how many processes share the client's training.
        batch_size = self._train_batch_size
        if self.parallel_mode == "data":
            batch_size *= self.accelerator.num_processes
        # the method says whether a client with fewer batches repeats its data or uses what it has once
        repeat_small_client = self.strategy.repeats_small_client_data()

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
            while len(out) < self.gradient_batches:  # a pass per loop: more than one only when cycling
                for batch in loader:
                    out.append(self._prepare_inputs(batch))
                    if len(out) == self.gradient_batches:
                        break
                if not repeat_small_client:
                    break
            return out

        return batches

    def _task_loss(self, model, batch) -> torch.Tensor:
        if self._uses_task_loss:
            return self.task.compute_loss(model, batch)[0]
        return model(**batch).loss

    # ------------------------------------------------------------------ the engine's client executor

    def train_clients(self, round_index: int, tasks: Sequence[ClientTask]) -> list[ClientRecord]:
        """Train this process's share of the round's clients with the Trainer's loop, one after another; in
        client-parallel mode the records of every process are gathered, so every process sees them all (the trained
        factors only the main process: :meth:`_gather_records`); in batched mode all of them together
        (``runtime/batched.py``)."""
        if self._batched_executor is not None:
            return self._batched_executor.train_clients(round_index, tasks)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = tasks[rank::world] if self._client_parallel else tasks
        progress = tqdm(
            mine,
            desc=f"round {round_index + 1} clients",
            leave=False,
            disable=not self.is_world_process_zero() or bool(self.args.disable_tqdm),
        )
        records = [self._train_one_client(round_index, task) for task in progress]
        if not self._client_parallel:
            return records
        return self._gather_records(records)

    def _gather_records(self, records: list[ClientRecord]) -> list[ClientRecord]:
        """Every process's records on every process, without the clients' trained factors except on the main one.

        Each process aggregates the round itself, from the uploads, client states and losses, which all of them get.
        The full trained factors (as large as an upload, and not what FedSmoothLoRA or FFA-LoRA upload) feed only the
        round's diagnostics, which only the main process writes (``metrics.jsonl``, ``report_to``, checkpoints): they
        go to it alone, and the other processes' rows have no diagnostics, as a deployment's have none."""
        light = [replace(record, trained=None) for record in records]
        everyone = [record for chunk in gather_object([light]) for record in chunk]
        mine = {record.client_id: record.trained for record in records if record.trained is not None}
        parts = [None] * self.accelerator.num_processes if self.accelerator.is_main_process else None
        torch.distributed.gather_object(mine, parts, dst=0)
        if parts is None:
            return everyone
        trained = {client_id: factors for part in parts for client_id, factors in part.items()}
        return [replace(record, trained=trained.get(record.client_id)) for record in everyone]

    def apply_backbone_update(self, update: Mapping[str, LowRank]) -> None:
        peft_bridge.add_to_base_weights(self.model, update)

    def client_dataset(self, client_id: str) -> Any:
        """The training data of client ``client_id`` (a deployed node's trainer holds only its own)."""
        return self.client_datasets[int(client_id)]

    def _train_one_client(self, round_index: int, task: ClientTask) -> ClientRecord:
        dataset = self.client_dataset(task.client_id)
        seed = client_seed(self.args.seed, round_index, task.client_id)
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

        return run_client(
            self.model,
            self.strategy,
            task,
            train=local_train,
            step_losses=lambda _: self._step_losses,
            num_samples=len(dataset),
            gradient_batches=self._gradient_batches(dataset, seed) if self.strategy.needs_gradient else None,
            loss_fn=self._task_loss,
            extra_names=self.extra_names,
            accumulation=self.args.gradient_accumulation_steps,
            raise_on_failure=self.args.invalid_upload == "raise",
        )

    def _load_global_model(self) -> None:
        """Put the global model's factors and heads into the adapter (for evaluation and export)."""
        peft_bridge.set_factors(self.model, self.engine.global_factors())
        if self.server_state.extras:
            peft_bridge.set_extras(self.model, self.server_state.extras)

    # ------------------------------------------------------------------ the run

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Outside the rounds, as the Trainer does. During them, each client's ``Trainer.train`` and the round's
        evaluation would log at their own step counters; the round logs once instead (see ``_RoundHooks``)."""
        if not self._in_rounds:
            super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run every federated round; returns the per-round metrics (also in ``OUTPUT_DIR/metrics.jsonl``).

        ``resume_from_checkpoint``: a checkpoint folder (``OUTPUT_DIR/checkpoints/round-XXXXXX``) or ``True`` for
        the latest under ``output_dir``, as in ``Trainer.train``; ``args.resume`` does the latter at construction.
        First the output folder is checked and the run's record written (:meth:`prepare_output_dir`): a new run
        into a folder that holds a run is refused unless ``overwrite_output_dir``.
        """
        args = self.args
        if resume_from_checkpoint:
            if self.is_world_process_zero():
                clean_stale_files(args.output_dir)
            path = latest_checkpoint(args.output_dir) if resume_from_checkpoint is True else Path(resume_from_checkpoint)
            self._resume(path, required=True)
        self._base_learning_rate = args.learning_rate
        if resume_from_checkpoint or not self._output_dir_ready:
            self.prepare_output_dir(resuming=bool(resume_from_checkpoint) or None)
        self._output_dir_ready = False
        # Trainer.train() (once per client round) starts with Accelerate's free_memory(), a full gc.collect()
        # that walks every object of the process: half a second per client here. Freezing what exists now
        # (model, datasets, tokenizer: alive for the whole run anyway) keeps later collections cheap.
        gc.freeze()
        self._in_rounds = True
        try:
            self.engine.run(
                args.num_rounds,
                _RoundHooks(self),
                show_progress=self.is_world_process_zero() and not args.disable_tqdm,
            )
        finally:
            self._in_rounds = False
            self.state = self.run_state
            gc.unfreeze()
        self._load_global_model()
        return self.history

    # ------------------------------------------------------------------ checkpoints

    def save_federated_checkpoint(self, completed_rounds: int) -> None:
        """Save the whole federated state (main process) after ``completed_rounds`` rounds; keeps the last
        ``save_total_limit`` checkpoints when that is set."""
        backbone = peft_bridge.base_weights(self.model)  # on every process: gathers the weights under ZeRO-3
        if self.is_world_process_zero():
            save_checkpoint(
                self.args.output_dir,
                completed_rounds,
                self.server_state,
                self.client_states,
                backbone,
                {"method": self.strategy.name, "history": self.history, "num_clients": self.num_clients,
                 **(self._record or self.run_record())},
                keep_last=self.args.save_total_limit,
            )  # fmt: skip
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ what made the run

    def _length_dependence(self) -> str | None:
        """Why the rounds' results depend on ``num_rounds`` (a schedule over the run's length), or ``None``."""
        if self.args.round_lr_scheduler != "constant":
            return f"round_lr_scheduler={self.args.round_lr_scheduler!r}"
        return self.strategy.follows_run_length()

    def run_record(self) -> dict[str, Any]:
        """What made this run: ``fingerprint`` (every setting that changes the result: method and its full
        hyperparameters, seed, learning rate and local training, federation, the adapted layers, the initial
        weights, the clients' data, and with ``run_config`` the model, data, partition and LoRA settings),
        ``settings`` (recorded, free to change on resume: num_rounds, eval_every, save_every, ...) and
        ``versions``."""
        args = self.args
        fingerprint: dict[str, Any] = {"method": self.strategy.name}
        fingerprint.update(dataclasses.asdict(self.strategy.hyperparameters))
        for name in _RESULT_TRAINING_FIELDS:
            if hasattr(args, name):
                fingerprint[name] = getattr(args, name)
        fingerprint["learning_rate"] = self._base_learning_rate
        fingerprint.update(
            num_clients=self.num_clients,
            clients_per_round=self.clients_per_round,
            local_steps=args.local_steps,
            local_epochs=args.local_epochs,
            round_lr_scheduler=args.round_lr_scheduler,
            round_lr_min_ratio=args.round_lr_min_ratio,
            invalid_upload=args.invalid_upload,
            adapted_layers=_describe_layers(self.specs),
            trainable_heads=sorted(self.extra_names),
            initial_weights=self._initial_digest,
            # a deployment's clients hold their data: the server records what they reported but cannot vouch for it
            client_data=(
                [digest_dataset(d) for d in self.client_datasets]
                if self.client_data_digests is None
                else "held by the deployed clients"
            ),
            eval_data=digest_dataset(self.eval_dataset) if self.eval_dataset is not None else None,
        )
        settings: dict[str, Any] = {name: getattr(args, name) for name in _FREE_SETTINGS if hasattr(args, name)}
        settings["num_processes"] = self.accelerator.num_processes
        if self.client_data_digests is not None:
            settings["client_data"] = self.client_data_digests
        if self._length_dependence() is not None:
            fingerprint["num_rounds"] = settings.pop("num_rounds")
        if self.run_config is not None:
            for name in _RESULT_RUN_SETTINGS:
                if name in self.run_config:
                    fingerprint[name] = self.run_config[name]
            for name in ("export_rank", "export_max_error"):
                if name in self.run_config:
                    settings[name] = self.run_config[name]
        return {"fingerprint": jsonable(fingerprint), "settings": jsonable(settings), "versions": package_versions()}

    def _refuse_mismatch(self, where: str, recorded: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        differences = fingerprint_differences(recorded, record["fingerprint"])
        if differences:
            why = self._length_dependence()
            differences = [f"{d} ({why} follows the run's length)" if d.startswith("num_rounds:") else d for d in differences]
            direct = [d for d in differences if d.split(":", 1)[0] not in _DERIVED_FINGERPRINT]
            if direct and len(direct) < len(differences):  # the derived ones by name only: the settings explain them
                derived = [d.split(":", 1)[0] for d in differences if d.split(":", 1)[0] in _DERIVED_FINGERPRINT]
                differences = [*direct, f"hence also {', '.join(derived)}"]
            raise ResumeMismatchError(
                f"cannot resume {where}: settings that change the result differ (checkpoint -> this run): "
                f"{'; '.join(differences)}. Resume with the checkpoint's settings, or start a new run in another "
                "output_dir (or with --overwrite_output_dir)"
            )

    def prepare_output_dir(self, resuming: bool | None = None) -> None:
        """Check ``output_dir`` and write the run's record there; ``train()`` does it first unless it was done.

        A new run into a folder holding a run is refused (:class:`OutputDirInUseError`) unless
        ``overwrite_output_dir`` (then the old run's files are removed); a resume (``args.resume``, or a further
        ``train()`` of this trainer) must match the folder's ``run_fingerprint.json``. Then ``run_fingerprint.json``,
        ``run_config.json`` (given ``run_config``) and ``metrics.jsonl`` (the restored history) are written. Nothing
        is written or deleted before the checks pass; the main process decides and every process raises the same
        error. ``run_federated`` calls it before ``train()``, so a refusal comes before any round."""
        if resuming is None:
            resuming = bool(self.args.resume) or self._prepared_dir == str(self.args.output_dir)
        self._prepare_output_dir(resuming)
        self._output_dir_ready = True

    def _prepare_output_dir(self, resuming: bool) -> None:
        args, out = self.args, Path(self.args.output_dir)
        record = self._record = self.run_record()
        error: Exception | None = None
        if self.is_world_process_zero():
            try:
                if resuming:
                    previous = out / RUN_FINGERPRINT_FILE
                    if previous.is_file():
                        recorded = json.loads(previous.read_text()).get("fingerprint", {})
                        self._refuse_mismatch(f"in {str(out)!r} (its {RUN_FINGERPRINT_FILE})", recorded, record)
                else:
                    check_output_dir(out, resume=False, overwrite=bool(getattr(args, "overwrite_output_dir", False)))
            except (OutputDirInUseError, ResumeMismatchError, ValueError) as caught:
                error = caught
        if self.accelerator.num_processes > 1:
            box = [error]
            broadcast_object_list(box)
            error = box[0]
        if error is not None:
            raise error
        self._prepared_dir = str(args.output_dir)
        if not self.is_world_process_zero():
            return
        if not resuming:
            removed = remove_run_files(out)
            if removed:
                logger.warning("overwrite_output_dir: removed the previous run's %s from %s", ", ".join(removed), out)
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_files(out)
        document = {**record, "completed_rounds_at_start": self.start_round}
        previous_path = out / RUN_FINGERPRINT_FILE
        if resuming and previous_path.is_file():
            previous = json.loads(previous_path.read_text())
            changed = fingerprint_differences(previous.get("settings", {}), record["settings"])
            document["resumes"] = [*previous.get("resumes", []), {"at_round": self.start_round, "changed": changed}]
            if changed:
                logger.info("resuming with changed settings (they do not change the result): %s", "; ".join(changed))
        write_text_atomic(previous_path, json.dumps(document, indent=1))
        if self.run_config is not None:
            write_text_atomic(out / "run_config.json", json.dumps(self.run_config, indent=1, default=str))
        self._write_metrics()

    def _write_metrics(self) -> None:
        """``metrics.jsonl`` = the history, rewritten atomically: a crash leaves the old file or the new one, never a
        partial line; on resume it is rebuilt from the checkpoint's history, never parsed."""
        text = "".join(json.dumps(row, default=str) + "\n" for row in self.history)
        write_text_atomic(Path(self.args.output_dir) / METRICS_FILE, text)

    def _resume(self, path: Path | None, *, required: bool) -> None:
        if path is None or not Path(path).is_dir():
            where = path if path is not None else f"{self.args.output_dir}/checkpoints"
            if required:
                raise ValueError(f"no federated checkpoint at {where}")
            logger.warning("resume requested but %s has no checkpoint; starting from round 0", where)
            return
        checkpoint = load_checkpoint(path)
        if checkpoint.meta.get("method") != self.strategy.name:
            raise ResumeMismatchError(
                f"checkpoint {path} is a {checkpoint.meta.get('method')!r} run, this run is {self.strategy.name!r}"
            )
        if checkpoint.meta.get("num_clients") != self.num_clients:
            raise ResumeMismatchError(
                f"checkpoint {path} has {checkpoint.meta.get('num_clients')} clients, this run {self.num_clients}"
            )
        if "fingerprint" in checkpoint.meta:
            self._refuse_mismatch(f"from checkpoint {path}", checkpoint.meta["fingerprint"], self.run_record())
        else:
            logger.warning(
                "checkpoint %s was written before runs recorded their settings: whether this run's settings match "
                "it cannot be checked", path,
            )  # fmt: skip
        if self.args.num_rounds < checkpoint.round:
            earlier = checkpoint_dir(Path(path).parent.parent, self.args.num_rounds)
            hint = f", or resume from {earlier}" if earlier.is_dir() else ""
            raise ResumeMismatchError(
                f"checkpoint {path} has {checkpoint.round} completed rounds but num_rounds={self.args.num_rounds}: a "
                f"run cannot be shortened; give num_rounds >= {checkpoint.round}{hint}"
            )
        recorded_versions = checkpoint.meta.get("versions")
        if recorded_versions:
            changed = fingerprint_differences(recorded_versions, package_versions())
            if changed:
                logger.warning("checkpoint %s was written with other package versions (%s): a resumed run may differ "
                               "in the last bits from an uninterrupted one", path, "; ".join(changed))  # fmt: skip
        problem = structure_differences(path, checkpoint, self.original_weights, self.server_state)
        if problem:
            raise ResumeMismatchError(problem)
        self.engine.restore(checkpoint.server_state, checkpoint.client_states, checkpoint.meta.get("history", []))
        peft_bridge.set_base_weights(self.model, checkpoint.backbone)
        self.run_state.global_step = checkpoint.round
        logger.info("resumed from %s at round %d", path, checkpoint.round)


def _describe_layers(specs: Mapping[str, Any]) -> str:
    """The adapted layers in one comparable line: count, ranks, scales and a digest of names and shapes."""
    import hashlib

    shapes = "|".join(f"{n}:{s.out_features}x{s.in_features}:r{s.rank}:{s.scale:.6g}" for n, s in sorted(specs.items()))
    ranks = sorted({s.rank for s in specs.values()})
    return f"{len(specs)} layers, rank {'/'.join(map(str, ranks))}, sha256:{hashlib.sha256(shapes.encode()).hexdigest()[:12]}"


class _RoundHooks(RoundHooks):
    """The Trainer's side of each round: learning rate and evaluation in the row, metrics.jsonl and one
    ``report_to`` log per round at ``step = round``, checkpoints every ``save_every`` rounds."""

    def __init__(self, trainer: FederatedTrainer) -> None:
        self.trainer = trainer

    def round_metrics(self, round_index: int) -> dict[str, Any]:
        trainer, args = self.trainer, self.trainer.args
        row: dict[str, Any] = {
            "learning_rate": args.round_learning_rate(round_index),
            "eval_loss": None,
            "eval_accuracy": None,
            "eval_seconds": 0.0,
        }
        due = (args.eval_every and (round_index + 1) % args.eval_every == 0) or round_index + 1 == args.num_rounds
        if due and trainer.eval_dataset is not None:
            tic = time.perf_counter()
            trainer._load_global_model()
            metrics = trainer.evaluate()
            row.update(
                eval_loss=metrics.get("eval_loss"),
                eval_accuracy=metrics.get("eval_accuracy"),
                eval_seconds=time.perf_counter() - tic,
            )
        return row

    def record(self, row: Mapping[str, Any]) -> None:
        trainer = self.trainer
        if trainer.is_world_process_zero():
            trainer._write_metrics()  # the history (this row included), atomically
        trainer.state = trainer.run_state
        trainer.run_state.global_step = row["round"]
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        Trainer.log(trainer, numbers)

    def checkpoint(self, completed_rounds: int) -> None:
        save_every = self.trainer.args.save_every
        if save_every and completed_rounds % save_every == 0:
            self.trainer.save_federated_checkpoint(completed_rounds)
