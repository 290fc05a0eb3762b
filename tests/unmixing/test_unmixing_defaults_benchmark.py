"""Bookkeeping of benchmarks/unmixing_defaults.py: the score, the seed-agreement criterion and the choice rule."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "unmixing_defaults.py"
_SPEC = importlib.util.spec_from_file_location("unmixing_defaults_benchmark", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench
_SPEC.loader.exec_module(bench)


def _run(candidate: str, scene: str, sad: float, armse: float) -> dict:
    return {"candidate": candidate, "scene": scene, "gauss_blind": {"sad_mean": sad, "armse": armse}}


def test_scores_are_relative_to_the_previous_defaults_scene_by_scene():
    previous = bench.PREVIOUS_DEFAULTS
    runs = [
        _run(previous, "a", 0.10, 0.20),
        _run(previous, "b", 0.40, 0.10),
        _run("other", "a", 0.05, 0.20),  # half the SAD, same aRMSE: 0.75
        _run("other", "b", 0.40, 0.30),  # same SAD, three times the aRMSE: 2.0
    ]
    scores = bench.phase1_scores(runs)
    assert scores[previous] == pytest.approx(1.0)
    assert scores["other"] == pytest.approx((0.75 + 2.0) / 2)


def test_seed_disagreement_ignores_order_and_scale_and_sees_a_moved_endmember():
    rng = np.random.default_rng(0)
    first = rng.random((20, 3)) + 0.1
    assert bench.seed_disagreement(first, 2.0 * first[:, [2, 0, 1]]) == pytest.approx(0.0, abs=1e-7)
    moved = first.copy()
    moved[:, 1] = rng.random(20) + 0.1
    assert bench.seed_disagreement(first, moved) > 0.05


def test_the_rule_keeps_the_phase_one_winner_unless_it_is_twice_as_unsteady():
    scores = {"best": 0.9, "second": 1.0}
    assert bench.choose(scores, {"best": 0.05, "second": 0.04})[0] == "best"
    assert bench.choose(scores, {"best": 0.05, "second": 0.02})[0] == "second"


def test_every_candidate_is_a_valid_training_setting():
    from peft_fed.unmixing.config import GaussTrainingConfig

    assert bench.PREVIOUS_DEFAULTS in bench.CANDIDATES and len(bench.CANDIDATES) == 8
    for settings in bench.CANDIDATES.values():
        GaussTrainingConfig(**settings)


def test_round_two_changes_one_choice_at_a_time_from_the_pinned_current_defaults():
    candidates, reference, variant = bench.ROUNDS[2]
    assert variant == "gauss_blind"
    assert reference == "current_defaults" and candidates[reference] == bench.ROUND2_REFERENCE
    changed = {
        name: {k for k, v in settings.items() if v != bench.ROUND2_REFERENCE[k]} for name, settings in candidates.items()
    }
    assert changed.pop(reference) == set()
    assert all(len(keys) == 1 for keys in changed.values()), changed
    assert sorted(key for keys in changed.values() for key in keys) == sorted(
        ["kmeans_clusters_per_endmember"] * 2 + ["window_size"] * 2 + ["blind_learning_rate"] * 2 + ["blind_steps_factor"] * 2
    )
    args = bench._parse_args(["--output_dir", "x", "--round", "2", "--blind_steps", "500"])
    for name in candidates:
        config = bench._training(name, 0, args)
        assert config.blind_steps == round(500 * candidates[name]["blind_steps_factor"])
        assert bench._model(name, 7, 3, args).window_size == candidates[name]["window_size"]
        assert config.kmeans_clusters_per_endmember == candidates[name]["kmeans_clusters_per_endmember"]
        assert config.blind_learning_rate == candidates[name]["blind_learning_rate"]


def test_scores_can_be_relative_to_another_reference():
    runs = [_run("current_defaults", "a", 0.1, 0.1), _run("x", "a", 0.2, 0.1)]
    assert bench.phase1_scores(runs, "current_defaults")["x"] == pytest.approx(1.5)


def test_an_unknown_candidate_is_refused_before_any_run(tmp_path):
    with pytest.raises(SystemExit, match="unknown candidates of round 2: nope"):
        bench.main(["--round", "2", "--candidates", "blind_lr_x3,nope", "--output_dir", str(tmp_path)])
    assert not (tmp_path / "runs.jsonl").exists()


@pytest.mark.parametrize(
    ("round_number", "variant", "changed_key"),
    [(3, "gauss_blind", "blind_freeze_mixing"), (4, "gauss_prime", "prime_extractor")],
)
def test_rounds_three_and_four_change_one_choice_and_train_their_variant(round_number, variant, changed_key):
    candidates, reference, round_variant = bench.ROUNDS[round_number]
    assert round_variant == variant and len(candidates) == 2
    (other,) = set(candidates) - {reference}
    assert {k for k in candidates[other] if candidates[other][k] != candidates[reference].get(k)} == {changed_key}
    args = bench._parse_args(["--output_dir", "x", "--round", str(round_number)])
    for name in candidates:
        assert getattr(bench._training(name, 0, args), changed_key) == candidates[name].get(
            changed_key, getattr(bench._training(reference, 0, args), changed_key)
        )


def test_scores_read_the_rounds_variant():
    runs = [
        {"candidate": "prime_vca", "scene": "a", "gauss_prime": {"sad_mean": 0.2, "armse": 0.1}},
        {"candidate": "prime_nfindr", "scene": "a", "gauss_prime": {"sad_mean": 0.1, "armse": 0.1}},
    ]
    assert bench.phase1_scores(runs, "prime_vca", "gauss_prime")["prime_nfindr"] == pytest.approx(0.75)
