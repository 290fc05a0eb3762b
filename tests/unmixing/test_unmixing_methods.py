import numpy as np
import pytest

from peft_fed.unmixing.autoencoder import AutoencoderConfig
from peft_fed.unmixing.config import GaussTrainingConfig
from peft_fed.unmixing.runner import METHODS, run_method
from peft_fed.unmixing.spatial_autoencoder import SpatialAutoencoderConfig

FAST_GAUSS = GaussTrainingConfig(stage1_steps=30, blind_steps=30, batch_size=64, show_progress=False)
FAST_AE = AutoencoderConfig(steps=30, batch_size=64, show_progress=False)
FAST_SPATIAL = SpatialAutoencoderConfig(width=8, steps=20, show_progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_simplex_abundances(method, linear_scene_factory):
    scene, _ = linear_scene_factory(rows=10, cols=10, bands=20, p=3, noise=0.01)
    result = run_method(
        scene.cube,
        3,
        method,
        seed=0,
        gauss_training=FAST_GAUSS,
        autoencoder_config=FAST_AE,
        spatial_autoencoder_config=FAST_SPATIAL,
    )
    assert result.abundances.shape == (10, 10, 3)
    assert result.endmembers.shape == (20, 3)
    assert result.reconstruction.shape == scene.cube.shape
    assert result.abundances.min() >= 0.0
    assert np.allclose(result.abundances.sum(axis=-1), 1.0, atol=1e-5)
    assert result.wall_time_s >= 0 and result.settings["method"] == method


def test_kmeans_fclsu_mode_and_bad_method(linear_scene_factory):
    scene, _ = linear_scene_factory(rows=8, cols=8, bands=10, p=3)
    result = run_method(scene.cube, 3, "kmeans", kmeans_abundances="fclsu")
    assert result.abundances.min() >= 0 and np.allclose(result.abundances.sum(-1), 1.0)
    with pytest.raises(ValueError, match="unknown method"):
        run_method(scene.cube, 3, "pca")
    with pytest.raises(ValueError, match="num_endmembers"):
        run_method(scene.cube, 1, "vca_fclsu")
