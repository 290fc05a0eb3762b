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


def test_cli_federated_end_to_end_on_a_generated_scene(tmp_path, capsys):
    # The documented entry point of federated unmixing: GAUSS trained on a generated source scene, adapted by
    # FedSmoothLoRA (one of its hyperparameters given as a flag) on the 2 x 2 tiles of a generated target.
    pytest.importorskip("earthlib")
    out = tmp_path / "federated"
    args = [
        "--federated", "fedsmoothlora", "--zeta", "0.5", "--num_gradient_batches", "2",
        "--rank", "2", "--num_rounds", "2", "--local_steps", "4", "--adapter_learning_rate", "0.003",
        "--synthetic_rows", "16", "--synthetic_cols", "16", "--tiles", "2x2",
        "--stage1_steps", "60", "--blind_steps", "30", "--batch_size", "64",
        "--output_dir", str(out), "--no_progress", "--no_plots", "--threads", "1",
    ]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    federated = results["federated"]
    assert results["method"] == "federated_fedsmoothlora" and federated["method"] == "fedsmoothlora"
    settings = results["settings"]["federated_config"]
    assert settings["method_kwargs"] == {"zeta": 0.5, "num_gradient_batches": 2}
    assert (settings["rank"], settings["num_rounds"], settings["local_steps"]) == (2, 2, 4)
    assert settings["learning_rate"] == 0.003 and results["settings"]["source_method"] == "gauss_blind"
    assert results["settings"]["client_pixels"] == [64, 64, 64, 64]
    history = federated["history"]
    assert [row["round"] for row in history] == [0, 1, 2]
    assert all(sorted(row["clients"]) == ["0", "1", "2", "3"] for row in history[1:])
    assert federated["final"]["uplink_bytes_total"] == sum(row["uplink_bytes"] for row in history) > 0
    # the written metrics are the adapted global model's: the last round's row
    assert results["sad_mean"] == pytest.approx(history[-1]["sad_mean"], abs=1e-12)
    assert results["armse"] == pytest.approx(history[-1]["armse"], abs=1e-12)
    abundances = np.load(out / "abundances.npy")
    assert abundances.shape == (16, 16, 3) and abundances.min() >= 0
    np.testing.assert_allclose(abundances.sum(axis=-1), 1.0, atol=1e-5)
    assert "federated fedsmoothlora, 4 clients, 2 rounds" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "kmeans", "--rank", "3"], "--rank only apply with --federated METHOD"),
        (["--federated", "fedit", "--method", "vca_fclsu"], "--method must be one of gauss, gauss_blind, gauss_prime"),
        (["--federated", "fedprox_lora"], "unknown federated method 'fedprox_lora'"),
        (["--federated", "fedit", "--zeta", "0.5"], "'fedit' does not take zeta"),
        (["--federated", "fedit", "--tiles", "3"], "--tiles must be ROWSxCOLS"),
        (["--federated", "fedit", "--num_rounds", "many"], "--num_rounds must be an integer"),
        ([], "--method is required"),
    ],
)
def test_cli_federated_flags_are_checked_before_any_training(tmp_path, capsys, extra, message):
    assert main([*extra, "--output_dir", str(tmp_path / "o"), "--synthetic_rows", "8", "--synthetic_cols", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_federated_refuses_a_source_with_other_bands(tmp_path, linear_scene_factory, capsys):
    scene, _ = linear_scene_factory(rows=8, cols=8, bands=15, p=3)
    target = _samson_like(tmp_path / "target", scene)
    assert main(["--federated", "fedit", "--data", str(target), "--output_dir", str(tmp_path / "o")]) == 2
    assert "has 180 bands, the target 15: give --source_data" in capsys.readouterr().err
    np.save(tmp_path / "bare.npy", scene.cube)
    bare = ["--federated", "fedit", "--data", str(tmp_path / "bare.npy"), "--num_endmembers", "3"]
    assert main([*bare, "--output_dir", str(tmp_path / "o")]) == 2
    assert "--data needs E and A_true" in capsys.readouterr().err


def test_cli_bad_scenes_get_one_line_errors(tmp_path, linear_scene_factory, capsys):
    scene, _ = linear_scene_factory(rows=6, cols=6, bands=8, p=3)

    def error_of(folder_content: dict) -> str:
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        for stem, array in folder_content.items():
            scipy.io.savemat(folder / f"{stem}.mat", {stem: array})
        assert main(["--data", str(folder), "--method", "vca_fclsu", "--output_dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    nan_cube = scene.cube.copy()
    nan_cube[2, 3, 4] = np.nan
    assert "1 NaN or infinite values" in error_of({"Y_clean": nan_cube})
    # a reference for another number of pixels, and one for another number of bands
    assert "(5, 6, 3)" in error_of({"Y_clean": scene.cube, "A_true": np.full((5, 6, 3), 1 / 3)})
    assert "(9, 3)" in error_of({"Y_clean": scene.cube, "E": np.ones((9, 3))})
    # more endmembers than bands: p from the reference, or from --num_endmembers on a bare cube
    too_many = np.full((6, 6, 10), 0.1)
    err = error_of({"Y_clean": scene.cube, "A_true": too_many, "E": np.ones((8, 10))})
    assert "10 endmembers cannot be unmixed from 8 bands" in err
    np.save(tmp_path / "cube.npy", scene.cube)
    assert main(["--data", str(tmp_path / "cube.npy"), "--method", "misicnet", "--num_endmembers", "9",
                 "--output_dir", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "9 endmembers cannot be unmixed from 8 bands" in capsys.readouterr().err


def test_tiles_give_exactly_the_asked_clients_covering_every_pixel_once():
    from peft_fed.unmixing.cli import _client_tiles

    clients = _client_tiles("4x3", 5, 7)
    assert len(clients) == 12
    assert sorted(np.concatenate(clients).tolist()) == list(range(35))
    assert {len(c) for c in clients} == {2 * 3, 2 * 2, 1 * 3, 1 * 2}  # rows split 2/1/1/1, columns 3/2/2
    with pytest.raises(ValueError, match="does not fit a 5 x 7 image"):
        _client_tiles("6x1", 5, 7)
