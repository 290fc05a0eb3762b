"""The federated configs through PEFT's own entry points: get_peft_model, save_pretrained, PeftModel and
AutoPeftModel loading (with peft_fed imported), and loading by a stock PEFT process that never imports peft_fed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel, get_peft_model

from peft_fed.tuners import FedSmoothLoraConfig, SubspaceRegLoraConfig


def fedsmooth_bert_adapter(load_bert, input_ids, path):
    """A FedSmoothLoRA adapter on the tiny BERT classifier, saved to ``path``; returns (config, logits)."""
    torch.manual_seed(2)
    config = FedSmoothLoraConfig(
        r=4,
        lora_alpha=8,
        task_type="SEQ_CLS",
        target_modules=["query", "value", "intermediate.dense"],
        init_lora_weights=False,  # random B too, so the adapter really changes the output
        zeta=0.5,
        zeta_schedule="cosine",
        zeta_min=0.25,
        gamma=256.0,
        num_gradient_batches=3,
        svd_method="randomized",
        svd_oversampling=12,
        exact_round_matching=True,
    )
    peft_model = get_peft_model(load_bert(), config).eval()
    with torch.no_grad():
        logits = peft_model(input_ids=input_ids).logits
    peft_model.save_pretrained(path)
    return config, logits


def subspace_gpt2_adapter(load_gpt2, input_ids, path):
    torch.manual_seed(3)
    config = SubspaceRegLoraConfig(
        r=4,
        lora_alpha=16,
        task_type="CAUSAL_LM",
        target_modules=["c_attn", "mlp.c_proj"],
        fan_in_fan_out=True,
        init_lora_weights=False,
        mu=0.1,
        beta=0.02,
        lam=0.0,
        clip_norm=25.0,
        restore_norm_into="both",
        normalize_by_num_layers=False,
    )
    peft_model = get_peft_model(load_gpt2(), config).eval()
    with torch.no_grad():
        logits = peft_model(input_ids=input_ids).logits
    peft_model.save_pretrained(path)
    return config, logits


def assert_same_federated_config(loaded, config, fields):
    assert type(loaded) is type(config)
    for name in fields:
        assert getattr(loaded, name) == getattr(config, name), name


FEDSMOOTH_FIELDS = [
    "federated_method",
    "zeta",
    "zeta_schedule",
    "zeta_min",
    "gamma",
    "num_gradient_batches",
    "svd_method",
    "svd_oversampling",
    "svd_power_iterations",
    "exact_round_matching",
    "r",
    "lora_alpha",
    "target_modules",
]
SUBSPACE_FIELDS = [
    "federated_method",
    "mu",
    "beta",
    "lam",
    "normalize_by_num_layers",
    "clip_norm",
    "restore_norm_into",
    "r",
    "lora_alpha",
    "target_modules",
]


def test_fedsmooth_round_trip_peft_model_and_auto(tmp_path, load_bert, bert_dir, input_ids):
    config, logits = fedsmooth_bert_adapter(load_bert, input_ids, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == bert_dir
    assert saved["peft_type"] == "LORA" and saved["federated_method"] == "fedsmoothlora"

    reloaded = PeftModel.from_pretrained(load_bert(), tmp_path).eval()
    assert_same_federated_config(reloaded.peft_config["default"], config, FEDSMOOTH_FIELDS)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, logits, rtol=0, atol=0)

    auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert_same_federated_config(auto.peft_config["default"], config, FEDSMOOTH_FIELDS)
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=input_ids).logits, logits, rtol=0, atol=0)


def test_subspace_reg_round_trip_conv1d_and_auto(tmp_path, load_gpt2, gpt2_dir, input_ids):
    config, logits = subspace_gpt2_adapter(load_gpt2, input_ids, tmp_path)

    reloaded = PeftModel.from_pretrained(load_gpt2(), tmp_path).eval()
    assert_same_federated_config(reloaded.peft_config["default"], config, SUBSPACE_FIELDS)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, logits, rtol=0, atol=0)

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_federated_config(auto.peft_config["default"], config, SUBSPACE_FIELDS)
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=input_ids).logits, logits, rtol=0, atol=0)

    # transformers' own adapter API loads it through PeftConfig.from_pretrained too.
    plain_base = load_gpt2()
    plain_base.load_adapter(str(tmp_path))
    assert type(plain_base.peft_config["default"]) is SubspaceRegLoraConfig
    with torch.no_grad():
        torch.testing.assert_close(plain_base(input_ids=input_ids).logits, logits, rtol=0, atol=0)

    # A second adapter of the other method loads next to it with its own class.
    second_dir = tmp_path / "second"
    second = FedSmoothLoraConfig(r=2, task_type="CAUSAL_LM", target_modules=["c_attn"], fan_in_fan_out=True)
    get_peft_model(load_gpt2(), second).save_pretrained(second_dir)
    reloaded.load_adapter(second_dir, adapter_name="fedsmooth")
    assert type(reloaded.peft_config["fedsmooth"]) is FedSmoothLoraConfig
    assert type(reloaded.peft_config["default"]) is SubspaceRegLoraConfig


STOCK_PEFT_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    import torch
    from peft import LoraConfig, PeftConfig, PeftModel
    from transformers import BertForSequenceClassification, GPT2LMHeadModel

    expected = torch.load(sys.argv[1])
    for adapter_dir, model_cls, key in [
        (sys.argv[2], BertForSequenceClassification, "bert"),
        (sys.argv[3], GPT2LMHeadModel, "gpt2"),
    ]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = PeftConfig.from_pretrained(adapter_dir)
            base = model_cls.from_pretrained(config.base_model_name_or_path).eval()
            model = PeftModel.from_pretrained(base, adapter_dir).eval()
        assert type(config) is LoraConfig, type(config)
        assert type(model.peft_config["default"]) is LoraConfig
        ignored = [str(w.message) for w in caught if "Unexpected keyword arguments" in str(w.message)]
        assert ignored and "federated_method" in ignored[0], ignored
        with torch.no_grad():
            logits = model(input_ids=expected["input_ids"]).logits
        torch.testing.assert_close(logits, expected[key], rtol=0, atol=0)
    assert not any(name == "peft_fed" or name.startswith("peft_fed.") for name in sys.modules)
    print("stock peft loaded both adapters")
    """
)


def test_stock_peft_without_peft_fed_loads_as_lora(tmp_path, load_bert, load_gpt2, input_ids):
    _, bert_logits = fedsmooth_bert_adapter(load_bert, input_ids, tmp_path / "fedsmooth")
    _, gpt2_logits = subspace_gpt2_adapter(load_gpt2, input_ids, tmp_path / "subspace")
    expected = tmp_path / "expected.pt"
    torch.save({"input_ids": input_ids, "bert": bert_logits, "gpt2": gpt2_logits}, expected)

    # Run from an empty directory with a clean PYTHONPATH so that peft_fed cannot even be found.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            STOCK_PEFT_SCRIPT,
            str(expected),
            str(tmp_path / "fedsmooth"),
            str(tmp_path / "subspace"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stock peft loaded both adapters" in result.stdout
