"""The command line: flags and YAML become a run config, fast one-line errors, the comparison table, plots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peft_fed.cli import (
    build_parser,
    comparison_table,
    main,
    run_config_from_args,
    run_settings,
    summarize_run,
)
from peft_fed.plotting import plot_runs
from peft_fed.runtime.pipeline import FederatedRunConfig, format_round_table

ROOT = Path(__file__).resolve().parents[1]


def _args(*argv):
    return build_parser().parse_known_args(["train", *argv])


def _config(*argv) -> FederatedRunConfig:
    args, rest = _args(*argv)
    return run_config_from_args(args, rest)


# ------------------------------------------------------------------ flags and YAML -> settings


def test_no_flags_give_the_offline_default():
    config = _config()
    assert config == FederatedRunConfig()
    m, d, lora, t = config.model_args, config.data_args, config.lora_args, config.training_args
    assert (m.model, d.dataset, t.method, d.num_clients, t.clients_per_round, t.num_rounds) == (
        "all-MiniLM-L6-v2", "wordnet_mc", "fedsmoothlora", 10, 3, 10)  # fmt: skip
    assert (t.local_steps, t.learning_rate, t.per_device_train_batch_size, d.max_length) == (8, 1e-3, 8, 48)
    assert (t.per_device_eval_batch_size, lora.r, lora.lora_alpha, lora.lora_dropout) == (32, 8, 16, 0.05)
    assert (d.partition, d.dirichlet_alpha, t.seed, d.max_eval_samples, d.client_eval_fraction) == (
        "dirichlet", 0.3, 42, 200, 0.1)  # fmt: skip
    assert (t.output_dir, t.dataloader_num_workers, t.remove_unused_columns, t.report_to) == ("runs/default", 0, False, [])
    assert t.lr_scheduler_type == "constant" and t.method_kwargs is None


def test_python_api_and_cli_share_the_defaults():
    from peft_fed import FederatedTrainingArguments

    args = FederatedTrainingArguments()
    assert args.lr_scheduler_type == "constant" and (args.local_steps, args.learning_rate) == (8, 1e-3)
    assert not hasattr(args, "gradient_estimation_batches")


def test_flags_override_yaml_and_share_its_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: subspace_reg\nnum_rounds: 7\nclip_norm: 3.0\ntarget_modules: [query]\n"
                    "learning_rate: 1e-3\noptim: sgd\nper_device_train_batch_size: 4\n")  # fmt: skip
    config = _config("--config", str(path), "--num_rounds", "2", "--resume", "--seed", "5", "--mu", "0.1",
                     "--per_device_train_batch_size", "6")  # fmt: skip
    t = config.training_args
    assert (t.method, t.num_rounds, t.resume, t.seed, t.learning_rate) == ("subspace_reg", 2, True, 5, 1e-3)
    assert t.method_kwargs == {"clip_norm": 3.0, "mu": 0.1} and config.lora_args.target_modules == ["query"]
    assert t.optim == "sgd" and t.per_device_train_batch_size == 6


def test_json_list_and_none_flags():
    config = _config("--dataset_kwargs", '{"seed_words": 3}', "--target_modules", "query", "value",
                     "--clients_per_round", "none", "--zeta", "0.5", "--zeta_schedule", "cosine")  # fmt: skip
    assert config.data_args.dataset_kwargs == {"seed_words": 3}
    assert config.lora_args.target_modules == ["query", "value"] and config.training_args.clients_per_round is None
    assert config.training_args.method_kwargs == {"zeta": 0.5, "zeta_schedule": "cosine"}


def test_local_epochs_replace_local_steps():
    t = _config("--local_epochs", "1").training_args
    assert (t.local_steps, t.local_epochs) == (None, 1.0)


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("methd: fedit\n")
    args, rest = _args("--config", str(path))
    with pytest.raises(Exception, match=r"unknown setting\(s\) \['methd'\]"):
        run_config_from_args(args, rest)


def test_compare_takes_each_methods_own_hyperparameters():
    args, rest = build_parser().parse_known_args(
        ["compare", "--methods", "fedit", "subspace_reg", "--mu", "0.2", "--num_rounds", "1"]
    )
    assert run_settings(args, rest, methods=args.methods)["mu"] == "0.2"


def test_run_config_json_records_every_setting():
    flat = FederatedRunConfig().to_dict()
    for key in ("model", "task_type", "method", "num_rounds", "num_clients", "clients_per_round", "seed", "dataset",
                "learning_rate", "lr_scheduler_type", "zeta", "num_gradient_batches", "r", "export_rank"):  # fmt: skip
        assert key in flat
    assert "method_kwargs" not in flat
    json.dumps(flat, default=str)


def test_argument_mirrors_match_the_data_package():
    from peft_fed.data import DATASET_REGISTRY, PARTITION_SCHEMES, TASK_TYPES
    from peft_fed.runtime import run_arguments

    assert run_arguments.DATASET_NAMES == tuple(DATASET_REGISTRY)
    assert run_arguments.PARTITIONS == tuple(PARTITION_SCHEMES)
    assert run_arguments.TASK_TYPES == tuple(TASK_TYPES)


# ------------------------------------------------------------------ the command as a process: fast, one-line errors


def _peft_fed(*argv: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.perf_counter()
    command = [shutil.which("peft-fed")] if shutil.which("peft-fed") else [sys.executable, "-m", "peft_fed.cli"]
    done = subprocess.run([*command, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    return done, time.perf_counter() - started


@pytest.fixture(scope="module")
def time_limit():
    """3 s, stretched by how much slower than usual a bare interpreter with torch starts on this machine now."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    torch_seconds = time.perf_counter() - started
    return 3.0 * max(1.0, torch_seconds / 1.5)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "misspelt method": (["train", "--method", "fedsmoothlra"], "invalid choice: 'fedsmoothlra'"),
    "misspelt partition": (["train", "--partition", "dirichet"], "--partition: invalid choice"),
    "misspelt task type": (["train", "--task_type", "mc"], "--task_type: invalid choice"),
    "flag the method does not take": (["train", "--method", "fedit", "--zeta", "0.5"], "'fedit' does not take zeta"),
    "hyperparameter out of range": (["train", "--zeta", "1.5"], "zeta"),
    "hyperparameter of the wrong type": (["train", "--mu", "x", "--method", "subspace_reg"], "--mu must be a number"),
    "malformed JSON": (["train", "--dataset_kwargs", "{path: 1}"], "--dataset_kwargs must be a JSON object"),
    "missing config": (["train", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    "malformed YAML": (["train", "--config", "{bad_yaml}"], "not valid YAML (line"),
    "YAML not a mapping": (["train", "--config", "{list_yaml}"], "must be a mapping"),
    "bad YAML value": (["train", "--config", "{bad_value_yaml}"], "num_rounds (in "),
    "negative rounds": (["train", "--num_rounds", "-1"], "num_rounds must be >= 1"),
    "zero clients": (["train", "--num_clients", "0"], "num_clients must be >= 1"),
    "inconsistent export": (["train", "--export_rank", "2", "--export_max_error", "0.1"], "not both"),
    "unknown dataset": (["train", "--dataset", "wordnet_mcc"], "'wordnet_mcc' is neither a registered dataset"),
    "method_kwargs spelling": (["train", "--method_kwargs", '{"zeta": 0.5}'], "method_kwargs is not a run setting"),
    "compare hyperparameter nobody takes": (["compare", "--methods", "fedit", "flora", "--mu", "1"], "takes mu"),
    "export of a missing run": (["export", "--run_dir", "missing", "--output_dir", "out"], "'missing' is not a folder"),
    "export of an unfinished run": (["export", "--run_dir", ".", "--output_dir", "out"], "run_config.json does not exist"),
    "missing model path": (["train", "--model", "/nonexistent"], "model '/nonexistent' does not exist: give a model alias"),
    "YAML word for an integer": (["train", "--config", "{word_yaml}"], "num_clients (in "),
    "YAML fraction for an integer": (["train", "--config", "{fraction_yaml}"], "clients_per_round (in "),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_exit_2_and_fast(case, tmp_path, time_limit):
    argv, expected = BAD_INPUTS[case]
    files = {
        "bad_yaml": _write(tmp_path / "bad.yaml", "method: fedit\nnum_rounds: [\n"),
        "list_yaml": _write(tmp_path / "list.yaml", "- a\n- b\n"),
        "bad_value_yaml": _write(tmp_path / "value.yaml", "num_rounds: many\n"),
        "word_yaml": _write(tmp_path / "word.yaml", "num_clients: four\n"),
        "fraction_yaml": _write(tmp_path / "fraction.yaml", "clients_per_round: 2.5\n"),
    }
    argv = [a.format(**files) if a.startswith("{") and a.strip("{}") in files else a for a in argv]
    done, seconds = _peft_fed(*argv, cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert expected in lines[0]
    assert "Traceback" not in done.stderr
    assert seconds < time_limit, f"{case}: {seconds:.1f} s"


def _failing_run(error: BaseException, monkeypatch=None):
    """A stand-in for run_federated that raises ``error`` while setting up or, given ``monkeypatch``, inside
    FederatedTrainer.train (replaced by a function that raises it)."""
    from peft_fed.runtime.trainer import FederatedTrainer

    def train(self, *args, **kwargs):
        raise error

    if monkeypatch is not None:
        monkeypatch.setattr(FederatedTrainer, "train", train)

    def run(config):
        if monkeypatch is not None:
            FederatedTrainer.train(None)
        raise error

    return run


@pytest.mark.parametrize("error", [ValueError("data.jsonl has no column 'label'"),
                                   FileNotFoundError("no such file: data.jsonl"), OSError("cannot load model 'x'")])  # fmt: skip
def test_errors_of_the_users_input_inside_a_run_are_one_line(monkeypatch, capsys, error):
    import peft_fed.runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_federated", _failing_run(error))
    assert main(["train", "--num_rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {error} (--log_level debug shows the traceback)"]
    with pytest.raises(type(error)):  # the traceback on demand
        main(["train", "--num_rounds", "1", "--log_level", "debug"])


@pytest.mark.parametrize("error", [ValueError("shape mismatch"), RuntimeError("CUDA out of memory"), KeyError("x")])
def test_failures_of_the_training_itself_keep_their_traceback(monkeypatch, error):
    import peft_fed.runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_federated", _failing_run(error, monkeypatch))
    with pytest.raises(type(error)):
        main(["train", "--num_rounds", "1"])
    monkeypatch.setattr(pipeline, "run_federated", _failing_run(error))
    if not isinstance(error, (ValueError, OSError)):  # not input errors: traceback wherever they are raised
        with pytest.raises(type(error)):
            main(["train", "--num_rounds", "1"])


def test_version_help_and_bare_command(tmp_path, time_limit):
    from peft_fed import __version__

    done, _ = _peft_fed("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"peft-fed {__version__}"
    done, _ = _peft_fed(cwd=tmp_path)
    assert done.returncode == 0 and "usage: peft-fed" in done.stdout and "train" in done.stdout
    done, seconds = _peft_fed("train", "--help", cwd=tmp_path)
    assert done.returncode == 0 and seconds < time_limit
    text = " ".join(done.stdout.split())
    for name in ("fedsmoothlora", "subspace_reg", "fedit", "flexlora", "fedavg=fedit"):
        assert name in text
    for flag in ("--zeta", "--num_gradient_batches", "--mu", "--clip_norm", "--svd_method", "--partition {iid,dirichlet",
                 "--round_lr_scheduler {constant,cosine,linear}", "--log_level", "--help_training"):  # fmt: skip
        assert flag in text
    assert "[subspace_reg]" in text and "--learning_rate" in text  # the TrainingArguments note


def test_import_peft_fed_is_light_and_still_registers_the_peft_types(tmp_path):
    code = (
        "import sys, peft_fed\n"
        "assert not {'transformers', 'peft', 'torch'} & set(sys.modules), sorted(m for m in sys.modules if m in "
        "('transformers', 'peft', 'torch'))\n"
        "from peft_fed import FedSmoothLoraConfig\n"
        "FedSmoothLoraConfig(r=2, zeta=0.5, target_modules=['q']).save_pretrained(sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    load = (
        "import sys, peft_fed\n"
        "from peft import PeftConfig, LoraConfig\n"
        "config = PeftConfig.from_pretrained(sys.argv[1])\n"
        "assert type(config).__name__ == 'FedSmoothLoraConfig' and config.zeta == 0.5, type(config)\n"
        "assert type(LoraConfig.from_pretrained(sys.argv[1])).__name__ == 'FedSmoothLoraConfig'\n"
        "assert peft_fed.FederatedTrainer.__name__ == 'FederatedTrainer'\n"
    )
    subprocess.run([sys.executable, "-c", load, str(tmp_path)], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_log_level_makes_peft_fed_info_lines_visible(monkeypatch):
    import logging

    from peft_fed.cli import configure_logging

    logger = logging.getLogger("peft_fed")
    monkeypatch.setattr(logger, "level", logger.level)
    configure_logging("info")
    assert logger.isEnabledFor(logging.INFO)
    import transformers

    assert transformers.utils.logging.get_verbosity() == logging.INFO
    configure_logging("warning")
    assert not logger.isEnabledFor(logging.INFO)
    assert transformers.utils.logging.get_verbosity() == logging.WARNING


# ------------------------------------------------------------------ summaries, tables, plots


def _history(method, accs, losses):
    """Rows of a run where client "0" trains every round with the given (first, last) step losses."""
    return [
        {"round": i + 1, "method": method, "eval_accuracy": a, "eval_loss": 1.0 - a, "inter_round_loss_jump": None,
         "basis_overlap": 0.9, "uplink_bytes": 1000, "downlink_bytes": 2000, "train_loss": 1.0,
         "round_local_wall_seconds": 1.0, "aggregation_seconds": 0.5, "eval_seconds": 0.5,
         "client_loss_first": {"0": first}, "client_loss_last": {"0": last}}
        for i, (a, (first, last)) in enumerate(zip(accs, losses, strict=True))
    ]


def test_summary_and_table():
    summary = summarize_run(_history("fedit", [0.3, 0.5, 0.4], [(1.0, 0.8), (1.0, 0.7), (0.6, 0.5)]))
    assert summary["best_accuracy"] == 0.5 and summary["final_accuracy"] == 0.4
    assert summary["mean_loss_jump"] == pytest.approx(0.05)  # jumps 1.0 - 0.8 and 0.6 - 0.7
    assert summary["mean_abs_loss_jump"] == pytest.approx(0.15)
    assert summary["seconds_per_round"] == pytest.approx(2.0)
    table = comparison_table({"fedit": {"42": summary, "43": summary}})
    assert "| fedit | 2 | 0.5000 ± 0.0000 | 0.4000 ± 0.0000 |" in table
    assert "-" in format_round_table(_history("fedit", [0.3], [(1.0, 0.9)]))


def test_plot_command(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        rows = _history(name, [0.3, 0.4], [(1.0, 0.9), (0.8, 0.7)])
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(out)]) == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path / "missing")]) == 2


def test_plot_of_a_folder_without_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_runs([tmp_path], tmp_path / "x.png")
