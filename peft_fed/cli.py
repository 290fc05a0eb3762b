"""The ``peft-fed`` command: ``train``, ``compare``, ``deploy``, ``export``, ``plot`` and ``unmix``.

    peft-fed train                                   # the offline default run
    peft-fed deploy --num_nodes 3                    # the same on a local Flower deployment (TLS, node auth)
    peft-fed train --config examples/configs/wordnet_mc_minilm.yaml --method fedit --num_rounds 20
    peft-fed train --method subspace_reg --mu 0.1 --clip_norm 25 --learning_rate 5e-4 --optim sgd
    peft-fed compare --methods fedit fedsmoothlora --seeds 42 43 --output_dir runs/compare
    peft-fed export --run_dir runs/default --max_error 0.01 --output_dir runs/default/export-r
    peft-fed plot runs/fedit runs/fedsmoothlora --output convergence.png
    peft-fed unmix --data path/to/samson --method gauss --output_dir runs/unmix

The flags of ``train`` and ``compare`` are the fields of the run's argument dataclasses, as in transformers'
example scripts: :mod:`peft_fed.runtime.run_arguments` (model, data, LoRA, federation, export), the method's
hyperparameters (``--zeta``, ``--mu``...: the fields of ``peft_fed.strategies.method_hyperparameters``) and
every ``transformers.TrainingArguments`` field (``--learning_rate``, ``--per_device_train_batch_size``,
``--optim``, ``--bf16``...) through :class:`~peft_fed.FederatedTrainingArguments`. A YAML file given to
``--config`` uses the same keys; flags override it.

Parsing happens in two steps so that ``--help`` and mistakes answer in a moment: the run's own settings and
the hyperparameters are parsed and validated without transformers (torch only, for the method registry); the
remaining ``TrainingArguments`` flags go to ``HfArgumentParser`` once transformers is imported. Every error
the command line can detect before a model loads is one ``error: ...`` line on stderr and exit status 2; so is a
``ValueError``/``OSError`` that the user's input causes later, while the run sets up its data, model, adapter
and folders or exports (a Hub id that cannot be loaded, a truncated adapter file...): ``--log_level debug``
shows its traceback. Anything raised inside the training loop, and any other exception, keeps its traceback.
YAML values are type-checked as flags are (:mod:`peft_fed.runtime.run_arguments` lists the rules).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__

LOG_LEVELS = ("debug", "info", "warning", "error", "critical", "passive")
# keys of the fast parser's namespace that are not run settings
_COMMAND_KEYS = frozenset({"command", "handler", "config", "methods", "seeds", "help_training"})
# ``deploy``'s own flags (the deployment, not the run)
_DEPLOY_KEYS = frozenset({"num_nodes", "deployment_dir", "insecure", "run_timeout"})
_TRAINING_EPILOG = (
    "Every transformers.TrainingArguments field is a flag too (the local training of each client), e.g. "
    "--learning_rate 5e-4 --per_device_train_batch_size 16 --gradient_accumulation_steps 2 --optim sgd "
    "--optim_args momentum=0.9 --weight_decay 0.01 --seed 1 --output_dir runs/x --bf16 --gradient_checkpointing "
    "--deepspeed ds.json --report_to tensorboard; --help_training lists them all (slower: loads transformers). "
    "Defaults: those of peft_fed.FederatedTrainingArguments (learning_rate 1e-3, batch 8, eval batch 32, constant "
    "local schedule, output_dir runs/default, seed 42)."
)


class CliError(Exception):
    """A mistake in the command line: printed as one ``error:`` line, exit status 2."""


@contextlib.contextmanager
def settings_errors():
    """Turn the ``ValueError`` of a settings check into a :class:`CliError` (one line, exit 2); errors of the
    training itself keep their traceback."""
    try:
        yield
    except ValueError as error:
        raise CliError(str(error).splitlines()[0] if str(error) else repr(error)) from None


# Errors of a run that a user's input causes (a model, dataset, adapter or folder that is missing or unreadable, a
# setting the data or model contradicts): one line unless --log_level debug. Raised inside the training loop
# (FederatedTrainer.train) they are failures of the training itself and keep their traceback.
_USER_INPUT_ERRORS = (ValueError, OSError)
_DEBUG_HINT = " (--log_level debug shows the traceback)"


def _one_line(error: BaseException) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return text or type(error).__name__


def _raised_in_training(error: BaseException) -> bool:
    trainer = sys.modules.get("peft_fed.runtime.trainer")
    train = getattr(getattr(trainer, "FederatedTrainer", None), "train", None)
    code = getattr(train, "__code__", None)
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


@contextlib.contextmanager
def run_errors(log_level: str = "passive"):
    """Around a run: a ``ValueError``/``OSError`` caused by the user's input (raised while the data, model,
    adapter or output folder are set up, or by the export) becomes a :class:`CliError` (one line, exit 2);
    with ``--log_level debug``, and for anything raised inside the training loop, the traceback stays."""
    try:
        yield
    except _USER_INPUT_ERRORS as error:
        if log_level == "debug" or _raised_in_training(error):
            raise
        raise CliError(_one_line(error) + _DEBUG_HINT) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message and exits; we want one line
        raise CliError(message)


# ---------------------------------------------------------------------------------------------- run flags


def _flag_kwargs(hint: Any) -> dict[str, Any]:
    """argparse keywords for a field of type ``hint``; values stay strings (``coerce`` converts them, for flags
    and YAML alike), Literal fields get ``choices``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kwargs = _flag_kwargs(args[0]) if len(args) == 1 else {}
        if "choices" in kwargs:
            kwargs["choices"] = [*kwargs["choices"], "none"]
        return kwargs
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(hint))}
    if hint is bool:
        return {"nargs": "?", "const": "true", "metavar": "{true,false}"}
    if origin is list or hint is list:
        return {"nargs": "+"}
    if origin is dict or hint is dict:
        return {"metavar": "JSON"}
    return {}


