import numpy as np
import pytest
import scipy.io

from peft_fed.unmixing.data import HyperspectralScene, load_array, load_cube, load_scene, load_scene_folder


def _write_folder(folder, cube, abundances=None, endmembers=None):
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(folder / "Y_clean.mat", {"Y_clean": cube})
    if abundances is not None:
        scipy.io.savemat(folder / "A_true.mat", {"A_true": abundances})
    if endmembers is not None:
        scipy.io.savemat(folder / "E.mat", {"E": endmembers})
    return folder


def test_samson_like_folder_round_trip(tmp_path, linear_scene_factory):
    scene, _ = linear_scene_factory(rows=6, cols=7, bands=9, p=3)
    folder = _write_folder(tmp_path / "scene", scene.cube, scene.abundances, scene.endmembers)
    loaded = load_scene(folder)
    assert loaded.shape == (6, 7, 9)
    assert np.allclose(loaded.cube, scene.cube)
    assert np.allclose(loaded.abundances, scene.abundances)
    assert np.allclose(loaded.endmembers, scene.endmembers)
    assert loaded.num_reference_endmembers == 3
    assert loaded.name == "scene"


def test_folder_without_ground_truth(tmp_path):
    folder = _write_folder(tmp_path / "bare", np.random.default_rng(0).uniform(size=(4, 4, 5)))
    scene = load_scene_folder(folder)
    assert scene.endmembers is None and scene.abundances is None
    assert scene.num_reference_endmembers is None


def test_mismatched_abundances_are_rejected_with_both_shapes(tmp_path):
    cube = np.random.default_rng(0).uniform(size=(6, 7, 9))
    folder = _write_folder(tmp_path / "bad", cube, abundances=np.full((7, 6, 3), 1 / 3))
    with pytest.raises(ValueError) as error:
        load_scene(folder)
    message = str(error.value)
    assert "(7, 6, 3)" in message and "(6, 7, 9)" in message


def test_mismatched_endmembers_are_rejected_with_both_shapes(tmp_path):
    cube = np.random.default_rng(0).uniform(size=(6, 7, 9))
    folder = _write_folder(tmp_path / "bad_e", cube, endmembers=np.ones((8, 3)))
    with pytest.raises(ValueError) as error:
        load_scene(folder)
    assert "(8, 3)" in str(error.value) and "(6, 7, 9)" in str(error.value)


def test_inconsistent_ground_truth_counts_are_rejected():
    with pytest.raises(ValueError, match="disagree on the number of endmembers"):
        HyperspectralScene(cube=np.ones((3, 3, 4)), endmembers=np.ones((4, 2)), abundances=np.ones((3, 3, 3)))


def test_endmembers_stored_transposed_are_accepted():
    scene = HyperspectralScene(cube=np.ones((3, 3, 5)), endmembers=np.ones((2, 5)))
    assert scene.endmembers.shape == (5, 2)


def test_npy_and_npz_cubes(tmp_path):
    cube = np.random.default_rng(1).uniform(size=(5, 4, 6))
    np.save(tmp_path / "cube.npy", cube)
    assert np.allclose(load_cube(tmp_path / "cube.npy"), cube)
    np.savez(tmp_path / "several.npz", Y=cube, other=np.ones(3))
    assert np.allclose(load_cube(tmp_path / "several.npz"), cube)
    scene = load_scene(tmp_path / "cube.npy")
    assert scene.shape == (5, 4, 6) and scene.endmembers is None


def test_envi_cube(tmp_path):
    spectral = pytest.importorskip("spectral")
    cube = np.random.default_rng(2).uniform(size=(5, 4, 6)).astype(np.float32)
    spectral.envi.save_image(str(tmp_path / "cube.hdr"), cube, dtype=np.float32, interleave="bil")
    assert np.allclose(load_cube(tmp_path / "cube.hdr"), cube)


def test_mat_variable_selection(tmp_path):
    cube = np.ones((3, 3, 4))
    scipy.io.savemat(tmp_path / "many.mat", {"Y": cube, "extra": np.zeros(2)})
    assert load_cube(tmp_path / "many.mat").shape == (3, 3, 4)
    scipy.io.savemat(tmp_path / "ambiguous.mat", {"first": cube, "second": cube})
    with pytest.raises(ValueError, match="several arrays"):
        load_cube(tmp_path / "ambiguous.mat")
    with pytest.raises(KeyError, match="no variable"):
        load_array(tmp_path / "ambiguous.mat", variable="missing")


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_scene(tmp_path / "missing")
    np.save(tmp_path / "flat.npy", np.ones((10, 4)))
    with pytest.raises(ValueError, match=r"expected a 3-D cube \(rows, cols, bands\)"):
        load_cube(tmp_path / "flat.npy")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(FileNotFoundError, match="has no cube"):
        load_scene(tmp_path / "empty_folder")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported file"):
        load_cube(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="NaN"):
        HyperspectralScene(cube=np.full((2, 2, 2), np.nan))


def test_matlab_v73_file_reads_through_h5py(tmp_path):
    h5py = pytest.importorskip("h5py")
    cube = np.random.default_rng(3).uniform(size=(4, 5, 6))
    with h5py.File(tmp_path / "v73.mat", "w") as handle:
        handle.create_dataset("Y_clean", data=cube.transpose())  # MATLAB stores column-major
    assert np.allclose(load_cube(tmp_path / "v73.mat"), cube)


def test_garbage_mat_file_is_named(tmp_path):
    garbage = tmp_path / "Y_clean.mat"
    garbage.write_bytes(b"not a MATLAB file" * 20)
    with pytest.raises(ValueError, match=r"Y_clean.mat is not a readable MATLAB .mat file") as error:
        load_cube(garbage)
    assert "\n" not in str(error.value)
    cut = tmp_path / "cut.mat"
    scipy.io.savemat(cut, {"Y": np.ones((3, 3, 4))})
    cut.write_bytes(cut.read_bytes()[:150])
    with pytest.raises(ValueError, match=r"cut.mat is not a readable MATLAB .mat file"):
        load_cube(cut)
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"bad.npy is not a readable NumPy .npy file"):
        load_cube(tmp_path / "bad.npy")


def test_nan_in_ground_truth_is_refused_naming_the_endmember(tmp_path):
    cube = np.random.default_rng(0).uniform(size=(3, 3, 5))
    endmembers = np.random.default_rng(1).uniform(size=(5, 2))
    endmembers[0, 1] = np.nan
    folder = _write_folder(tmp_path / "nan", cube, endmembers=endmembers)
    with pytest.raises(ValueError, match=r"reference endmember 1 holds 1 NaN or infinite value"):
        load_scene(folder)
    abundances = np.full((3, 3, 2), 0.5)
    abundances[1, 1, 0] = np.inf
    with pytest.raises(ValueError, match=r"reference abundances of 'a' \(column 0\) hold 1 NaN"):
        HyperspectralScene(cube=cube, abundances=abundances, endmember_names=["a", "b"])
