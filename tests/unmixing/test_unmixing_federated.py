"""Federated unmixing with LoRA: validation, what is trained, determinism, an exact equivalence, bytes, and
that adaptation helps on a shifted target scene."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from peft_fed import peft_bridge
from peft_fed.unmixing import (
    FederatedUnmixingConfig,
    GaussConfig,
    GaussTrainingConfig,
    HyperspectralScene,
    fit_gauss,
    run_centralised,
    run_federated_unmixing,
    run_local_only,
    tile_pixel_indices,
)

ROWS = COLS = 12
BANDS, P = 16, 3
MODEL = GaussConfig(
    num_bands=BANDS, num_endmembers=P, an_hidden_dim=16, un_hidden_dims=(16, 8), mn_hidden_dims=(8, 16)
)
TRAINING = GaussTrainingConfig(stage1_steps=300, blind_steps=200, batch_size=64, show_progress=False, seed=0)
FAST = dict(rank=2, alpha=4.0, num_rounds=2, local_steps=5, show_progress=False)


def _scene(endmembers: np.ndarray, seed: int, noise: float) -> HyperspectralScene:
    rng = np.random.default_rng(seed)
    abundances = rng.dirichlet(np.full(P, 0.7), size=ROWS * COLS)
    cube = abundances @ endmembers.T + noise * rng.standard_normal((ROWS * COLS, BANDS))
    return HyperspectralScene(
        cube=cube.reshape(ROWS, COLS, BANDS),
        endmembers=endmembers,
        abundances=abundances.reshape(ROWS, COLS, P),
    )


@pytest.fixture(scope="module")
def setting():
    """A source model trained on one scene, and a target scene of the same materials under a smooth spectral
    shift (other abundances, other noise), split into 2 x 2 tiles."""
    endmembers = np.random.default_rng(0).uniform(0.1, 1.0, size=(BANDS, P))
    source = _scene(endmembers, seed=1, noise=0.005)
    shifted = endmembers * (1.0 + 0.3 * np.linspace(-1.0, 1.0, BANDS))[:, None]
    target = _scene(shifted, seed=2, noise=0.01)
    torch.set_num_threads(1)
    model = fit_gauss(source.cube, P, "gauss_blind", model_config=MODEL, training_config=TRAINING).model
    return model, target, tile_pixel_indices(ROWS, COLS, ROWS // 2, COLS // 2)


def _rows(result):
    return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in result.history]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "fedprox_lora"}, "unknown federated method"),
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"num_rounds": 0}, "num_rounds must be"),
        ({"local_steps": 1.5}, "local_steps must be"),
        ({"clients_per_round": 0}, "clients_per_round must be"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"learning_rate": -1.0}, "learning_rate must be > 0"),
        ({"target_modules": ()}, "target_modules must name"),
        ({"rank_pattern": {"mixing.linear": 0}}, r"rank_pattern\['mixing.linear'\]"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FederatedUnmixingConfig(**kwargs)


def test_config_accepts_aliases():
    assert FederatedUnmixingConfig(method="FedAvg").method == "fedit"


def test_bad_inputs_are_rejected_with_clear_errors(setting):
    model, target, tiles = setting
    config = FederatedUnmixingConfig(**FAST)
    with pytest.raises(ValueError, match="blind_pseudo_weight=0"):
        run_federated_unmixing(model, target, tiles, config, GaussTrainingConfig(blind_pseudo_weight=0.1))
    with pytest.raises(ValueError, match="clients_per_round=5 is more than the 4 clients"):
        run_federated_unmixing(
            model, target, tiles, FederatedUnmixingConfig(**{**FAST, "clients_per_round": 5})
        )
    with pytest.raises(ValueError, match="client 1 has no pixels"):
        run_local_only(model, target, [tiles[0], np.array([], dtype=int)], config, TRAINING)
    with pytest.raises(ValueError, match="outside"):
        run_centralised(model, target, [np.array([0, ROWS * COLS])], config, TRAINING)
    # FedSmoothLoRA's gradient-aligned init needs 2r <= min(in, out): r=5 does not fit the 16 -> 8 layer
    with pytest.raises(ValueError, match=r"needs 2r <= min\(m, n\)"):
        run_federated_unmixing(model, target, tiles, FederatedUnmixingConfig(**{**FAST, "rank": 5}), TRAINING)


@pytest.mark.parametrize("method", ["fedit", "fedsmoothlora"])
def test_only_the_adapters_are_trained(setting, method):
    model, target, tiles = setting
    before = copy.deepcopy(model.state_dict())
    result = run_federated_unmixing(
        model, target, tiles, FederatedUnmixingConfig(method=method, **FAST), TRAINING
    )
    for name, value in model.state_dict().items():  # the source model is never touched
        assert torch.equal(value, before[name]), name
    adapted = result.model
    assert all("lora_" in name for name, p in adapted.named_parameters() if p.requires_grad)
    adapted_layers = peft_bridge.layer_specs(adapted)
    # every non-adapted tensor (biases, buffers) is the source's, bit for bit
    for name, value in adapted.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        if key.removesuffix(".weight") not in adapted_layers:
            assert torch.equal(value, before[key]), name
    # the adapted layers' frozen weights change only by the strategy's merged backbone updates
    history = result.server_state.backbone_history
    assert (len(history) > 0) == (method == "fedsmoothlora")
    for layer, weight in peft_bridge.base_weights(adapted).items():
        expected = before[f"{layer}.weight"] + sum(
            (update[layer].dense() for update in history), torch.zeros_like(weight)
        )
        assert torch.allclose(weight, expected, atol=1e-6), layer


def test_federated_run_is_deterministic(setting):
    model, target, tiles = setting
    config = FederatedUnmixingConfig(method="fedsmoothlora", clients_per_round=2, **FAST)
    first = run_federated_unmixing(model, target, tiles, config, TRAINING)
    second = run_federated_unmixing(model, target, tiles, config, TRAINING)
    assert _rows(first) == _rows(second)
    assert np.array_equal(first.abundances, second.abundances)
    assert all(len(row["clients"]) == 2 for row in first.history[1:])


def test_fedit_with_one_client_for_one_round_equals_that_clients_local_only_run(setting):
    # FedIT's server averages with weight 1 when one client takes part, so after one round the global adapter
    # is that client's trained adapter: the same start, optimizer and batches as its local-only run.
    model, target, tiles = setting
    config = FederatedUnmixingConfig(method="fedit", **{**FAST, "num_rounds": 1, "local_steps": 8})
    federated = run_federated_unmixing(model, target, tiles[:1], config, TRAINING)
    local = run_local_only(model, target, tiles[:1], config, TRAINING)
    fed_factors, local_factors = (
        peft_bridge.get_factors(federated.model),
        peft_bridge.get_factors(local.model),
    )
    for name, factor in fed_factors.items():
        assert torch.equal(factor.A, local_factors[name].A) and torch.equal(factor.B, local_factors[name].B)
    for key in ("sad_mean", "armse", "reconstruction_rmse"):
        assert federated.final[key] == local.final[key]
    assert not torch.equal(fed_factors["mixing.linear"].B, torch.zeros_like(fed_factors["mixing.linear"].B))


def test_bytes_are_the_exact_adapter_sizes(setting):
    model, target, tiles = setting
    result = run_federated_unmixing(
        model, target, tiles, FederatedUnmixingConfig(method="fedit", **FAST), TRAINING
    )
    specs = peft_bridge.layer_specs(result.model).values()
    adapter_bytes = sum(4 * s.rank * (s.in_features + s.out_features) for s in specs)  # float32 B and A
    for row in result.history[1:]:
        assert row["uplink_bytes"] == row["downlink_bytes"] == len(tiles) * adapter_bytes
    assert result.final["uplink_bytes_total"] == FAST["num_rounds"] * len(tiles) * adapter_bytes


def test_the_client_loss_term_reaches_local_training(setting):
    # Subspace-Reg's regulariser is added through the optimizer: a huge weight must change the outcome.
    model, target, tiles = setting
    plain = FederatedUnmixingConfig(
        method="subspace_reg", method_kwargs={"mu": 0.0, "beta": 0.0, "lam": 0.0}, **FAST
    )
    heavy = FederatedUnmixingConfig(
        method="subspace_reg", method_kwargs={"mu": 0.0, "beta": 0.0, "lam": 50.0}, **FAST
    )
    weak = run_federated_unmixing(model, target, tiles, plain, TRAINING)
    strong = run_federated_unmixing(model, target, tiles, heavy, TRAINING)
    weak_norm = sum(float(f.dense().norm()) for f in peft_bridge.get_factors(weak.model).values())
    strong_norm = sum(float(f.dense().norm()) for f in peft_bridge.get_factors(strong.model).values())
    assert strong_norm < 0.5 * weak_norm


def test_adaptation_lowers_the_target_reconstruction_error(setting):
    model, target, tiles = setting
    config = FederatedUnmixingConfig(
        method="fedsmoothlora", **{**FAST, "num_rounds": 4, "local_steps": 15, "learning_rate": 3e-3}
    )
    for result in (
        run_federated_unmixing(model, target, tiles, config, TRAINING),
        run_centralised(model, target, tiles, config, TRAINING),
    ):
        start, end = result.history[0]["reconstruction_rmse"], result.final["reconstruction_rmse"]
        assert end < 0.8 * start, (result.setting, start, end)
    local = run_local_only(model, target, tiles, config, TRAINING)
    assert len(local.history) == config.num_rounds + 1 and len(local.history[-1]["per_client"]) == len(tiles)


def test_a_client_whose_training_turns_nan_is_dropped_and_the_rest_aggregate_exactly(setting):
    # The second client holds one pixel of NaNs (the far corner, outside every window of the first tile), so its
    # local training turns the adapter NaN. The engine must drop it each round, and FedIT must then equal a run
    # with the first client alone, factor for factor.
    model, target, tiles = setting
    poisoned = copy.deepcopy(target)
    poisoned.cube[-1, -1] = np.nan  # after the scene's own check: the clients, not the loader, meet it
    corner = np.array([ROWS * COLS - 1])
    config = FederatedUnmixingConfig(method="fedit", **FAST)
    with_nan_client = run_federated_unmixing(model, poisoned, [tiles[0], corner], config, TRAINING)
    alone = run_federated_unmixing(model, target, [tiles[0]], config, TRAINING)
    for row in with_nan_client.history[1:]:
        assert list(row["dropped_clients"]) == ["1"]
        assert row["clients"] == ["0", "1"]
    dropped_factors = peft_bridge.get_factors(with_nan_client.model)
    alone_factors = peft_bridge.get_factors(alone.model)
    for name, factor in alone_factors.items():
        assert torch.equal(dropped_factors[name].A, factor.A) and torch.equal(dropped_factors[name].B, factor.B)
        assert torch.isfinite(factor.B).all()
