"""Bad user input, everywhere a user can give it: YAML values of the wrong type (accepted when unambiguous,
refused in one line otherwise), the Python API's checks, and one ``error:`` line (exit 2, no traceback) for
the mistakes of ``peft-fed train``/``export``/``unmix`` (reliability issue, findings 3 and 6)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from peft_fed.cli import CliError, build_parser, main, run_config_from_args
from peft_fed.runtime.pipeline import FederatedRunConfig, read_settings_file


def _yaml_config(tmp_path, text: str) -> FederatedRunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    args, rest = build_parser().parse_known_args(["train", "--config", str(path)])
    try:
        return run_config_from_args(args, rest)
    except CliError as error:  # what the command prints as its one error line
        raise ValueError(str(error)) from None


def _cli_error(capsys, *argv: str) -> str:
    """Run ``peft-fed ARGV`` in-process; assert exit 2 and one ``error:`` line without traceback; the line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ finding 3: YAML values are type-checked


def test_yaml_exponent_learning_rate_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 (no dot) as the STRING "1e-3"
    assert read_settings_file(_write(tmp_path / "a.yaml", "learning_rate: 1e-3\n"))["learning_rate"] == "1e-3"
    t = _yaml_config(tmp_path, "learning_rate: 1e-3\nround_lr_min_ratio: 1e-1\ndirichlet_alpha: 3e-1\n")
    assert t.training_args.learning_rate == 0.001 and isinstance(t.training_args.learning_rate, float)
    assert t.training_args.round_lr_min_ratio == 0.1 and t.data_args.dirichlet_alpha == 0.3


def test_quoted_integer_is_coerced_and_a_word_is_refused(tmp_path):
    config = _yaml_config(tmp_path, 'num_rounds: "1"\nnum_clients: "4"\nper_device_train_batch_size: "2"\n')
    assert (config.training_args.num_rounds, config.data_args.num_clients) == (1, 4)
    assert config.training_args.per_device_train_batch_size == 2
    with pytest.raises(ValueError, match=r"num_clients \(in .*run.yaml\) must be an integer, got 'four'"):
        _yaml_config(tmp_path, "num_clients: four\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clients_per_round: 2.5\n", r"clients_per_round .*must be an integer, got 2.5"),
        ("num_rounds: 1e1\n", r"num_rounds .*must be an integer, got '1e1'"),
        ("learning_rate: 1e-3x\n", r"learning_rate .*must be a number, got '1e-3x'"),
        ("learning_rate: nan\n", r"learning_rate .*must be a number, got 'nan'"),
        ("learning_rate: [0.001]\n", r"learning_rate .*must be a number, got \[0.001\]"),
        ("num_rounds: {a: 1}\n", r"num_rounds .*must be an integer"),
        ("model: [a, b]\n", r"model .*must be a string"),
        ("output_dir: {a: 1}\n", r"output_dir .*must be a string"),
        ("per_device_train_batch_size: [8]\n", r"per_device_train_batch_size .*must be an integer"),
        ("use_cpu: maybe\n", r"use_cpu .*must be true or false"),
        ("resume: 2\n", r"resume .*must be true or false"),
        ("partition: [iid]\n", r"partition .*must be one of"),
        ("zeta: [0.5]\n", r"zeta .*must be a number"),
    ],
)
def test_yaml_values_of_the_wrong_type_are_refused_in_one_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as error:
        _yaml_config(tmp_path, text)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("text", "expected"), [("'no'", False), ("'No'", False), ("'0'", False), ("'YES'", True),
                                                ("'true'", True), ("'1'", True), ("no", False), ("on", True)])  # fmt: skip
def test_bool_strings_are_argparse_style_never_truthiness(tmp_path, text, expected):
    config = _yaml_config(tmp_path, f"use_cpu: {text}\nresume: {text}\n")
    assert config.training_args.use_cpu is expected and config.training_args.resume is expected


def test_python_api_applies_the_same_checks():
    from peft_fed import FederatedTrainingArguments
    from peft_fed.runtime.run_arguments import DataArguments, FederatedArguments, LoraArguments

    config = FederatedRunConfig.from_dict({"learning_rate": "1e-3", "num_rounds": "2", "use_cpu": "no"})
    assert (config.training_args.learning_rate, config.training_args.num_rounds) == (0.001, 2)
    assert config.training_args.use_cpu is False
    for settings, message in [({"num_clients": "four"}, "num_clients must be an integer, got 'four'"),
                              ({"clients_per_round": 2.5}, "clients_per_round must be an integer, got 2.5"),
                              ({"learning_rate": [1]}, "learning_rate must be a number")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            FederatedRunConfig.from_dict(settings)
    # the argument dataclasses themselves (HfArgumentParser, direct construction)
    assert DataArguments(num_clients="4").num_clients == 4
    with pytest.raises(ValueError, match="num_clients must be an integer, got 'four'"):
        DataArguments(num_clients="four")
    with pytest.raises(ValueError, match="r must be an integer, got 2.5"):
        LoraArguments(r=2.5)
    with pytest.raises(ValueError, match="num_rounds must be an integer, got 'four'"):
        FederatedArguments(num_rounds="four")
    with pytest.raises(ValueError, match="clients_per_round must be an integer, got 2.5"):
        FederatedTrainingArguments(clients_per_round=2.5)
    assert FederatedArguments(resume="no").resume is False


def test_method_kwargs_of_the_wrong_type_is_a_value_error():
    from peft_fed import FederatedTrainingArguments
    from peft_fed.runtime.pipeline import run_federated

    with pytest.raises(ValueError, match="method_kwargs must be a mapping"):
        FederatedTrainingArguments(method_kwargs=[1, 2])
    with pytest.raises(ValueError, match="method_kwargs"):
        FederatedRunConfig.from_dict({"method_kwargs": [1, 2]})
    with pytest.raises(ValueError, match="method_kwargs"):
        run_federated(method_kwargs=[1, 2])


def test_cli_yaml_type_errors_are_one_line(tmp_path, capsys):
    for text, expected in [("num_clients: four\n", "num_clients (in "), ("clients_per_round: 2.5\n", "must be an integer"),
                           ("use_cpu: maybe\n", "bad.yaml: use_cpu must be true or false"), ("learning_rate: [1]\n", "must be a number")]:  # fmt: skip
        line = _cli_error(capsys, "train", "--config", _write(tmp_path / "bad.yaml", text))
        assert expected in line, line


# ------------------------------------------------------------------ finding 6: messages


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("model", ["/nonexistent", "./no/such/model", "missing.gguf", "~/nowhere/model"])
def test_train_with_a_missing_model_path_is_one_line(capsys, model):
    line = _cli_error(capsys, "train", "--model", model)
    assert repr(model) in line and "does not exist" in line
    assert "alias" in line and "Hub id" in line


def test_model_loading_error_names_the_model_and_the_fix(monkeypatch):
    import huggingface_hub.constants

    from peft_fed.modeling import load_model_and_tokenizer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        OSError, match=r"cannot load model 'no-such-org/no-such-model'.*alias.*Hub id"
    ) as error:
        load_model_and_tokenizer("no-such-org/no-such-model", "seq_cls", num_labels=2)
    assert "\n" not in str(error.value)


