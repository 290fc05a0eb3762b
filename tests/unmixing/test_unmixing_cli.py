import json

import numpy as np
import pytest
import scipy.io

from peft_fed.unmixing.cli import main


def _samson_like(folder, scene):
    folder.mkdir()
    scipy.io.savemat(folder / "Y_clean.mat", {"Y_clean": scene.cube})
    scipy.io.savemat(folder / "A_true.mat", {"A_true": scene.abundances})
    scipy.io.savemat(folder / "E.mat", {"E": scene.endmembers})
    return folder


def test_cli_writes_results_arrays_and_plots(tmp_path, linear_scene_factory):
    scene, _ = linear_scene_factory(rows=12, cols=12, bands=15, p=3)
    data = _samson_like(tmp_path / "scene", scene)
    out = tmp_path / "out"
    code = main(["--data", str(data), "--method", "vca_fclsu", "--output_dir", str(out), "--seed", "1"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for key in (
        "sad_mean",
        "sad_per_endmember",
        "armse",
        "sad_mean_degrees",
        "reconstruction_rmse",
        "wall_time_s",
    ):
        assert key in results
    assert results["sad_mean"] < 1e-6  # noiseless scene with pure pixels
    assert results["settings"]["seed"] == 1
    assert np.load(out / "endmembers.npy").shape == (15, 3)
    assert np.load(out / "abundances.npy").shape == (12, 12, 3)
    assert (out / "abundances.png").stat().st_size > 0 and (out / "endmembers.png").stat().st_size > 0


def test_cli_gauss_on_a_cube_file_needs_num_endmembers(tmp_path, linear_scene_factory, capsys):
    scene, _ = linear_scene_factory(rows=10, cols=10, bands=12, p=3)
    np.save(tmp_path / "cube.npy", scene.cube)
    args = ["--data", str(tmp_path / "cube.npy"), "--method", "gauss", "--output_dir", str(tmp_path / "o")]
    assert main(args) == 2
    assert "--num_endmembers" in capsys.readouterr().err
    fast = ["--stage1_steps", "20", "--batch_size", "32", "--no_progress", "--no_plots"]
    assert main([*args, "--num_endmembers", "3", *fast]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["sad_mean"] is None and results["reconstruction_rmse"] is not None
    assert results["settings"]["gauss_training"]["stage1_steps"] == 20


def test_cli_generated_scene(tmp_path):
    pytest.importorskip("earthlib")
    out = tmp_path / "synthetic"
    args = [
        "--method",
        "kmeans",
        "--output_dir",
        str(out),
        "--synthetic_rows",
        "12",
        "--synthetic_cols",
        "12",
    ]
    assert main([*args, "--no_plots"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == "synthetic" and results["synthetic"]["rows"] == 12


def test_cli_rejects_bad_input(tmp_path, linear_scene_factory, capsys):
    assert (
        main(["--data", str(tmp_path / "nowhere"), "--method", "kmeans", "--output_dir", str(tmp_path)]) == 2
    )
    assert "no such file" in capsys.readouterr().err
    scene, _ = linear_scene_factory(rows=6, cols=6, bands=8, p=3)
    folder = tmp_path / "bad"
    folder.mkdir()
    scipy.io.savemat(folder / "Y_clean.mat", {"Y_clean": scene.cube})
    scipy.io.savemat(folder / "A_true.mat", {"A_true": np.ones((5, 6, 3)) / 3})
    assert main(["--data", str(folder), "--method", "kmeans", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "(5, 6, 3)" in err and "(6, 6, 8)" in err
    good = _samson_like(tmp_path / "good", scene)
    assert (
        main(
            [
                "--data",
                str(good),
                "--method",
                "kmeans",
                "--output_dir",
                str(tmp_path),
                "--num_endmembers",
                "4",
            ]
        )
        == 2
    )
    assert "contradicts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--method", "not_a_method", "--output_dir", str(tmp_path)])
