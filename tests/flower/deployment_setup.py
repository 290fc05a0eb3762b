"""Shared by the deployment tests: a tiny stand-in model, small run settings, and the simulation to compare with."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from peft_fed import peft_bridge
from peft_fed.engine import ClientRecord, ClientTask
from peft_fed.runtime.checkpoint import latest_checkpoint, load_checkpoint
from peft_fed.runtime.pipeline import FederatedRunConfig, load_run
from peft_fed.runtime.trainer import FederatedTrainer


def small_settings(model: str, method: str, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    settings = dict(
        model=model, dataset="wordnet_mc", method=method, num_clients=2, clients_per_round=2, num_rounds=2,
        local_steps=2, per_device_train_batch_size=4, max_length=32, max_train_samples=60, max_eval_samples=16,
        seed=3, save_every=1, disable_tqdm=True, lora_dropout=0.0, output_dir=str(output_dir),
    )  # fmt: skip
    if method == "fedsmoothlora":
        settings["num_gradient_batches"] = 2
    settings.update(overrides)
    return settings


class _DroppingExecutor:
    """The simulation's executor, with the given ``(round_index, client_id)`` records turned into failures."""

    def __init__(self, trainer: FederatedTrainer, drop: Collection[tuple[int, str]]) -> None:
        self.trainer, self.drop = trainer, set(drop)

    def train_clients(self, round_index: int, tasks: Sequence[ClientTask]) -> list[ClientRecord]:
        records = self.trainer.train_clients(round_index, tasks)
        return [
            ClientRecord(r.client_id, None, None, None, r.num_samples, failure="lost")
            if (round_index, r.client_id) in self.drop
            else r
            for r in records
        ]

    def apply_backbone_update(self, update) -> None:
        self.trainer.apply_backbone_update(update)


_SIMULATIONS: dict[str, dict[str, Any]] = {}


def simulate(settings: Mapping[str, Any], drop: Collection[tuple[int, str]] = ()) -> dict[str, Any]:
    """The simulation of ``settings`` (``FederatedTrainer``), optionally losing clients' updates in given rounds;
    computed once per test session for the same settings (the output folder aside)."""
    key = json.dumps([{k: v for k, v in settings.items() if k != "output_dir"}, sorted(drop)], sort_keys=True, default=str)
    if key not in _SIMULATIONS:
        _SIMULATIONS[key] = _simulate(settings, drop)
    return _SIMULATIONS[key]


def _simulate(settings: Mapping[str, Any], drop: Collection[tuple[int, str]]) -> dict[str, Any]:
    config = FederatedRunConfig.from_dict(settings)
    run = load_run(config)
    trainer = FederatedTrainer(
        model=run.model, args=config.training_args, client_datasets=run.client_train, eval_dataset=run.evaluation,
        **run.trainer_kwargs(),
    )  # fmt: skip
    if drop:
        trainer.engine.executor = _DroppingExecutor(trainer, drop)
    history = trainer.train()
    return {"state": trainer.server_state, "backbone": peft_bridge.base_weights(trainer.model), "history": history}


def deployed_result(output_dir: str | Path) -> dict[str, Any]:
    """What a deployment's server left in its run folder (its last checkpoint and metrics)."""
    checkpoint = load_checkpoint(latest_checkpoint(output_dir))
    return {
        "state": checkpoint.server_state,
        "backbone": checkpoint.backbone,
        "history": checkpoint.meta["history"],
        "client_states": checkpoint.client_states,
    }


def assert_same_result(deployed: Mapping[str, Any], simulated: Mapping[str, Any], atol: float = 1e-6) -> None:
    ours, _ = deployed["state"].state_dict()
    theirs, _ = simulated["state"].state_dict()
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=atol, rtol=1e-5, msg=lambda text, name=name: f"{name}: {text}")
    for name, weight in simulated["backbone"].items():
        torch.testing.assert_close(deployed["backbone"][name], weight, atol=atol, rtol=1e-5, msg=lambda text, name=name: f"{name}: {text}")
    for mine, reference in zip(deployed["history"], simulated["history"], strict=True):
        assert mine["clients"] == reference["clients"]
        assert set(mine["dropped_clients"]) == set(reference["dropped_clients"])
        assert abs(mine["train_loss"] - reference["train_loss"]) < 1e-6