def _fake_run(tmp_path, *, adapter_bytes: bytes | None = None):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({
        "model": "all-MiniLM-L6-v2", "task_type": "seq_cls", "method": "fedit", "num_rounds": 1, "num_clients": 2,
        "seed": 1, "dataset": "wordnet_topic"}))  # fmt: skip
    (run / "final" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    if adapter_bytes is not None:
        (run / "final" / "adapter_model.safetensors").write_bytes(adapter_bytes)
    return run


def _safetensors_bytes() -> bytes:
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


def test_export_without_a_rank_names_the_flags(tmp_path, capsys):
    run = _fake_run(tmp_path, adapter_bytes=_safetensors_bytes())
    line = _cli_error(capsys, "export", "--run_dir", str(run), "--output_dir", str(tmp_path / "out"))
    assert "--rank" in line and "--max_error" in line and "--merged" in line


def test_export_into_a_non_empty_folder_names_the_overwrite_flag(tmp_path, capsys):
    run = _fake_run(tmp_path, adapter_bytes=_safetensors_bytes())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    line = _cli_error(capsys, "export", "--run_dir", str(run), "--output_dir", str(out), "--rank", "2")
    assert "--overwrite" in line and "overwrite=True" not in line and str(out) in line


@pytest.mark.parametrize("cut", [4, 20, -5])
def test_export_of_a_truncated_adapter_file_is_one_line(tmp_path, capsys, cut):
    data = _safetensors_bytes()
    run = _fake_run(tmp_path, adapter_bytes=data[:cut])
    line = _cli_error(
        capsys, "export", "--run_dir", str(run), "--output_dir", str(tmp_path / "out"), "--rank", "2"
    )
    assert "adapter_model.safetensors" in line and "truncated or corrupt" in line


def test_adapter_file_check_of_the_export_module(tmp_path):
    from peft_fed.export import check_adapter_files

    good = _fake_run(tmp_path, adapter_bytes=_safetensors_bytes())
    check_adapter_files(good / "final")
    (good / "final" / "adapter_model.safetensors").write_bytes(_safetensors_bytes()[:-1])
    with pytest.raises(ValueError, match="adapter_model.safetensors.*truncated or corrupt"):
        check_adapter_files(good / "final")


def test_unmix_on_a_garbage_mat_file_is_one_line(tmp_path, capsys):
    garbage = tmp_path / "scene.mat"
    garbage.write_bytes(b"this is not a MATLAB file at all" * 10)
    code = main(["unmix", "--data", str(garbage), "--method", "vca_fclsu", "--output_dir", str(tmp_path / "o"),
                 "--num_endmembers", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "error: " in err and str(garbage) in err and "not a readable MATLAB" in err


def test_nan_in_reference_endmembers_is_refused():
    from peft_fed.unmixing.data import HyperspectralScene
    from peft_fed.unmixing.metrics import evaluate_unmixing

    rng = np.random.default_rng(0)
    reference = rng.uniform(size=(5, 3))
    reference[2, 1] = np.nan
    with pytest.raises(ValueError, match="reference endmember 1 .*NaN"):
        HyperspectralScene(cube=rng.uniform(size=(2, 2, 5)), endmembers=reference)
    with pytest.raises(ValueError, match="endmember 'soil' .*NaN"):
        HyperspectralScene(cube=rng.uniform(size=(2, 2, 5)), endmembers=reference,
                           endmember_names=["water", "soil", "tree"])  # fmt: skip
    with pytest.raises(ValueError, match="reference endmember 1 .*NaN"):
        evaluate_unmixing(
            rng.uniform(size=(5, 3)), rng.uniform(size=(2, 2, 3)), reference_endmembers=reference
        )


def test_settings_that_are_not_a_mapping_of_names(tmp_path):
    with pytest.raises(ValueError, match="settings must be a mapping"):
        FederatedRunConfig.from_dict([("num_rounds", 1)])
    with pytest.raises(ValueError, match=r"setting names must be strings, got \[1\]"):
        FederatedRunConfig.from_dict({1: 2})
    with pytest.raises(ValueError, match=r"setting names must be strings"):
        _yaml_config(tmp_path, "1: 2\n")