def _default_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The run's flags, one per field of the run's argument dataclasses and per method hyperparameter.

    Unset flags stay out of the namespace (``argparse.SUPPRESS``), so a YAML value survives unless a flag is
    given. ``TrainingArguments`` flags are left for :func:`parse_training_flags`.
    """
    import dataclasses

    from .runtime.run_arguments import (
        ARGUMENT_GROUPS,
        PYTHON_ONLY_SETTINGS,
        field_hints,
        method_hyperparameter_arguments,
        method_hyperparameter_fields,
    )
    from .strategies import STRATEGIES
    from .strategies.registry import ALIASES

    parser.add_argument("--config", help="YAML file of settings (the keys are these flags' names); flags override it.")
    parser.add_argument("--log_level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                        help="Log level of peft_fed, transformers and datasets (default: passive = warnings).")
    parser.add_argument("--help_training", action=_TrainingHelp, nargs=0,
                        help="List every TrainingArguments flag (loads transformers) and exit.")
    # the Python API's spelling of the hyperparameters: accepted here only to be refused with a clear message
    parser.add_argument("--method_kwargs", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    titles = {"model": "model", "data": "data and partition", "lora": "LoRA", "federation": "federation",
              "export": "export of OUTPUT_DIR/final"}  # fmt: skip
    for group_name, cls in ARGUMENT_GROUPS.items():
        group = parser.add_argument_group(titles[group_name])
        hints = field_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in PYTHON_ONLY_SETTINGS:
                continue
            kwargs = _flag_kwargs(hints[f.name])
            if f.name == "method":
                kwargs["choices"] = [*STRATEGIES, *sorted(ALIASES)]
                kwargs["metavar"] = "METHOD"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            help_text = f.metadata.get("help", "")
            if f.name == "method":
                help_text += f" One of {', '.join(STRATEGIES)} (aliases: {', '.join(f'{a}={c}' for a, c in sorted(ALIASES.items()))})."
            if "default" not in help_text.lower():
                help_text += f" (default: {_default_text(default)})"
            group.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=help_text, **kwargs)
    hyper = parser.add_argument_group(
        "method hyperparameters", "Each is taken by the methods in brackets; giving one the method does not take is an error."
    )
    union = method_hyperparameter_fields()  # the methods' own types (the union dataclass makes each Optional)
    for f in dataclasses.fields(method_hyperparameter_arguments()):
        hyper.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=f.metadata["help"],
                           **_flag_kwargs(union[f.name].hint))  # fmt: skip


class _TrainingHelp(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(_training_parser().format_help())
        parser.exit()


def _training_parser():
    """``HfArgumentParser`` over :class:`FederatedTrainingArguments`, defaults suppressed (only given flags)."""
    from transformers import HfArgumentParser

    from .runtime.arguments import FederatedTrainingArguments

    parser = HfArgumentParser(FederatedTrainingArguments, prog="peft-fed train (TrainingArguments flags)",
                              allow_abbrev=False)  # fmt: skip

    def error(message: str):
        raise CliError(message)

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return parser


def parse_training_flags(argv: Sequence[str]) -> dict[str, Any]:
    """The ``TrainingArguments`` flags among ``argv`` (what the run parser left), as settings."""
    if not argv:
        return {}
    return vars(_training_parser().parse_args(list(argv)))


def run_settings(args: argparse.Namespace, rest: Sequence[str] = (), methods: Sequence[str] | None = None) -> dict[str, Any]:
    """The flat settings of a run: the ``--config`` file, then the flags on top; checked (hyperparameters
    against ``methods``, values by the argument dataclasses) without loading transformers. ``ValueError``."""
    from .runtime.pipeline import read_settings_file
    from .runtime.run_arguments import ARGUMENT_GROUPS, split_settings

    settings: dict[str, Any] = {}
    labels: dict[str, str] = {}
    with settings_errors():
        if getattr(args, "config", None):
            settings.update(read_settings_file(args.config))
            labels.update({k: f"{k} (in {args.config})" for k in settings})
        flags = {k: v for k, v in vars(args).items() if k not in _COMMAND_KEYS | _DEPLOY_KEYS | _deployment_keys(args)}
        settings.update(flags)
        labels.update({k: f"--{k}" for k in flags})
        groups = split_settings(settings, list(methods) if methods else None, labels=labels)
        for name, cls in ARGUMENT_GROUPS.items():
            cls(**groups[name])  # the dataclasses' checks (numbers, choices, files)
    if rest:
        settings.update(parse_training_flags(rest))
    return settings


def run_config_from_args(args: argparse.Namespace, rest: Sequence[str] = (), **overrides: Any):
    """The :class:`FederatedRunConfig` of parsed ``train`` flags (``overrides``: flat settings on top)."""
    return _run_config({**run_settings(args, rest), **overrides}, args)


def _run_config(settings: dict[str, Any], args: argparse.Namespace):
    from .runtime.pipeline import FederatedRunConfig

    with settings_errors():
        return FederatedRunConfig.from_dict(settings, source=getattr(args, "config", None) or "settings")


def configure_logging(log_level: str = "passive") -> None:
    """Show ``logger.info`` lines of peft_fed (and transformers, datasets) at ``log_level``, as transformers'
    example scripts do; ``passive`` leaves the libraries at their defaults (warnings). Replicas of a
    multi-process run log warnings only."""
    level = logging.WARNING if log_level == "passive" else getattr(logging, log_level.upper())
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) != 0:
        level = max(level, logging.WARNING)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stderr)])  # fmt: skip
    logging.getLogger("peft_fed").setLevel(level)
    if log_level != "passive":
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity(level)
        datasets.utils.logging.set_verbosity(level)


def _log_level(settings: dict[str, Any]) -> str:
    level = settings.get("log_level", "passive")
    if level not in LOG_LEVELS:
        raise CliError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level


def _train(args: argparse.Namespace, rest: Sequence[str]) -> int:
    settings = run_settings(args, rest)
    log_level = _log_level(settings)
    configure_logging(log_level)
    config = _run_config(settings, args)
    from .runtime.pipeline import format_round_table, run_federated

    with run_errors(log_level):
        result = run_federated(config)
    if _is_main_process():
        print(format_round_table(result.history))
        last = result.history[-1]
        print(f"\n{config.training_args.method}: final eval accuracy {last.get('eval_accuracy')}, "
              f"eval loss {last.get('eval_loss')}, {result.seconds:.0f} s")
        print(f"metrics: {result.output_dir / 'metrics.jsonl'}; plot: {result.output_dir / 'convergence.png'}; "
              f"adapter: {result.final_dir}")
        if result.export_report is not None:
            print(f"exported at rank {result.export_report.rank}, relative error {result.export_report.relative_error:.3g}")
    return 0


def _deployment_keys(args: argparse.Namespace) -> frozenset[str]:
    if getattr(args, "command", None) != "deploy":
        return frozenset()
    from .flower.settings import deployment_field_names

    return frozenset(deployment_field_names())


def _deploy(args: argparse.Namespace, rest: Sequence[str]) -> int:
    """A local Flower deployment on loopback (a SuperLink, ``--num_nodes`` SuperNodes, TLS and node authentication)
    running one federated training; every process is stopped at the end."""
    import yaml

    settings = run_settings(args, rest)
    log_level = _log_level(settings)
    folder = Path(args.deployment_dir).absolute()
    settings.setdefault("num_clients", args.num_nodes)
    if settings["num_clients"] != args.num_nodes:
        raise CliError(f"a local deployment runs one node per client: --num_clients {settings['num_clients']} "
                       f"needs --num_nodes {settings['num_clients']}")  # fmt: skip
    # the default run samples 3 clients a round: never more than the nodes started
    settings.setdefault("clients_per_round", min(3, args.num_nodes))
    if settings["clients_per_round"] is not None and int(settings["clients_per_round"]) > args.num_nodes:
        raise CliError(f"--clients_per_round {settings['clients_per_round']} is more than the {args.num_nodes} nodes")
    settings.setdefault("output_dir", str(folder / "server"))
    settings["output_dir"] = str(Path(settings["output_dir"]).absolute())
    config = _run_config(dict(settings), args)  # every setting checked before a process starts
    from .flower.settings import DeploymentArguments, deployment_field_names

    deployment = {k: v for k, v in vars(args).items() if k in deployment_field_names()}
    with settings_errors():
        deployment_arguments = DeploymentArguments(**deployment)
    try:
        from .flower.local import APP_DIR, DeploymentError, LocalDeployment
        from .flower.secure import secure_aggregation_refusal_of_run
    except ImportError as error:
        raise CliError(f"peft-fed deploy needs {error.name or error}: pip install 'peft-fed[flower]'") from None
    if deployment_arguments.secure_aggregation:
        with settings_errors():
            refusal = secure_aggregation_refusal_of_run(config, deployment_arguments)
        if refusal is not None:
            raise CliError(f"secure aggregation refused: {refusal}")
    from .runtime.checkpoint import check_output_dir

    with settings_errors():
        check_output_dir(settings["output_dir"], resume=bool(settings.get("resume")),
                         overwrite=bool(settings.get("overwrite_output_dir")))  # fmt: skip
    configure_logging("info" if log_level == "passive" else log_level)  # after the checks: their errors stay one line
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text(yaml.safe_dump(settings))
    tls = not args.insecure
    with LocalDeployment(folder / "flower", args.num_nodes, tls=tls, node_auth=tls) as running:
        print(f"SuperLink on 127.0.0.1:{running.port} ({'TLS, SuperNode authentication' if tls else 'INSECURE'}), "
              f"{args.num_nodes} SuperNodes; logs in {running.folder / 'logs'}", file=sys.stderr)  # fmt: skip
        try:
            run_id = running.run(APP_DIR, {"config": str(folder / "run.yaml"), **deployment}, timeout=args.run_timeout)
        except DeploymentError as error:
            raise CliError(f"{str(error).splitlines()[0]} (every process's log: {running.folder / 'logs'})") from None
    from .runtime.pipeline import format_round_table

    metrics = Path(settings["output_dir"]) / "metrics.jsonl"
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    print(format_round_table(history))
    print(f"\nrun {run_id} finished: metrics {metrics}; adapter {Path(settings['output_dir']) / 'final'}")
    return 0


def _certificates(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .flower.local import make_certificates, make_node_key

    if args.days < 1:
        raise CliError(f"--days must be >= 1, got {args.days}")
    out = Path(args.output_dir)
    if (out / "ca.crt").exists():
        raise CliError(f"{out} already holds certificates: give another --output_dir (keys are never overwritten)")
    made = make_certificates(out, args.hosts, days=args.days)
    print(f"CA: {made.ca_certificate} (give it to every SuperNode and flwr CLI)\n"
          f"SuperLink: --ssl-ca-certfile {made.ca_certificate} --ssl-certfile {made.server_certificate} "
          f"--ssl-keyfile {made.server_key}")  # fmt: skip
    for name in args.node_keys:
        private, public = make_node_key(out / "node-keys", name)
        print(f"node {name}: flwr supernode register {public} CONNECTION; "
              f"flower-supernode --auth-supernode-private-key {private} (keep {private} on that node only)")  # fmt: skip
    return 0


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def summarize_run(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Best/final accuracy, final loss, overlap, mean loss jump, bytes and time per round of one run."""
    accuracies = [r["eval_accuracy"] for r in history if r.get("eval_accuracy") is not None]
    from .engine.rounds import inter_round_loss_jumps

    # recomputed from the per-client losses, so runs written before the absolute form existed summarise too
    jumps = [j for i, row in enumerate(history) for j in inter_round_loss_jumps(history[:i], row)]
    overlaps = [r["basis_overlap"] for r in history if r.get("basis_overlap") is not None]

    def mean(values):
        return sum(values) / len(values) if values else None

    return {
        "best_accuracy": max(accuracies) if accuracies else None,
        "final_accuracy": accuracies[-1] if accuracies else None,
        "final_eval_loss": next((r["eval_loss"] for r in reversed(history) if r.get("eval_loss") is not None), None),
        "basis_overlap": mean(overlaps),
        "mean_loss_jump": mean(jumps),
        "mean_abs_loss_jump": mean([abs(j) for j in jumps]),
        "uplink_bytes_per_round": mean([r["uplink_bytes"] for r in history]),
        "downlink_bytes_per_round": mean([r["downlink_bytes"] for r in history]),
        "seconds_per_round": mean(
            [r.get("round_local_wall_seconds", 0) + r.get("aggregation_seconds", 0) + r.get("eval_seconds", 0) for r in history]
        ),
        "accuracy_curve": accuracies,
    }


