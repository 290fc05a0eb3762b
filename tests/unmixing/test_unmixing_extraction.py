import numpy as np
import pytest

from peft_fed.unmixing.extraction import estimate_snr_db, nfindr, vca
from peft_fed.unmixing.metrics import evaluate_unmixing


@pytest.mark.parametrize("extractor", [vca, nfindr])
@pytest.mark.parametrize("seed", [0, 1])
def test_extractors_find_the_pure_pixels_of_a_noiseless_scene(extractor, seed, linear_scene_factory):
    scene, pure = linear_scene_factory(rows=25, cols=25, bands=40, p=4, seed=seed, pure_per_endmember=1)
    indices, endmembers = extractor(scene.pixels, 4, seed=seed)
    assert sorted(indices.tolist()) == sorted(pure.ravel().tolist())
    metrics = evaluate_unmixing(endmembers, scene.abundances, reference_endmembers=scene.endmembers)
    assert metrics.sad_mean < 1e-7
    assert np.allclose(endmembers, scene.pixels[indices].T)


def test_vca_low_snr_branch_still_returns_pixels(linear_scene_factory):
    scene, _ = linear_scene_factory(rows=15, cols=15, bands=30, p=3, noise=0.2)
    assert estimate_snr_db(scene.pixels, 3) < 15 + 10 * np.log10(3)
    indices, endmembers = vca(scene.pixels, 3, seed=0)
    assert len(set(indices.tolist())) == 3
    assert np.allclose(endmembers, scene.pixels[indices].T)


def test_nfindr_initial_indices_and_restarts(linear_scene_factory):
    scene, pure = linear_scene_factory(rows=15, cols=15, bands=30, p=3, pure_per_endmember=1)
    indices, _ = nfindr(scene.pixels, 3, initial_indices=np.array([0, 1, 2]))
    assert sorted(indices.tolist()) == sorted(pure.ravel().tolist())
    restarted, _ = nfindr(scene.pixels, 3, seed=3, num_restarts=3)
    assert sorted(restarted.tolist()) == sorted(pure.ravel().tolist())


def test_extractors_validate_num_endmembers():
    pixels = np.random.default_rng(0).uniform(size=(50, 10))
    with pytest.raises(ValueError, match="num_endmembers"):
        vca(pixels, 0)
    with pytest.raises(ValueError, match="num_endmembers"):
        nfindr(pixels, 1)
