"""k-means with more clusters than endmembers, merged back to p by spectral angle (issue 17, item 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peft_fed.unmixing.baselines import kmeans_clustering, merge_clusters_by_angle
from peft_fed.unmixing.config import GaussTrainingConfig
from peft_fed.unmixing.train import fit_gauss, pseudo_ground_truth


def _bright_and_dark_material(per_kind: int = 40, bands: int = 10, noise: float = 0.01, seed: int = 0):
    """Pure pixels of three materials; material 0 comes bright (x1) and in shade (x0.2).

    In Euclidean distance the two brightness levels of material 0 are farther apart (2.5) than materials 1 and 2
    (0.8), so k-means with k = 3 spends two clusters on material 0 and puts 1 and 2 together; by spectral angle
    the shade is material 0 and 1, 2 differ.
    """
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-1.0, 1.0, bands)
    flat = np.ones(bands)
    kinds = [flat, 0.2 * flat, 0.5 + 0.2 * ramp, 0.5 - 0.2 * ramp]
    pixels = np.concatenate([np.tile(spectrum, (per_kind, 1)) for spectrum in kinds])
    pixels = pixels + noise * rng.standard_normal(pixels.shape)
    material = np.repeat([0, 0, 1, 2], per_kind)
    return pixels, material


def _same_partition(labels: np.ndarray, truth: np.ndarray) -> bool:
    return all(len(set(labels[truth == t])) == 1 for t in np.unique(truth)) and len(set(labels)) == len(set(truth))


def test_extra_clusters_merged_by_angle_recover_materials_that_k_equals_p_confuses():
    pixels, material = _bright_and_dark_material()
    plain = pseudo_ground_truth(pixels, 3, seed=0).argmax(axis=1)
    assert not _same_partition(plain, material)  # k = p splits the shade off and merges materials 1 and 2
    assert plain[material == 1][0] == plain[material == 2][0]
    for per_endmember in (2, 3):
        targets = pseudo_ground_truth(pixels, 3, seed=0, kmeans_clusters_per_endmember=per_endmember)
        assert targets.shape == (len(pixels), 3)
        np.testing.assert_array_equal(targets.sum(axis=1), 1.0)  # one-hot
        assert _same_partition(targets.argmax(axis=1), material)


def test_one_cluster_per_endmember_is_plain_k_means_exactly():
    rng = np.random.default_rng(1)
    pixels = rng.random((200, 12))
    labels, _ = kmeans_clustering(pixels, 4, seed=3)
    np.testing.assert_array_equal(pseudo_ground_truth(pixels, 4, seed=3), np.eye(4)[labels])
    np.testing.assert_array_equal(
        pseudo_ground_truth(pixels, 4, seed=3, kmeans_clusters_per_endmember=1), np.eye(4)[labels]
    )
    assert GaussTrainingConfig().kmeans_clusters_per_endmember == 1


def test_the_default_fit_is_unchanged_and_the_setting_reaches_the_pseudo_ground_truth(linear_scene_factory):
    scene, _ = linear_scene_factory(rows=10, cols=10, bands=12, p=3, noise=0.01)
    fast = dict(stage1_steps=15, blind_steps=0, batch_size=32, show_progress=False, seed=2)
    default = fit_gauss(scene.cube, 3, "gauss", training_config=GaussTrainingConfig(**fast))
    explicit = fit_gauss(
        scene.cube, 3, "gauss", training_config=GaussTrainingConfig(**fast, kmeans_clusters_per_endmember=1)
    )
    np.testing.assert_array_equal(default.endmembers, explicit.endmembers)
    np.testing.assert_array_equal(default.abundances, explicit.abundances)
    labels, _ = kmeans_clustering(scene.pixels, 3, seed=2)
    np.testing.assert_array_equal(default.pseudo_targets, np.eye(3)[labels])

    merged = fit_gauss(
        scene.cube, 3, "gauss", training_config=GaussTrainingConfig(**fast, kmeans_clusters_per_endmember=3)
    )
    expected = pseudo_ground_truth(scene.pixels, 3, seed=2, kmeans_clusters_per_endmember=3)
    np.testing.assert_array_equal(merged.pseudo_targets, expected)
    assert merged.pseudo_targets.shape == (100, 3)


def test_merging_is_numbered_by_first_member_and_returns_the_groups_means():
    pixels, material = _bright_and_dark_material(per_kind=10)
    labels, means = kmeans_clustering(pixels, 6, seed=0)
    merged, group_means = merge_clusters_by_angle(pixels, labels, means, 3)
    assert merged[0] == 0 and set(merged) == {0, 1, 2}
    _, first = np.unique(merged, return_index=True)
    assert list(first) == sorted(first)
    for group in range(3):
        np.testing.assert_allclose(group_means[:, group], pixels[merged == group].mean(axis=0))
    # As many groups as clusters: nothing to merge.
    same, same_means = merge_clusters_by_angle(pixels, labels, means, 6)
    np.testing.assert_array_equal(same, labels)
    with pytest.raises(ValueError, match="num_groups must be in"):
        merge_clusters_by_angle(pixels, labels, means, 7)


def test_kmeans_clusters_per_endmember_rejects_values_below_one():
    with pytest.raises(ValueError, match="kmeans_clusters_per_endmember must be >= 1, got 0"):
        GaussTrainingConfig(kmeans_clusters_per_endmember=0)


def test_cli_flag_reaches_the_run_and_a_bad_value_is_one_line(tmp_path, linear_scene_factory, capsys):
    from peft_fed.unmixing.cli import main

    scene, _ = linear_scene_factory(rows=8, cols=8, bands=10, p=3)
    np.save(tmp_path / "cube.npy", scene.cube)
    common = ["--data", str(tmp_path / "cube.npy"), "--num_endmembers", "3", "--no_progress", "--no_plots"]
    common += ["--method", "gauss", "--stage1_steps", "5", "--batch_size", "16"]
    assert main([*common, "--kmeans_clusters_per_endmember", "2", "--output_dir", str(tmp_path / "run")]) == 0
    training = json.loads((tmp_path / "run" / "results.json").read_text())["settings"]["gauss_training"]
    assert training["kmeans_clusters_per_endmember"] == 2
    capsys.readouterr()
    assert main([*common, "--kmeans_clusters_per_endmember", "0", "--output_dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "kmeans_clusters_per_endmember must be >= 1, got 0" in err and "\n" not in err
