"""Bookkeeping of benchmarks/unmixing_scenes.py: the verdict rule, and the files one small run writes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import scipy.io

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "unmixing_scenes.py"
_SPEC = importlib.util.spec_from_file_location("unmixing_scenes_benchmark", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench  # dataclasses look their module up while the file runs
_SPEC.loader.exec_module(bench)


def _entry(family: str, sad: tuple[float, float], armse: tuple[float, float]) -> dict:
    return {
        "family": family,
        "sad_mean": {"mean": sad[0], "std": sad[1]},
        "armse": {"mean": armse[0], "std": armse[1]},
    }


def test_verdict_takes_the_best_baseline_per_metric_and_one_std_as_equal():
    entries = {
        "vca_fclsu": _entry(bench.SIGNAL_PROCESSING, (0.10, 0.01), (0.05, 0.00)),
        "misicnet": _entry(bench.DEEP, (0.06, 0.01), (0.09, 0.01)),
        "kmeans_fclsu": _entry(bench.CLUSTERING, (0.01, 0.0), (0.01, 0.0)),  # not a baseline of the claim
        "gauss": _entry(bench.GAUSS, (0.069, 0.001), (0.055, 0.001)),  # within misicnet's std, not vca's
        "gauss_blind": _entry(bench.GAUSS, (0.05, 0.0), (0.07, 0.0)),  # beats SAD, loses aRMSE
    }
    result = bench.verdict(entries)
    assert result["best_baseline"]["sad_mean"]["entry"] == "misicnet"
    assert result["best_baseline"]["armse"]["entry"] == "vca_fclsu"
    assert result["variants"]["gauss"] == {"sad_mean": True, "armse": False}
    assert result["variants"]["gauss_blind"] == {"sad_mean": True, "armse": False}
    assert result["claim_holds"] is False and result["qualifying_variants"] == []
    entries["gauss"] = _entry(bench.GAUSS, (0.069, 0.001), (0.0549, 0.005))  # its own spread covers the gap
    result = bench.verdict(entries)
    assert result["claim_holds"] is True and result["qualifying_variants"] == ["gauss"]
    assert bench.verdict({"gauss": entries["gauss"]})["claim_holds"] is None


def test_a_small_run_writes_per_scene_and_across_scene_results(tmp_path, linear_scene_factory):
    folders = []
    for name, seed in (("alpha", 0), ("beta", 1)):
        scene, _ = linear_scene_factory(rows=8, cols=8, bands=10, p=3, seed=seed)
        folder = tmp_path / name
        folder.mkdir()
        for stem, array in (("Y_clean", scene.cube), ("A_true", scene.abundances), ("E", scene.endmembers)):
            scipy.io.savemat(folder / f"{stem}.mat", {stem: array})
        folders.append(str(folder))
    out = tmp_path / "out"
    argv = ["--data", ",".join(folders), "--seeds", "0,1", "--entries", "gauss,gauss_blind,vca_fclsu,kmeans",
            "--stage1_steps", "5", "--blind_steps", "3", "--output_dir", str(out), "--no_progress"]  # fmt: skip
    assert bench.main(argv) == 0
    overall = json.loads((out / "summary.json").read_text())
    assert overall["scenes_finished"] == ["alpha", "beta"] and overall["seeds"] == [0, 1]
    for name in ("alpha", "beta"):
        entries = overall["scenes"][name]
        assert list(entries) == ["gauss", "gauss_blind", "vca_fclsu", "kmeans"]  # the table's order
        assert len(entries["vca_fclsu"]["sad_mean"]["values"]) == 2
        # a noiseless scene with pure pixels: VCA finds them
        assert entries["vca_fclsu"]["sad_mean"]["mean"] < 0.01
        run = json.loads((out / name / "seed1" / "gauss" / "results.json").read_text())
        assert run["settings"]["gauss_training"]["stage1_steps"] == 5 and run["family"] == bench.GAUSS
        # one gauss_blind fit scores both entries: gauss is its stage 1
        assert run["settings"]["read_from"] == "the gauss_blind run's stage 1"
        blind = json.loads((out / name / "seed1" / "gauss_blind" / "results.json").read_text())
        assert blind["timings"]["stage1_s"] == run["timings"]["stage1_s"]
        assert (out / name / "seed0" / "gauss" / "abundances.png").exists()
        check = json.loads((out / name / "reference_check.json").read_text())
        assert check["reference_model_relative_error"] < 1e-12
    assert overall["verdict"]["alpha"]["best_baseline"]["sad_mean"]["entry"] == "vca_fclsu"
    table = (out / "summary.md").read_text()
    assert "| gauss | gauss |" in table and "alpha SAD" in table and "beta aRMSE" in table

    # an interrupted run: beta's seed 1 lost one entry; the summaries are rebuilt from the files left
    (out / "beta" / "seed1" / "kmeans" / "results.json").unlink()
    assert bench.main([*argv, "--summarise_only"]) == 0
    rebuilt = json.loads((out / "summary.json").read_text())
    assert rebuilt["seeds_per_scene"] == {"alpha": [0, 1], "beta": [0]}
    assert rebuilt["command"] == overall["command"] and rebuilt["total_wall_time_s"] is None
    assert rebuilt["scenes"]["alpha"] == overall["scenes"]["alpha"]
    assert rebuilt["scenes"]["beta"]["gauss"]["sad_mean"]["values"] == overall["scenes"]["beta"]["gauss"]["sad_mean"]["values"][:1]
    assert "beta seeds [0]" in (out / "summary.md").read_text()


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert bench.main(["--entries", "gauss,nope", "--synthetic", "pure", "--output_dir", str(tmp_path)]) == 2
    assert "unknown entries ['nope']" in capsys.readouterr().err
    assert bench.main(["--output_dir", str(tmp_path)]) == 2
    assert "give --data and/or --synthetic" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main([])


def test_only_the_default_pseudo_ground_truth_of_gauss_prime_counts_in_the_verdict():
    from peft_fed.unmixing.config import GaussTrainingConfig

    default = GaussTrainingConfig().prime_extractor
    for extractor in ("vca", "nfindr"):
        entry = bench.ENTRIES_BY_NAME[f"gauss_prime_{extractor}"]
        assert entry.family == (bench.GAUSS if extractor == default else bench.ABLATION)
    assert f"gauss_prime_{default}" in bench.COMPARISON