def _compare_configs(args: argparse.Namespace, settings: dict[str, Any], root: Path, config_cls) -> dict:
    """One run config per (method, seed), each method with the given hyperparameters it takes."""
    from .runtime.run_arguments import hyperparameters_for, method_hyperparameter_fields

    hyper_names = set(method_hyperparameter_fields())
    common = {k: v for k, v in settings.items() if k not in hyper_names}
    given_hyper = {k: v for k, v in settings.items() if k in hyper_names}
    return {
        (method, seed): config_cls.from_dict(
            {**common, **hyperparameters_for(method, given_hyper), "method": method, "seed": seed,
             "output_dir": str(root / method / f"seed-{seed}")},
            source=args.config or "settings",
        )
        for method in args.methods
        for seed in args.seeds
    }  # fmt: skip


def _compare(args: argparse.Namespace, rest: Sequence[str]) -> int:
    settings = run_settings(args, rest, methods=args.methods)
    log_level = _log_level(settings)
    configure_logging(log_level)
    from .plotting import plot_runs
    from .runtime.pipeline import FederatedRunConfig, run_federated

    root = Path(settings.get("output_dir", "runs/compare"))
    with settings_errors():
        configs = _compare_configs(args, settings, root, FederatedRunConfig)
    results: dict[str, dict[str, Any]] = {}
    run_dirs: list[Path] = []
    for (method, seed), config in configs.items():
        with run_errors(log_level):
            result = run_federated(config)
        results.setdefault(method, {})[str(seed)] = summarize_run(result.history)
        run_dirs.append(Path(config.training_args.output_dir))
    if not _is_main_process():
        return 0
    (root / "comparison.json").write_text(json.dumps(results, indent=1))
    table = comparison_table(results)
    (root / "comparison.md").write_text(table + "\n")
    print(table)
    plot_runs(run_dirs, root / "comparison.png", title="peft-fed compare")
    print(f"\nwrote {root / 'comparison.json'}, {root / 'comparison.md'} and {root / 'comparison.png'}")
    return 0


