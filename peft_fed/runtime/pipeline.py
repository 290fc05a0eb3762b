"""One federated run from flat settings: data, partition, model, PEFT config, trainer, export.

This is what ``peft-fed train`` and ``examples/fed_train.py`` run. A run's settings are the dataclasses of
:mod:`peft_fed.runtime.run_arguments` (model, data, LoRA, export) plus
:class:`~peft_fed.FederatedTrainingArguments` (every Trainer setting and the federation's), plus the method's
hyperparameters; :class:`FederatedRunConfig` bundles them. The same flat keys work as YAML keys, command-line
flags and keywords::

    run_federated(method="fedit", num_rounds=20, learning_rate=5e-4, output_dir="runs/fedit")
    run_federated(FederatedRunConfig.from_yaml("examples/configs/wordnet_mc_minilm.yaml", zeta=0.5))

With no settings it is the offline demo: the real all-MiniLM-L6-v2 encoder on the WordNet multiple-choice task,
10 clients, Dirichlet(0.3), FedSmoothLoRA.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .run_arguments import (
    ARGUMENT_GROUPS,
    DataArguments,
    ExportArguments,
    LoraArguments,
    ModelArguments,
    coerce_scalar,
    field_hints,
    hyperparameters_from_arguments,
    method_hyperparameters_class,
    split_settings,
)

logger = logging.getLogger(__name__)

DEFAULT_EXPORT_MAX_ERROR = 0.01


def _training_arguments(**kwargs):
    from .arguments import FederatedTrainingArguments

    return FederatedTrainingArguments(**kwargs)


@dataclass
class FederatedRunConfig:
    """Every setting of a federated run: the argument dataclasses of one run, as parsed from flags or YAML.

    ``training_args.method_kwargs`` holds the method's hyperparameters that were given (the others keep the
    method's defaults). Build one from flat settings with :meth:`from_dict` / :meth:`from_yaml`; :meth:`to_dict`
    gives them back flat, every setting included (what ``OUTPUT_DIR/run_config.json`` records).
    """

    model_args: ModelArguments = field(default_factory=ModelArguments)
    data_args: DataArguments = field(default_factory=DataArguments)
    lora_args: LoraArguments = field(default_factory=LoraArguments)
    export_args: ExportArguments = field(default_factory=ExportArguments)
    training_args: Any = field(default_factory=_training_arguments)  # FederatedTrainingArguments

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any], *, source: str = "settings") -> FederatedRunConfig:
        """Flat settings (the YAML keys, = the flag names) -> a run config; one-line ``ValueError`` naming the
        ``source`` for an unknown key or a bad value."""
        from .arguments import FederatedTrainingArguments

        if not isinstance(settings, Mapping):
            raise ValueError(f"{source}: settings must be a mapping of setting names to values, got {type(settings).__name__}")
        bad_keys = [key for key in settings if not isinstance(key, str)]
        if bad_keys:
            raise ValueError(f"{source}: setting names must be strings, got {bad_keys!r}")
        try:
            groups = split_settings(settings)
            training_hints = field_hints(FederatedTrainingArguments)
            unknown = sorted(set(groups["training"]) - set(training_hints))
            if unknown:
                raise ValueError(
                    f"unknown setting(s) {unknown} (not a run, method or TrainingArguments setting; "
                    "see peft-fed train --help)"
                )
            training = {k: coerce_scalar(k, v, training_hints[k]) for k, v in groups["training"].items()}
            parts = {name: ARGUMENT_GROUPS[name](**groups[name]) for name in ("model", "data", "lora", "export")}
            training_args = FederatedTrainingArguments(
                **groups["federation"], **training, method_kwargs=groups["hyperparameters"] or None
            )
        except (ValueError, TypeError) as error:
            raise ValueError(f"{source}: {error}") from None
        return cls(parts["model"], parts["data"], parts["lora"], parts["export"], training_args)

    @classmethod
    def from_dataclasses(cls, model_args, data_args, lora_args, export_args, hyperparameter_args, training_args):
        """A run config from the dataclasses ``HfArgumentParser`` returns, as in transformers' example scripts::

            parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, ExportArguments,
                                       method_hyperparameter_arguments(), FederatedTrainingArguments))
            config = FederatedRunConfig.from_dataclasses(*parser.parse_args_into_dataclasses())

        The hyperparameters set in ``hyperparameter_args`` (not ``None``) become ``training_args.method_kwargs``.
        """
        given = hyperparameters_from_arguments(training_args.method, hyperparameter_args)
        if given:
            training_args.method_kwargs = {**(training_args.method_kwargs or {}), **given}
        return cls(model_args, data_args, lora_args, export_args, training_args)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> FederatedRunConfig:
        """The settings of a YAML file, ``overrides`` on top."""
        return cls.from_dict({**read_settings_file(path), **overrides}, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Every setting, flat: the keys of a YAML run file, with the method's full hyperparameters."""
        out: dict[str, Any] = {}
        for part in (self.model_args, self.data_args, self.lora_args, self.export_args):
            out.update(dataclasses.asdict(part))
        training = self.training_args.to_dict()
        training.pop("method_kwargs", None)
        out.update(training)
        out.update(dataclasses.asdict(self.hyperparameters()))
        return out

    def hyperparameters(self):
        """The method's hyperparameters dataclass (given values, the method's defaults for the rest)."""
        cls = method_hyperparameters_class(self.training_args.method)
        return cls(**(self.training_args.method_kwargs or {}))


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """The settings mapping of a YAML (or JSON) run file; a one-line ``ValueError`` saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist" if not path.exists() else f"config {str(path)!r} is not a file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read it: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config must be a mapping of settings, got {type(data).__name__}")
    return data


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
    from ..tuners import peft_config_class

    lora = config.lora_args
    cls = peft_config_class(config.training_args.method)
    # a typed config (FedSmoothLoraConfig, SubspaceRegLoraConfig) saves the method's hyperparameters with the adapter
    hyperparameters = {} if cls is LoraConfig else dict(config.training_args.method_kwargs or {})
    return cls(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        use_rslora=lora.use_rslora,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        task_type=peft_task_type(task_type),
        **hyperparameters,
    )


def prepare_federated_data(config: FederatedRunConfig):
    """Load and partition the data of a run: ``(client_train, client_eval, eval, task, info)``, raw text."""
    from ..data import load_task_dataset, partition_dataset, split_clients

    data, seed = config.data_args, config.training_args.seed
    train, evaluation, info = load_task_dataset(
        data.dataset,
        config.model_args.task_type,
        seed=seed,
        max_train_samples=data.max_train_samples,
        max_eval_samples=data.max_eval_samples,
        **data.dataset_kwargs,
    )
    task = info.task_spec(max_length=data.max_length)
    column = data.partition_column
    if column is None:
        column = info.natural_id_column if task.is_multiple_choice and info.natural_id_column else info.label_column
    if data.num_clients == 1:  # one client holds every row, in the order of its source (a deployed client's own file)
        partitions = [train]
    else:
        partitions = partition_dataset(
            train,
            data.num_clients,
            data.partition,
            label_column=column,
            natural_id_column=info.natural_id_column if data.partition == "natural_id" else None,
            alpha=data.dirichlet_alpha,
            seed=seed,
        )
    client_train, client_eval = split_clients(partitions, data.client_eval_fraction, seed=seed)
    return client_train, client_eval, evaluation, task, info


@dataclass
class LoadedRun:
    """A run's model and data, ready for a trainer: what the simulation, a deployment's server and its nodes share."""

    config: FederatedRunConfig
    """The config with the task type the dataset resolved."""
    model: Any
    """The ``PeftModel`` (the method's typed PEFT config where it has one)."""
    tokenizer: Any
    task: Any
    client_train: list
    """The clients' training sets, tokenised (the partition of the run's dataset)."""
    evaluation: Any
    """The global evaluation set, tokenised."""

    def trainer_kwargs(self) -> dict[str, Any]:
        """The task's pieces a :class:`~peft_fed.FederatedTrainer` takes."""
        return {
            "task": self.task,
            "data_collator": self.task.collator(self.tokenizer),
            "processing_class": self.tokenizer,
            "preprocess_logits_for_metrics": self.task.preprocess_logits_for_metrics,
            "run_config": self.config.to_dict(),
        }


def load_run(config: FederatedRunConfig, *, tokenize_clients: bool = True, tokenize_eval: bool = True) -> LoadedRun:
    """Load and partition the data, load the model (its head seeded by the run's seed), add the adapter.

    ``tokenize_clients=False`` leaves the clients' sets raw (a deployed server never trains on them);
    ``tokenize_eval=False`` the evaluation set (a deployed client never evaluates)."""
    from peft import get_peft_model
    from transformers import set_seed

    from ..modeling import (
        check_target_modules,
        default_modules_to_save,
        default_target_modules,
        load_initial_adapter,
        load_model_and_tokenizer,
    )

    client_train, _, evaluation, task, info = prepare_federated_data(config)
    task_type = info.task_type
    config = dataclasses.replace(config, model_args=dataclasses.replace(config.model_args, task_type=task_type))
    set_seed(config.training_args.seed)  # the task head is initialised at load time: make it the same on every run
    model_args = config.model_args
    model, tokenizer = load_model_and_tokenizer(
        model_args.model, task_type, num_labels=info.num_labels, label_names=info.label_names
    )
    if model_args.init_adapter:
        model = load_initial_adapter(model, model_args.init_adapter)
    target_modules = config.lora_args.target_modules or default_target_modules(model)
    check_target_modules(model, target_modules)
    modules_to_save = default_modules_to_save(model, task_type)
    peft_model = get_peft_model(model, _peft_config(config, task_type, target_modules, modules_to_save))
    if tokenize_clients:
        client_train = task.preprocess_partitions(client_train, tokenizer)
    if tokenize_eval:
        evaluation = task.preprocess(evaluation, tokenizer, name="eval")
    return LoadedRun(config, peft_model, tokenizer, task, client_train, evaluation)


def run_federated(config: FederatedRunConfig | Mapping[str, Any] | None = None, /, **settings: Any) -> RunResult:
    """Run one federated training; write metrics, a plot and ``OUTPUT_DIR/final``.

    ``config`` is a :class:`FederatedRunConfig` or flat settings (YAML keys); keyword ``settings`` are flat
    settings on top of the defaults (or of a mapping ``config``): ``run_federated(method="fedit", num_rounds=2)``.
    """
    from .checkpoint import check_output_dir

    if not isinstance(config, FederatedRunConfig):
        config = FederatedRunConfig.from_dict({**(config or {}), **settings})
    elif settings:
        raise TypeError("give a FederatedRunConfig or flat settings, not both")
    started = time.perf_counter()
    args = config.training_args
    # refuse a new run into a folder holding one before anything loads; the trainer checks again (and for a resume,
    # against the checkpoint) and writes run_config.json only once its checks pass: nothing of an existing run is
    # written or deleted before that
    check_output_dir(args.output_dir, resume=args.resume, overwrite=getattr(args, "overwrite_output_dir", False))

    from .trainer import FederatedTrainer

    run = load_run(config)
    trainer = FederatedTrainer(
        model=run.model,
        args=args,
        client_datasets=run.client_train,
        eval_dataset=run.evaluation,
        **run.trainer_kwargs(),
    )
    return train_and_export(trainer, run, started)


def train_and_export(trainer, run: LoadedRun, started: float | None = None) -> RunResult:
    """Play every round of ``trainer`` (its folder checked first), then export ``OUTPUT_DIR/final`` and the plot."""
    from .. import peft_bridge

    started = time.perf_counter() if started is None else started
    output_dir = Path(trainer.args.output_dir)
    trainer.prepare_output_dir()  # the folder checks (and the resume's), then run_config.json: before any round
    history = trainer.train()
    final_dir = output_dir / "final"
    report = None
    # under ZeRO-3 the export reads sharded weights: gather them on every process, write on the main one
    with peft_bridge.full_parameters(trainer.model):
        if trainer.is_world_process_zero():
            report = _export_final(trainer, run.config, history, final_dir, run.tokenizer)
    return RunResult(history, output_dir, final_dir, report, time.perf_counter() - started)


def _export_final(trainer, config: FederatedRunConfig, history, final_dir: Path, tokenizer):
    """Write ``final_dir`` (stock PEFT adapter + model card) and the convergence plot; the export report."""
    from ..export import FederatedRunInfo, export_adapter
    from ..modeling import MODEL_ALIASES
    from ..plotting import plot_runs

    data, args, model_args, export = config.data_args, config.training_args, config.model_args, config.export_args
    partition = data.partition + (f" (alpha={data.dirichlet_alpha})" if data.partition == "dirichlet" else "")
    run_info = FederatedRunInfo(
        method=trainer.strategy.name,
        rounds=args.num_rounds,
        num_clients=data.num_clients,
        clients_per_round=trainer.clients_per_round,
        seed=args.seed,
        base_model=MODEL_ALIASES[model_args.model].hub_id if model_args.model in MODEL_ALIASES else model_args.model,
        initial_adapter=model_args.init_adapter,
        dataset=data.dataset,
        training_rank=config.lora_args.r,
        extra={
            "partition": partition,
            "local_steps": args.local_steps,
            "local_epochs": args.local_epochs,
            "final_eval_accuracy": history[-1].get("eval_accuracy"),
            **trainer.strategy.model_card_facts(len(history)),  # e.g. the privacy guarantee of a DP run
        },
    )
    # A merged backbone accumulates up to rounds x r directions: by default pick the smallest rank that
    # reproduces the federated model within 1% (exact rank r for methods that never merge).
    max_error = export.export_max_error
    if export.export_rank is None and max_error is None:
        max_error = DEFAULT_EXPORT_MAX_ERROR
    report = export_adapter(
        trainer.model,
        trainer.original_weights,
        final_dir,
        rank=export.export_rank,
        max_relative_error=max_error,
        run_info=run_info,
        tokenizer=tokenizer,
        overwrite=True,
    )
    output_dir = Path(args.output_dir)
    plot_runs([output_dir], output_dir / "convergence.png", title=f"{trainer.strategy.name} on {data.dataset}")
    return report


def format_round_table(history: list[dict[str, Any]]) -> str:
    """A fixed-width table of the per-round metrics people look at first."""
    header = f"{'round':>5} {'train_loss':>10} {'eval_loss':>9} {'eval_acc':>8} {'overlap':>7} {'loss_jump':>9} {'up_kB':>8} {'down_kB':>8} {'secs':>6}"
    lines = [header, "-" * len(header)]

    def num(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) else "-".rjust(int(fmt.split(".")[0]))

    for row in history:
        seconds = row.get("round_local_wall_seconds", 0) + row.get("aggregation_seconds", 0) + row.get("eval_seconds", 0)
        lines.append(
            f"{row['round']:>5} {num(row.get('train_loss'), '10.4f')} {num(row.get('eval_loss'), '9.4f')} "
            f"{num(row.get('eval_accuracy'), '8.4f')} {num(row.get('basis_overlap'), '7.4f')} "
            f"{num(row.get('inter_round_loss_jump'), '9.4f')} {row['uplink_bytes'] / 1e3:8.1f} "
            f"{row['downlink_bytes'] / 1e3:8.1f} {seconds:6.1f}"
        )
    return "\n".join(lines)
