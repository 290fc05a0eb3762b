"""The blind stage's settings chosen in issue 17: the minimum-volume pull and early stopping on held-out
reconstruction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from peft_fed.unmixing.config import GaussConfig, GaussTrainingConfig
from peft_fed.unmixing.metrics import spectral_angle_matrix
from peft_fed.unmixing.model import GaussModel
from peft_fed.unmixing.patches import PixelWindows
from peft_fed.unmixing.train import fit_gauss, gauss_losses, predict, train_with_early_stopping

FAST = dict(stage1_steps=40, blind_steps=60, batch_size=64, show_progress=False)


def _outputs_and_centres(scale: float = 2.0):
    torch.manual_seed(0)
    model = GaussModel(GaussConfig(num_bands=12, num_endmembers=3), data_scale=scale)
    window = torch.rand(16, 9, 12) * scale
    return model, model(window), window[:, 4]


def test_the_volume_term_is_the_mean_squared_distance_of_the_mn_endmembers_to_the_batch_mean():
    model, outputs, centres = _outputs_and_centres()
    config = GaussTrainingConfig(blind_volume_weight=0.5)
    with_volume = gauss_losses(outputs, centres, None, config, blind=True, data_scale=2.0, mixing=model.mixing)
    without = gauss_losses(
        outputs, centres, None, GaussTrainingConfig(), blind=True, data_scale=2.0, mixing=model.mixing
    )
    expected = torch.mean((model.mixing(torch.eye(3)) - (centres / 2.0).mean(dim=0)) ** 2)
    torch.testing.assert_close(with_volume["volume"], expected)
    torch.testing.assert_close(with_volume["total"] - without["total"], 0.5 * expected)
    assert "volume" not in without
    # Stage 1 never has it: there the MN's input is detached and the pseudo ground truth guides the UN.
    assert "volume" not in gauss_losses(outputs, centres, None, config, blind=False, data_scale=2.0, mixing=model.mixing)


def test_a_heavy_volume_weight_pulls_the_blind_endmembers_to_the_mean_spectrum(linear_scene_factory):
    scene, _ = linear_scene_factory(rows=12, cols=12, bands=16, p=3, noise=0.01)
    mean_spectrum = scene.pixels.mean(axis=0)[:, None]

    def largest_angle_to_the_mean(volume_weight: float) -> float:
        config = GaussTrainingConfig(**{**FAST, "blind_steps": 150}, blind_volume_weight=volume_weight, seed=0)
        endmembers = fit_gauss(scene.cube, 3, "gauss_blind", training_config=config).endmembers
        return float(spectral_angle_matrix(endmembers, mean_spectrum).max())

    assert largest_angle_to_the_mean(1e4) < 0.5 * largest_angle_to_the_mean(0.0)


def test_early_stopping_keeps_the_parameters_of_the_lowest_error_including_the_start():
    model = nn.Linear(1, 1, bias=False)
    scripted = iter([5.0, 3.0, 1.0, 2.0])  # errors at steps 0, 4, 8 and 10 (the last chunk has 2 steps)
    chunks: list[int] = []

    def train_chunk(steps: int) -> list[dict[str, float]]:
        chunks.append(steps)
        with torch.no_grad():
            model.weight.fill_(float(len(chunks)))  # the parameters name the chunk they came from
        return [{"total": 0.0}] * steps

    history, checks = train_with_early_stopping(model, train_chunk, lambda: next(scripted), steps=10, check_every=4)
    assert chunks == [4, 4, 2] and len(history) == 10
    assert [c["step"] for c in checks] == [0, 4, 8, 10]
    assert [c["kept"] for c in checks] == [0.0, 0.0, 1.0, 0.0]
    assert model.weight.item() == 2.0

    # A stage that only makes things worse is undone: the starting parameters come back.
    with torch.no_grad():
        model.weight.fill_(-7.0)
    worse = iter([1.0, 2.0, 3.0])
    chunks.clear()
    train_with_early_stopping(model, train_chunk, lambda: next(worse), steps=4, check_every=2)
    assert model.weight.item() == -7.0


def test_fit_gauss_stops_the_blind_stage_at_its_lowest_held_out_error(linear_scene_factory):
    scene, _ = linear_scene_factory(rows=12, cols=12, bands=16, p=3, noise=0.01)
    config = GaussTrainingConfig(
        **FAST, blind_holdout_fraction=0.25, blind_check_every=20, blind_learning_rate=3e-2, seed=3
    )
    result = fit_gauss(scene.cube, 3, "gauss_blind", training_config=config)
    checks = result.history["blind_checks"]
    assert [c["step"] for c in checks] == [0, 20, 40, 60]
    kept = [c for c in checks if c["kept"]]
    assert len(kept) >= 1 and kept[0]["error"] == min(c["error"] for c in checks)
    # The split the fit used: a seeded quarter of the pixels, never trained on in the blind stage.
    pixels = scene.pixels
    held_out = np.sort(np.random.default_rng(3).permutation(len(pixels))[: int(round(0.25 * len(pixels)))])
    scale = float(np.max(np.abs(scene.cube)))
    windows = PixelWindows(scene.cube, 3)
    reconstruction = predict(result.model, windows, held_out)["reconstruction"] / scale
    error = float(np.mean((reconstruction - pixels[held_out] / scale) ** 2))
    assert error == pytest.approx(kept[0]["error"], rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"blind_volume_weight": -0.1}, "blind_volume_weight must be >= 0"),
        ({"blind_holdout_fraction": 1.0}, r"blind_holdout_fraction must be in \[0, 1\)"),
        ({"blind_holdout_fraction": -0.1}, r"blind_holdout_fraction must be in \[0, 1\)"),
        ({"blind_check_every": 0}, "blind_check_every must be >= 1"),
    ],
)
def test_blind_stage_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaussTrainingConfig(**kwargs)


def test_cli_flags_of_the_new_settings_reach_the_run(tmp_path, linear_scene_factory):
    from peft_fed.unmixing.cli import main

    scene, _ = linear_scene_factory(rows=8, cols=8, bands=10, p=3)
    np.save(tmp_path / "cube.npy", scene.cube)
    common = ["--data", str(tmp_path / "cube.npy"), "--num_endmembers", "3", "--no_progress", "--no_plots"]
    gauss = [
        *common,
        *("--method", "gauss_blind", "--stage1_steps", "10", "--blind_steps", "10", "--batch_size", "16"),
        *("--blind_volume_weight", "0.25", "--blind_holdout_fraction", "0.2", "--blind_check_every", "5"),
        *("--output_dir", str(tmp_path / "gauss")),
    ]
    assert main(gauss) == 0
    training = json.loads((tmp_path / "gauss" / "results.json").read_text())["settings"]["gauss_training"]
    assert (training["blind_volume_weight"], training["blind_holdout_fraction"], training["blind_check_every"]) == (
        0.25,
        0.2,
        5,
    )
    misicnet = [
        *common,
        *("--method", "misicnet", "--misicnet_steps", "2", "--misicnet_width", "4"),
        *("--misicnet_volume_weight_per_pixel", "0.5", "--output_dir", str(tmp_path / "misicnet")),
    ]
    assert main(misicnet) == 0
    settings = json.loads((tmp_path / "misicnet" / "results.json").read_text())["settings"]
    assert settings["spatial_autoencoder_config"]["volume_weight_per_pixel"] == 0.5


@pytest.mark.parametrize("holdout", [0.0, 0.2])
def test_a_frozen_mixing_blind_stage_keeps_stage_ones_endmembers_and_refits_the_abundances(
    linear_scene_factory, holdout
):
    scene, _ = linear_scene_factory(rows=10, cols=10, bands=12, p=3, noise=0.01)
    config = GaussTrainingConfig(
        **FAST, blind_freeze_mixing=True, blind_holdout_fraction=holdout, blind_check_every=20, seed=1
    )
    result = fit_gauss(scene.cube, 3, "gauss_blind", training_config=config)
    # The MN did not move (not even by the non-negativity clamp), the UN did, and the MN trains again afterwards.
    np.testing.assert_array_equal(result.endmembers, result.stage1["endmembers"])
    assert not np.allclose(result.abundances, result.stage1["abundances"])
    assert all(parameter.requires_grad for parameter in result.model.mixing.parameters())
    # The same stage 1 as the joined blind stage (same seed): only the blind stage differs.
    joined = fit_gauss(
        scene.cube, 3, "gauss_blind", training_config=GaussTrainingConfig(**{**config.to_dict(), "blind_freeze_mixing": False})
    )
    np.testing.assert_array_equal(joined.stage1["endmembers"], result.stage1["endmembers"])
    assert not np.allclose(joined.endmembers, joined.stage1["endmembers"])


def test_a_frozen_mixing_blind_stage_refuses_the_volume_pull_and_federated_adaptation():
    with pytest.raises(ValueError, match="blind_freeze_mixing holds fixed"):
        GaussTrainingConfig(blind_freeze_mixing=True, blind_volume_weight=0.1)
    from peft_fed.unmixing.federated import _blind_config

    with pytest.raises(ValueError, match="leave the MN's layers out of target_modules"):
        _blind_config(GaussTrainingConfig(blind_freeze_mixing=True))


def test_the_frozen_mixing_flag_reaches_the_run(tmp_path, linear_scene_factory):
    from peft_fed.unmixing.cli import main

    scene, _ = linear_scene_factory(rows=8, cols=8, bands=10, p=3)
    np.save(tmp_path / "cube.npy", scene.cube)
    arguments = [
        *("--data", str(tmp_path / "cube.npy"), "--num_endmembers", "3", "--no_progress", "--no_plots"),
        *("--method", "gauss_blind", "--stage1_steps", "10", "--blind_steps", "10", "--batch_size", "16"),
        *("--blind_freeze_mixing", "--output_dir", str(tmp_path / "frozen")),
    ]
    assert main(arguments) == 0
    assert json.loads((tmp_path / "frozen" / "results.json").read_text())["settings"]["gauss_training"][
        "blind_freeze_mixing"
    ]