def comparison_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown table: mean ± sd over seeds per method."""
    import statistics

    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    keys = ("best_accuracy", "final_accuracy", "final_eval_loss", "basis_overlap", "mean_loss_jump", "mean_abs_loss_jump")
    lines = ["| method | seeds | " + " | ".join(keys) + " | uplink kB/round | s/round |",
             "|---" * (len(keys) + 4) + "|"]
    for method, by_seed in results.items():
        runs = list(by_seed.values())
        cells = [stat([r[k] for r in runs]) for k in keys]
        up = stat([r["uplink_bytes_per_round"] / 1e3 for r in runs])
        sec = stat([r["seconds_per_round"] for r in runs])
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + f" | {up} | {sec} |")
    return "\n".join(lines)


def _read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(run_config.json, final/adapter_config.json)`` of a finished run; ``CliError`` saying what is missing."""
    if not run_dir.is_dir():
        raise CliError(f"--run_dir {str(run_dir)!r} is not a folder (give the output_dir of a finished peft-fed train)")
    documents = []
    for path, what in ((run_dir / "run_config.json", "its settings"), (run_dir / "final" / "adapter_config.json", "no adapter")):
        if not path.is_file():
            raise CliError(f"{path} does not exist ({what}): is {run_dir} a finished peft-fed run?")
        try:
            documents.append(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CliError(f"{path} is not valid JSON: {error}") from None
    missing = sorted({"model", "task_type", "method", "num_rounds", "num_clients", "seed", "dataset"} - set(documents[0]))
    if missing:
        raise CliError(f"{run_dir / 'run_config.json'} lacks {', '.join(missing)}")
    return documents[0], documents[1]


def _flag_names(message: str) -> str:
    """An export message in the Python API's words, in the flags' (``rank`` -> ``--rank``...)."""
    import re

    for python, flag in (("max_relative_error", "--max_error"), ("overwrite=True", "--overwrite"), ("max_rank", "--rank")):
        message = message.replace(python, flag)
    return re.sub(r"(?<![-\w])rank must", "--rank must", message)


def _export(args: argparse.Namespace, rest: Sequence[str]) -> int:
    run_dir = Path(args.run_dir)
    config, adapter_config = _read_run(run_dir)
    if args.rank is None and args.max_error is None and not args.merged:
        raise CliError("give the size of the export: --rank N (that rank), --max_error E (the smallest rank with "
                       "relative error below E, e.g. 0.01) or --merged (the full merged model)")  # fmt: skip
    if args.rank is not None and args.rank < 1:
        raise CliError(f"--rank must be >= 1, got {args.rank}")
    if args.max_error is not None and not 0 < args.max_error < 1:
        raise CliError(f"--max_error must be in (0, 1) (a relative error, e.g. 0.01), got {args.max_error}")
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise CliError(f"--output_dir {str(output)!r} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise CliError(f"--output_dir {str(output)!r} exists and is not empty: add --overwrite to write over it "
                       "(files the export does not write are kept), or give another folder")  # fmt: skip
    final = run_dir / "final"
    from .export.files import check_adapter_files

    try:
        check_adapter_files(final)
    except (ValueError, OSError) as error:
        raise CliError(_one_line(error)) from None
    from peft import PeftModel

    from . import peft_bridge
    from .export import FederatedRunInfo, export_adapter, export_merged, push_to_hub
    from .modeling import load_model_and_tokenizer

    try:
        with run_errors():
            base, tokenizer = load_model_and_tokenizer(config["model"], config["task_type"])
            model = PeftModel.from_pretrained(base, final)
            original = peft_bridge.base_weights(model)
            if args.merged:
                export_merged(model, output, tokenizer=tokenizer, overwrite=args.overwrite)
                print(f"merged model written to {output}")
            else:
                info = FederatedRunInfo(method=config["method"], rounds=config["num_rounds"],
                                        num_clients=config["num_clients"], clients_per_round=config.get("clients_per_round"),
                                        seed=config["seed"], base_model=adapter_config.get("base_model_name_or_path"),
                                        dataset=config["dataset"])  # fmt: skip
                report = export_adapter(model, original, output, rank=args.rank, max_relative_error=args.max_error,
                                        run_info=info, tokenizer=tokenizer, overwrite=args.overwrite)  # fmt: skip
                print(f"adapter written to {output}: rank {report.rank}, relative error {report.relative_error:.4g}")
            if args.push_to_hub:
                url = push_to_hub(output, args.push_to_hub, private=args.private)
                print(f"pushed to {url}")
    except CliError as error:
        raise CliError(_flag_names(str(error)).replace(_DEBUG_HINT, "")) from None
    return 0


def _plot(args: argparse.Namespace, rest: Sequence[str]) -> int:
    missing = [run for run in args.runs if not Path(run).exists()]
    if missing:
        raise CliError(f"no such run folder or metrics file: {', '.join(missing)}")
    from .plotting import plot_runs

    path = plot_runs(args.runs, args.output, labels=args.labels, title=args.title)
    print(f"wrote {path}")
    return 0


def build_parser(run_commands: Sequence[str] = ("train", "compare")) -> argparse.ArgumentParser:
    """The ``peft-fed`` parser. The run flags of ``run_commands`` need the method registry (torch, not
    transformers); ``main`` adds them only for the command it runs, so ``--version`` and ``export`` stay light."""
    parser = _Parser(prog="peft-fed", description="Federated LoRA fine-tuning for Hugging Face PEFT.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"peft-fed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,compare,deploy,certificates,export,plot,unmix}")
    formatter = argparse.ArgumentDefaultsHelpFormatter

    def subcommand(name: str, help_text: str, **kwargs):
        return sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False, **kwargs)

    train = subcommand("train", "Run one federated training (the offline default run with no flags).",
                       epilog=_TRAINING_EPILOG)  # fmt: skip
    if "train" in run_commands:
        add_run_arguments(train)
    train.set_defaults(handler=_train)

    compare = subcommand("compare", "Run methods x seeds; write a table and a plot (output_dir: runs/compare).",
                         epilog=_TRAINING_EPILOG)  # fmt: skip
    if "compare" in run_commands:
        from .strategies import STRATEGIES
        from .strategies.registry import ALIASES

        compare.add_argument("--methods", nargs="+", required=True, choices=[*STRATEGIES, *sorted(ALIASES)],
                             metavar="METHOD", help=f"Methods to compare: {', '.join(STRATEGIES)}.")  # fmt: skip
        compare.add_argument("--seeds", nargs="+", type=int, default=[42], help="Seeds (default: 42).")
        add_run_arguments(compare)
    compare.set_defaults(handler=_compare)

    deploy = subcommand(
        "deploy",
        "Run a federated training on a local Flower deployment: a SuperLink and --num_nodes SuperNodes on loopback "
        "(TLS and SuperNode authentication), one node per client; every peft-fed train flag applies.",
        epilog=_TRAINING_EPILOG,
    )
    if "deploy" in run_commands:
        import dataclasses

        from .flower.settings import DeploymentArguments

        options = deploy.add_argument_group("deployment")
        options.add_argument("--num_nodes", type=int, default=3, help="SuperNodes (= clients) to start (default: 3).")
        options.add_argument("--deployment_dir", default="runs/deploy",
                             help="Certificates, keys, node states and logs (default: runs/deploy).")  # fmt: skip
        options.add_argument("--insecure", action="store_true", help="No TLS and no SuperNode authentication.")
        options.add_argument("--run_timeout", type=float, default=7200.0, help="Seconds the run may take (default: 7200).")
        for f in dataclasses.fields(DeploymentArguments):
            kind = {"action": "store_true"} if isinstance(f.default, bool) else {"type": type(f.default)}
            options.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default})",
                                 **kind)  # fmt: skip
        add_run_arguments(deploy)
    deploy.set_defaults(handler=_deploy)

    certificates = subcommand(
        "certificates",
        "Make a CA and a SuperLink TLS certificate it signs (for flower-superlink --ssl-*), and SuperNode "
        "authentication keys (for flwr supernode register / flower-supernode --auth-supernode-private-key).",
    )
    certificates.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"],
                              help="IP addresses and DNS names the SuperLink is reached at (default: 127.0.0.1 localhost).")  # fmt: skip
    certificates.add_argument("--node_keys", nargs="*", default=[], metavar="NAME", help="Make a key pair per name.")
    certificates.add_argument("--output_dir", default="certificates")
    certificates.add_argument("--days", type=int, default=365, help="Validity of the certificates (default: 365).")
    certificates.set_defaults(handler=_certificates)

    export = subcommand("export", "Re-export a finished run's adapter (other rank, merged, Hub).")
    export.add_argument("--run_dir", required=True, help="output_dir of a finished peft-fed train.")
    export.add_argument("--output_dir", required=True)
    group = export.add_mutually_exclusive_group()
    group.add_argument("--rank", type=int)
    group.add_argument("--max_error", type=float, help="Smallest rank with relative error below this.")
    group.add_argument("--merged", action="store_true", help="Write the merged full model instead.")
    export.add_argument("--overwrite", action="store_true")
    export.add_argument("--push_to_hub", metavar="REPO_ID")
    export.add_argument("--private", action="store_true")
    export.set_defaults(handler=_export)

    plot = subcommand("plot", "Convergence curves of one or more runs to PNG.", formatter_class=formatter)
    plot.add_argument("runs", nargs="+", help="Run output folders (or metrics.jsonl files).")
    plot.add_argument("--output", default="convergence.png")
    plot.add_argument("--labels", nargs="+")
    plot.add_argument("--title")
    plot.set_defaults(handler=_plot)

    subcommand("unmix", "Hyperspectral unmixing (GAUSS and baselines); peft-fed unmix --help.", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; a mistake in the command line prints one ``error:`` line and returns 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "unmix":
        try:
            from .unmixing.cli import main as unmix_main
        except ImportError as error:  # scipy, scikit-learn, spectral... come with the unmixing extra
            print(f"error: peft-fed unmix needs {error.name or error}: pip install 'peft-fed[unmixing]'", file=sys.stderr)
            return 2
        return unmix_main(argv[1:])
    try:
        parser = build_parser(run_commands=[argv[0]] if argv and argv[0] in ("train", "compare", "deploy") else ())
        if not argv:
            parser.print_help()
            return 0
        args, rest = parser.parse_known_args(argv)
        handler = getattr(args, "handler", None)
        if handler is None:
            parser.print_help()
            return 0
        if rest and args.command not in ("train", "compare", "deploy"):
            raise CliError(f"unrecognized arguments: {' '.join(rest)}")
        return handler(args, rest)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
