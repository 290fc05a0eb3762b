"""A strategy's declared capabilities match what it does, so runtimes can trust them instead of testing names."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from strategy_sim import play_round, quadratic_gradient_fn

from peft_fed.strategies import STRATEGIES, Strategy, method_hyperparameters
from peft_fed.strategies.hyperparameters import NoHyperparameters


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_declared_capabilities_match_behaviour(name, build, specs, new_clients):
    cls = STRATEGIES[name]
    assert cls.has_client_loss == (cls.client_loss is not Strategy.client_loss)
    strategy = build(name, specs, num_rounds=4)
    clients = new_clients(2)
    state, _ = strategy.init_server(base_weights={n: torch.randn(s.out_features, s.in_features, dtype=torch.float64)
                                                  for n, s in specs.items()})
    gradient_fn = quadratic_gradient_fn(specs) if strategy.needs_gradient else None
    result, _, _, starts = play_round(strategy, state, clients, ["0", "1"], {"0": 1, "1": 2},
                                      torch.Generator().manual_seed(0), gradient_fn)
    assert bool(result.backbone_update) == cls.merges_into_backbone
    assert any(c.layers for c in clients.values()) == cls.keeps_client_state
    assert (strategy.gradient_batches() > 0) == cls.needs_gradient
    if cls.has_client_loss:
        live = starts[0].factors
        assert strategy.client_loss(live, starts[0]) is not None


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_hyperparameters_are_one_validated_dataclass(name):
    hyperparameters = method_hyperparameters(name)
    assert dataclasses.is_dataclass(hyperparameters) and issubclass(hyperparameters, NoHyperparameters)
    defaults = hyperparameters()
    for f in dataclasses.fields(hyperparameters):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
        assert getattr(defaults, f.name) == (f.default if f.default is not dataclasses.MISSING else f.default_factory())


def test_unknown_hyperparameter_names_the_method(specs):
    with pytest.raises(TypeError, match=r"FedIT got unknown hyperparameter\(s\) \['zeta'\]"):
        STRATEGIES["fedit"](specs, zeta=0.5)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_follows_run_length_only_with_a_schedule(name, build, specs):
    """A method whose hyperparameters follow ``num_rounds`` says so (resumes then keep num_rounds fixed)."""
    strategy = build(name, specs, num_rounds=4)
    schedules = {f.name: getattr(strategy.hyperparameters, f.name) for f in dataclasses.fields(strategy.hyperparameters)
                 if f.name.endswith("_schedule")}
    assert (strategy.follows_run_length() is not None) == any(v != "constant" for v in schedules.values())
    if schedules:
        cosine = build(name, specs, num_rounds=4, **{k: "cosine" for k in schedules})
        assert cosine.follows_run_length() == f"{next(iter(schedules))}='cosine'"
