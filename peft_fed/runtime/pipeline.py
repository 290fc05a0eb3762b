"""One federated run from a flat configuration: data, partition, model, PEFT config, trainer, export.

This is what ``peft-fed train`` and ``examples/fed_train.py`` run. The defaults are the offline demo:
the real all-MiniLM-L6-v2 encoder on the WordNet multiple-choice task, 10 clients, Dirichlet(0.3),
FedSmoothLoRA.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

logger = logging.getLogger(__name__)

DEFAULT_EXPORT_MAX_ERROR = 0.01
# FederatedTrainingArguments fields that FederatedRunConfig fills from its own keys (not via training_kwargs).
_TRAINING_ARGUMENTS_SET_BY_RUN_CONFIG = frozenset(
    {"output_dir", "method", "num_rounds", "clients_per_round", "local_steps", "local_epochs", "learning_rate",
     "round_lr_scheduler", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "eval_every",
     "save_every", "resume", "method_kwargs", "bf16", "use_cpu", "deepspeed", "report_to", "remove_unused_columns"}
)  # fmt: skip


@dataclass
class FederatedRunConfig:
    """Every setting of a federated run; a YAML file given to ``--config`` holds any subset of these keys."""

    model: str = field(default="all-MiniLM-L6-v2", metadata={"help": "Model alias, Hub id, local folder or GGUF."})
    dataset: str = field(default="wordnet_mc", metadata={"help": "Registered dataset name or local data file."})
    task_type: str | None = field(
        default=None, metadata={"help": "seq_cls, mc_encoder, mc_causal, causal_lm or image_cls."}
    )
    method: str = field(default="fedsmoothlora", metadata={"help": "Federated method."})
    num_clients: int = 10
    clients_per_round: int | None = 3
    num_rounds: int = 10
    local_steps: int | None = field(default=8, metadata={"help": "Optimizer steps per client per round."})
    local_epochs: float | None = field(
        default=None, metadata={"help": "Passes over its data per client per round; when set, replaces local_steps."}
    )
    partition: str = field(default="dirichlet", metadata={"help": "iid, dirichlet, pathological, shard, natural_id, size."})
    partition_column: str | None = field(
        default=None,
        metadata={"help": "Column the label-skew partitions follow (default: the label for classification, "
                  "the natural id, e.g. activity_label, for multiple choice)."},
    )
    dirichlet_alpha: float = 0.3
    seed: int = 42
    output_dir: str = "runs/default"
    resume: bool = False
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    use_rslora: bool = False
    target_modules: list[str] | None = None
    learning_rate: float = 1e-3
    round_lr_scheduler: str = "constant"
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 48
    max_train_samples: int | None = None
    max_eval_samples: int | None = 200
    client_eval_fraction: float = 0.1
    eval_every: int = 1
    save_every: int = 0
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    export_rank: int | None = field(default=None, metadata={"help": "Rank of the exported final adapter."})
    export_max_error: float | None = field(
        default=None,
        metadata={"help": "Export at the smallest rank with relative error below this (default 0.01 "
                  "when export_rank is not given)."},
    )
    init_adapter: str | None = field(default=None, metadata={"help": "Start from an existing adapter (path or Hub id)."})
    bf16: bool = False
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even where a GPU is visible."})
    gradient_checkpointing: bool = False
    deepspeed: str | None = None
    report_to: str = "none"
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    training_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Further FederatedTrainingArguments / TrainingArguments settings, e.g. "
                  '{"optim": "sgd", "optim_args": "momentum=0.9", "round_lr_min_ratio": 0.0}.'},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.local_epochs is not None:
            self.local_steps = None
        elif self.local_steps is None:
            raise ValueError("give local_steps or local_epochs")
        owned = sorted(set(self.training_kwargs) & _TRAINING_ARGUMENTS_SET_BY_RUN_CONFIG)
        if owned:
            raise ValueError(f"training_kwargs {owned} are run settings: set them as top-level keys instead")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> FederatedRunConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a run config must be a mapping of settings, got {type(data).__name__}")
        return cls.from_dict({**data, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FederatedRunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown run setting(s) {unknown}; known settings: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    history: list[dict[str, Any]]
    output_dir: Path
    final_dir: Path | None
    export_report: Any
    seconds: float


def _peft_config(config: FederatedRunConfig, task_type: str, target_modules, modules_to_save):
    from peft import LoraConfig

    from ..modeling import peft_task_type
    from ..strategies import canonical_method_name
    from ..tuners import FedSmoothLoraConfig, SubspaceRegLoraConfig

    method = canonical_method_name(config.method)
    cls = {"fedsmoothlora": FedSmoothLoraConfig, "subspace_reg": SubspaceRegLoraConfig}.get(method, LoraConfig)
    kwargs: dict[str, Any] = dict(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        task_type=peft_task_type(task_type),
    )
    if cls is not LoraConfig:
        # method hyperparameters that the PEFT config declares live in the config (saved with the adapter)
        names = {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(LoraConfig)}
        kwargs.update({k: v for k, v in config.method_kwargs.items() if k in names})
    return cls(**kwargs)


def prepare_federated_data(config: FederatedRunConfig):
    """Load and partition the data of a run: ``(client_train, client_eval, eval, task, info)``, raw text."""
    from ..data import load_task_dataset, partition_dataset, split_clients

    train, evaluation, info = load_task_dataset(
        config.dataset,
        config.task_type,
        seed=config.seed,
        max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples,
        **config.dataset_kwargs,
    )
    task = info.task_spec(max_length=config.max_length)
    column = config.partition_column
    if column is None:
        column = info.natural_id_column if task.is_multiple_choice and info.natural_id_column else info.label_column
    partitions = partition_dataset(
        train,
        config.num_clients,
        config.partition,
        label_column=column,
        natural_id_column=info.natural_id_column if config.partition == "natural_id" else None,
        alpha=config.dirichlet_alpha,
        seed=config.seed,
    )
    client_train, client_eval = split_clients(partitions, config.client_eval_fraction, seed=config.seed)
    return client_train, client_eval, evaluation, task, info


def run_federated(config: FederatedRunConfig) -> RunResult:
    """Run one federated training from ``config``; write metrics, a plot and ``OUTPUT_DIR/final``."""
    from peft import get_peft_model
    from transformers import set_seed

    from .. import peft_bridge
    from ..export import load_initial_adapter
    from ..modeling import (
        check_target_modules,
        default_modules_to_save,
        default_target_modules,
        load_model_and_tokenizer,
    )
    from .arguments import FederatedTrainingArguments
    from .trainer import FederatedTrainer

    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    client_train, _, evaluation, task, info = prepare_federated_data(config)
    task_type = info.task_type
    config = dataclasses.replace(config, task_type=task_type)
    (output_dir / "run_config.json").write_text(json.dumps(config.to_dict(), indent=1))
    set_seed(config.seed)  # the task head is initialised at load time: make it the same on every run
    model, tokenizer = load_model_and_tokenizer(
        config.model, task_type, num_labels=info.num_labels, label_names=info.label_names
    )
    if config.init_adapter:
        model = load_initial_adapter(model, config.init_adapter)
    target_modules = config.target_modules or default_target_modules(model)
    check_target_modules(model, target_modules)
    modules_to_save = default_modules_to_save(model, task_type)
    peft_model = get_peft_model(model, _peft_config(config, task_type, target_modules, modules_to_save))
    client_train = [task.preprocess(d, tokenizer, name=f"client {i}") for i, d in enumerate(client_train)]
    evaluation = task.preprocess(evaluation, tokenizer, name="eval")

    peft_config_fields = {f.name for f in dataclasses.fields(type(peft_model.peft_config["default"]))}
    method_kwargs = {k: v for k, v in config.method_kwargs.items() if k not in peft_config_fields}
    args = FederatedTrainingArguments(
        output_dir=str(output_dir),
        method=config.method,
        num_rounds=config.num_rounds,
        clients_per_round=config.clients_per_round,
        local_steps=config.local_steps,
        local_epochs=config.local_epochs,
        learning_rate=config.learning_rate,
        round_lr_scheduler=config.round_lr_scheduler,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        seed=config.seed,
        eval_every=config.eval_every,
        save_every=config.save_every,
        resume=config.resume,
        method_kwargs=method_kwargs or None,
        bf16=config.bf16,
        use_cpu=config.use_cpu,
        deepspeed=config.deepspeed,
        report_to=config.report_to,
        # passed only when asked for: transformers 5 warns on the (still working) old name
        **({"gradient_checkpointing": True} if config.gradient_checkpointing else {}),
        remove_unused_columns=False,
        **{
            "lr_scheduler_type": "constant",
            "per_device_eval_batch_size": max(config.batch_size, 32),
            "dataloader_num_workers": 0,
            "dataloader_pin_memory": torch.cuda.is_available(),
            **config.training_kwargs,
        },
    )
    trainer = FederatedTrainer(
        model=peft_model,
        args=args,
        client_datasets=client_train,
        eval_dataset=evaluation,
        task=task,
        data_collator=task.collator(tokenizer),
        processing_class=tokenizer,
        preprocess_logits_for_metrics=task.preprocess_logits_for_metrics,
    )
    history = trainer.train()
    final_dir = output_dir / "final"
    report = None
    # under ZeRO-3 the export reads sharded weights: gather them on every process, write on the main one
    with peft_bridge.full_parameters(trainer.model):
        if trainer.is_world_process_zero():
            report = _export_final(trainer, config, history, final_dir, tokenizer)
    return RunResult(history, output_dir, final_dir, report, time.perf_counter() - started)


def _export_final(trainer, config: FederatedRunConfig, history, final_dir: Path, tokenizer):
    """Write ``final_dir`` (stock PEFT adapter + model card) and the convergence plot; the export report."""
    from ..export import FederatedRunInfo, export_adapter
    from ..modeling import MODEL_ALIASES
    from ..plotting import plot_runs

    partition = config.partition + (f" (alpha={config.dirichlet_alpha})" if config.partition == "dirichlet" else "")
    run_info = FederatedRunInfo(
        method=trainer.strategy.name,
        rounds=config.num_rounds,
        num_clients=config.num_clients,
        clients_per_round=trainer.clients_per_round,
        seed=config.seed,
        base_model=MODEL_ALIASES[config.model].hub_id if config.model in MODEL_ALIASES else config.model,
        initial_adapter=config.init_adapter,
        dataset=config.dataset,
        training_rank=config.r,
        extra={
            "partition": partition,
            "local_steps": config.local_steps,
            "local_epochs": config.local_epochs,
            "final_eval_accuracy": history[-1].get("eval_accuracy"),
        },
    )
    # A merged backbone accumulates up to rounds x r directions: by default pick the smallest rank that
    # reproduces the federated model within 1% (exact rank r for methods that never merge).
    max_error = config.export_max_error
    if config.export_rank is None and max_error is None:
        max_error = DEFAULT_EXPORT_MAX_ERROR
    report = export_adapter(
        trainer.model,
        trainer.original_weights,
        final_dir,
        rank=config.export_rank,
        max_relative_error=max_error,
        run_info=run_info,
        tokenizer=tokenizer,
        overwrite=True,
    )
    output_dir = Path(config.output_dir)
    plot_runs([output_dir], output_dir / "convergence.png", title=f"{trainer.strategy.name} on {config.dataset}")
    return report


def format_round_table(history: list[dict[str, Any]]) -> str:
    """A fixed-width table of the per-round metrics people look at first."""
    header = f"{'round':>5} {'train_loss':>10} {'eval_loss':>9} {'eval_acc':>8} {'overlap':>7} {'loss_jump':>9} {'up_kB':>8} {'down_kB':>8} {'secs':>6}"
    lines = [header, "-" * len(header)]

    def num(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    for row in history:
        seconds = row.get("round_local_wall_seconds", 0) + row.get("aggregation_seconds", 0) + row.get("eval_seconds", 0)
        lines.append(
            f"{row['round']:>5} {num(row.get('train_loss'), '10.4f')} {num(row.get('eval_loss'), '9.4f')} "
            f"{num(row.get('eval_accuracy'), '8.4f')} {num(row.get('basis_overlap'), '7.4f')} "
            f"{num(row.get('inter_round_loss_jump'), '9.4f')} {row['uplink_bytes'] / 1e3:8.1f} "
            f"{row['downlink_bytes'] / 1e3:8.1f} {seconds:6.1f}"
        )
    return "\n".join(lines)
