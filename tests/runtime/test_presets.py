"""The papers' presets (examples/configs/presets/*.yaml) load, and run one round on a tiny stand-in model of the
same family and a local fixture of the same schema as their Hub dataset (the real runs need a GPU and the Hub)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from peft_fed.runtime.pipeline import FederatedRunConfig, read_settings_file, run_federated
from peft_fed.runtime.run_arguments import split_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import save_stand_in  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "examples" / "configs" / "presets"
HELLASWAG_FIXTURE = ROOT / "tests" / "fixtures" / "hellaswag_tiny.jsonl"
# preset file -> (stand-in model family, fixture builder name)
CASES = {
    "subspace_reg_hellaswag_roberta_large.yaml": ("roberta", "hellaswag"),
    "subspace_reg_hellaswag_smollm_360m.yaml": ("llama", "hellaswag"),
    "fedsmoothlora_cifar100_vit_small.yaml": ("vit", "cifar100"),
    "fedsmoothlora_metamath_llama32_1b.yaml": ("llama-wide", "metamathqa"),  # r=32 needs 2r <= 128
}


def _hellaswag(path: Path) -> Path:
    """The HellaSwag fixture's rows repeated to 80 (70 train / 10 val, by the `split` column)."""
    rows = [json.loads(line) for line in HELLASWAG_FIXTURE.read_text().splitlines() if line.strip()]
    out = []
    for i in range(80):
        row = dict(rows[i % len(rows)], ind=i, split="train" if i < 70 else "val")
        out.append(json.dumps(row))
    path.write_text("\n".join(out) + "\n")
    return path


def _cifar100(path: Path) -> Path:
    """uoft-cs/cifar100's schema: `img` (Image), `fine_label` (100 classes), `coarse_label` (20), train + test."""
    rng = np.random.default_rng(0)
    features = datasets.Features({
        "img": datasets.Image(),
        "fine_label": datasets.ClassLabel(names=[f"fine_{i}" for i in range(100)]),
        "coarse_label": datasets.ClassLabel(names=[f"coarse_{i}" for i in range(20)]),
    })  # fmt: skip
    path.mkdir()
    for split, n in (("train", 80), ("test", 16)):
        labels = rng.integers(0, 8, size=n)
        images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        data = {"img": images, "fine_label": labels.tolist(), "coarse_label": (labels // 5).tolist()}
        datasets.Dataset.from_dict(data, features=features).to_parquet(str(path / f"{split}.parquet"))
    return path


def _metamathqa(path: Path) -> Path:
    """meta-math/MetaMathQA's schema: `query`, `response`, `type`, `original_question` (one train split)."""
    kinds = ["GSM_Rephrased", "MATH_AnsAug", "GSM_SV", "MATH_FOBAR"]
    rows = []
    for i in range(60):
        a, b = i % 7 + 2, i % 5 + 3
        rows.append(json.dumps({
            "query": f"What is {a} times {b}?", "original_question": f"Compute {a}*{b}.", "type": kinds[i % 4],
            "response": f"{a} times {b} is {a * b}. The answer is: {a * b}",
        }))  # fmt: skip
    path.write_text("\n".join(rows) + "\n")
    return path


def test_every_preset_is_covered():
    assert sorted(p.name for p in PRESETS.glob("*.yaml")) == sorted(CASES)


def _preset(preset: str) -> dict:
    """A preset's settings, checked by the run's argument dataclasses (GPU-only settings such as bf16 are the
    Trainer's, checked when a run starts)."""
    settings = read_settings_file(PRESETS / preset)
    split_settings(settings)  # unknown hyperparameters and bad values raise
    defaults = FederatedRunConfig().to_dict()
    return {**defaults, **settings}


@pytest.mark.parametrize("preset", sorted(CASES))
def test_preset_loads_with_the_papers_settings(preset):
    config = _preset(preset)
    assert config["method"] in ("fedsmoothlora", "subspace_reg")
    if config["method"] == "subspace_reg":
        assert (config["num_clients"], config["clients_per_round"], config["num_rounds"], config["r"],
                config["lora_alpha"]) == (10, 3, 20, 8, 16)  # fmt: skip
        assert (config["dirichlet_alpha"], config["partition_column"]) == (0.3, "activity_label")
        assert config["per_device_train_batch_size"] * config["gradient_accumulation_steps"] == 8
        assert config["mu"] == 0.05 and config["clip_norm"] in (15.0, 25.0)
    elif config["task_type"] == "image_cls":
        assert (config["num_clients"], config["clients_per_round"], config["num_rounds"], config["r"],
                config["lora_alpha"]) == (5, None, 10, 2, 4)  # fmt: skip
        assert config["use_rslora"] and config["gamma"] == 256 and config["local_epochs"] == 1
        assert config["optim"] == "sgd" and config["optim_args"] == "momentum=0.9"
    else:
        assert (config["num_clients"], config["num_rounds"], config["local_steps"], config["r"], config["lora_alpha"]) == (
            3, 10, 200, 32, 64)  # fmt: skip
        assert config["gamma"] == 64 and config["learning_rate"] == 2e-5


@pytest.mark.parametrize("preset", sorted(CASES))
def test_preset_runs_one_round_on_a_stand_in(preset, tmp_path):
    family, data = CASES[preset]
    model = save_stand_in(family, tmp_path / "model")
    fixture = {"hellaswag": _hellaswag, "cifar100": _cifar100, "metamathqa": _metamathqa}[data](
        tmp_path / ("data.jsonl" if data != "cifar100" else "cifar100")
    )
    overrides = dict(model=model, dataset_kwargs={"path": str(fixture)}, num_rounds=1, max_length=64,
                     output_dir=str(tmp_path / "run"), bf16=False, use_cpu=True)  # fmt: skip
    preset_config = _preset(preset)
    if preset_config.get("local_epochs") is None:
        overrides["local_steps"] = 2  # the real presets run 4 to 200 steps
    if preset_config["max_train_samples"]:
        overrides["max_train_samples"] = min(preset_config["max_train_samples"], 70)
    config = FederatedRunConfig.from_yaml(PRESETS / preset, **overrides)
    result = run_federated(config)
    (row,) = result.history
    assert row["method"] == preset_config["method"]
    assert len(row["clients"]) == (preset_config["clients_per_round"] or preset_config["num_clients"])
    assert np.isfinite(row["train_loss"]) and 0.0 <= row["eval_accuracy"] <= 1.0
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    # merging methods export at the smallest rank within 1 % of the federated model, never below 1
    assert adapter["r"] >= 1
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
