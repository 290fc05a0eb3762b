"""The MiSiCNet-style spatial baseline: simplex abundances by construction, recovery on a generated scene, the
minimum-volume penalty's pull, determinism and its settings' checks."""

from __future__ import annotations

import numpy as np
import pytest

from peft_fed.unmixing import evaluate_unmixing, spectral_angle_matrix, vca_fclsu
from peft_fed.unmixing.runner import run_method
from peft_fed.unmixing.spatial_autoencoder import (
    SpatialAutoencoderConfig,
    fit_spatial_autoencoder,
    minimum_simplex_loss,
)

SIDE = 16


@pytest.fixture(scope="module")
def no_pure_pixel_scene():
    synthetic = pytest.importorskip("peft_fed.unmixing.synthetic")
    pytest.importorskip("earthlib")
    return synthetic.generate_scene(
        synthetic.SyntheticSceneConfig(rows=SIDE, cols=SIDE, snr_db=40.0, pure_pixels=False, seed=0)
    )


def test_recovers_a_generated_scene_without_pure_pixels_better_than_its_vca_start(no_pure_pixel_scene):
    scene = no_pure_pixel_scene
    config = SpatialAutoencoderConfig(width=16, steps=400, show_progress=False)
    endmembers, abundances, reconstruction = fit_spatial_autoencoder(scene.cube, 3, config)
    assert endmembers.shape == (scene.num_bands, 3) and abundances.shape == (SIDE, SIDE, 3)
    assert abundances.min() >= 0.0
    np.testing.assert_allclose(abundances.sum(axis=-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(reconstruction, abundances @ endmembers.T, atol=1e-12)
    metrics = evaluate_unmixing(endmembers, abundances, scene.endmembers, scene.abundances)
    # Measured 0.154 rad / 0.052 (soil, vegetation, water: 0.05 / 0.04 / 0.37; water is dark, so small errors
    # are large angles); VCA + FCLSU, its starting point, gets 0.194 / 0.108 on this scene.
    assert metrics.sad_mean < 0.18 and metrics.armse < 0.07, (metrics.sad_mean, metrics.armse)
    vca_endmembers, vca_abundances = vca_fclsu(scene.pixels, 3, seed=0)
    start = evaluate_unmixing(vca_endmembers, vca_abundances.reshape(SIDE, SIDE, 3), scene.endmembers, scene.abundances)
    assert metrics.armse < start.armse and metrics.sad_mean < start.sad_mean


def test_a_heavy_volume_penalty_pulls_every_endmember_to_the_mean_spectrum(no_pure_pixel_scene):
    scene = no_pure_pixel_scene
    config = SpatialAutoencoderConfig(width=8, steps=150, volume_weight_per_pixel=1e5 / (SIDE * SIDE), learning_rate=1e-2, show_progress=False)
    endmembers, _, _ = fit_spatial_autoencoder(scene.cube, 3, config)
    mean_spectrum = scene.pixels.mean(axis=0)
    angles = spectral_angle_matrix(endmembers, mean_spectrum[:, None])
    assert angles.max() < 0.02, angles
    light = fit_spatial_autoencoder(
        scene.cube, 3, SpatialAutoencoderConfig(width=8, steps=150, volume_weight_per_pixel=0.0, learning_rate=1e-2, show_progress=False)
    )[0]
    assert spectral_angle_matrix(light, mean_spectrum[:, None]).max() > 0.1


def test_simplex_abundances_and_determinism_through_run_method(linear_scene_factory):
    scene, _ = linear_scene_factory(rows=9, cols=7, bands=12, p=3, noise=0.01)
    config = SpatialAutoencoderConfig(width=8, steps=20, show_progress=False)
    first = run_method(scene.cube, 3, "misicnet", seed=3, spatial_autoencoder_config=config)
    second = run_method(scene.cube, 3, "misicnet", seed=3, spatial_autoencoder_config=config)
    assert first.abundances.shape == (9, 7, 3) and first.abundances.min() >= 0.0
    np.testing.assert_allclose(first.abundances.sum(axis=-1), 1.0, atol=1e-12)
    assert np.array_equal(first.abundances, second.abundances) and np.array_equal(first.endmembers, second.endmembers)
    assert first.settings["spatial_autoencoder_config"]["seed"] == 3
    assert 0.0 <= first.endmembers.min() and first.endmembers.max() <= np.abs(scene.cube).max() + 1e-12


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 0}, "width must be an integer >= 1"),
        ({"steps": 2.5}, "steps must be an integer >= 1"),
        ({"volume_weight_per_pixel": -1.0}, "volume_weight_per_pixel must be >= 0"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"abundance_ema": 1.0}, r"abundance_ema must be in \[0, 1\)"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpatialAutoencoderConfig(**kwargs)


def test_more_endmembers_than_bands_is_refused():
    with pytest.raises(ValueError, match="between 2 and the 4 bands"):
        fit_spatial_autoencoder(np.ones((5, 5, 4)), 5, SpatialAutoencoderConfig(steps=1, show_progress=False))


def test_the_volume_term_keeps_the_papers_balance_on_any_image_size():
    # Duplicating every pixel doubles the data term; with lambda scaled by the pixel count the whole loss
    # doubles, so the minimiser does not move. A fixed lambda (the paper's 100 on any image) fails this.
    import torch

    generator = torch.Generator().manual_seed(0)
    target = torch.rand(50, 6, generator=generator, dtype=torch.float64)
    reconstruction = torch.rand(50, 6, generator=generator, dtype=torch.float64)
    endmembers = torch.rand(6, 3, generator=generator, dtype=torch.float64)
    data_mean = target.mean(dim=0)
    single = minimum_simplex_loss(reconstruction, target, endmembers, data_mean, 0.3)
    doubled = minimum_simplex_loss(
        torch.cat([reconstruction, reconstruction]), torch.cat([target, target]), endmembers, data_mean, 0.3
    )
    torch.testing.assert_close(doubled, 2 * single, rtol=1e-12, atol=0)
    data_term = 0.5 * torch.sum((reconstruction - target) ** 2)
    volume_term = torch.sum((endmembers - data_mean[:, None]) ** 2)
    torch.testing.assert_close(single, data_term + 0.3 * 50 * volume_term, rtol=1e-12, atol=0)
    assert SpatialAutoencoderConfig().volume_weight_per_pixel * 95 * 95 == pytest.approx(100.0)
