"""The method benchmark's bookkeeping: which runs a shard does, and what the summary makes of finished runs.

The grid itself needs real models and hours; these tests write small synthetic ``metrics.jsonl`` files in the
runtime's row format and check the numbers the docs quote (per-seed targets, rounds to target, jump ratios).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def _write_run(path: Path, accuracies: list[float | None], *, first: float = 1.0, last: float = 0.8) -> None:
    """One run: client "0" trains every round; eval accuracy per round (None: not evaluated)."""
    path.mkdir(parents=True)
    rows = []
    for index, accuracy in enumerate(accuracies):
        rows.append({
            "round": index + 1, "client_loss_first": {"0": first}, "client_loss_last": {"0": last},
            "basis_overlap": 0.5, "uplink_bytes": 100, "downlink_bytes": 200, "round_local_wall_seconds": 1.0,
            "aggregation_seconds": 0.0, "eval_seconds": 0.0, "eval_loss": None if accuracy is None else 1.0,
            "eval_accuracy": accuracy,
        })  # fmt: skip
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _args(grid, runs_dir: Path, *extra: str):
    return grid.build_parser().parse_args(
        ["--output_dir", str(runs_dir / "out"), "--runs_dir", str(runs_dir), *extra]
    )


def test_shards_split_the_grid_without_overlap(grid, tmp_path, monkeypatch):
    done: list[tuple] = []

    def fake_run_federated(config):
        args = config.training_args
        done.append((config.data_args.dirichlet_alpha, args.method, args.seed, dict(args.method_kwargs or {})))

    import peft_fed.runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_federated", fake_run_federated)
    settings = dict(grid.PRESETS["minilm_topic"])
    for shard in ("0/3", "1/3", "2/3"):
        args = _args(grid, tmp_path, "--preset", "minilm_topic", "--variants", "fedit", "subspace_reg_no_reg",
                     "--seeds", "1", "2", "--alphas", "0.3", "0.1", "--shard", shard)  # fmt: skip
        grid.run_grid(args, settings)
    assert len(done) == 2 * 2 * 2
    assert len({(a, m, s, json.dumps(k, sort_keys=True)) for a, m, s, k in done}) == len(done)
    ablation = [k for _, m, _, k in done if k.get("mu") == 0.0]
    assert len(ablation) == 4 and all(
        k["beta"] == k["lam"] == 0.0 and k["clip_norm"] == 15.0 for k in ablation
    )


def test_finished_runs_are_skipped(grid, tmp_path, monkeypatch):
    import peft_fed.runtime.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "run_federated", lambda config: calls.append(config.training_args.output_dir))
    settings = dict(grid.PRESETS["minilm"], num_rounds=2)
    _write_run(grid.run_dir(tmp_path, 0.3, "fedit", 1), [0.5, 0.6])
    _write_run(grid.run_dir(tmp_path, 0.3, "flora", 1), [0.5])  # interrupted after one of two rounds
    grid.run_grid(
        _args(grid, tmp_path, "--variants", "fedit", "flora", "--seeds", "1", "--alphas", "0.3"), settings
    )
    assert calls == [str(grid.run_dir(tmp_path, 0.3, "flora", 1))]


def test_summary_targets_are_per_seed(grid, tmp_path):
    # seed 1 is easy (best final 0.8), seed 2 hard (best final 0.4): a seed-mean target (0.95 * 0.6) would let
    # seed 1's slow method count as early and keep seed 2 from ever reaching it.
    curves = {
        ("fast", 1): [0.5, 0.78, 0.8], ("slow", 1): [0.3, 0.6, 0.77],
        ("fast", 2): [0.2, 0.39, 0.4], ("slow", 2): [0.2, 0.3, 0.35],
    }  # fmt: skip
    grid.VARIANTS.update({"fast": ("fedit", {}), "slow": ("fedit", {})})
    try:
        for (variant, seed), curve in curves.items():
            _write_run(
                grid.run_dir(tmp_path, 0.3, variant, seed), curve, last=0.8 if variant == "fast" else 0.9
            )
        _write_run(grid.run_dir(tmp_path, 0.3, "slow", 3), [0.1])  # incomplete: left out
        args = _args(
            grid, tmp_path, "--variants", "fast", "slow", "--seeds", "1", "2", "3", "--alphas", "0.3"
        )
        summary = grid.summarize(args, dict(grid.PRESETS["minilm"], num_rounds=3))
    finally:
        del grid.VARIANTS["fast"], grid.VARIANTS["slow"]
    block = summary["alphas"]["0.3"]
    assert block["seed_targets"] == {"1": pytest.approx(0.76), "2": pytest.approx(0.38)}
    fast, slow = block["variants"]["fast"], block["variants"]["slow"]
    assert [r["rounds_to_target"] for r in fast["runs"]] == [2, 2]
    assert [r["rounds_to_target"] for r in slow["runs"]] == [3, None]
    assert slow["reached_target"] == "1/2" and slow["seeds"] == [1, 2]
    assert fast["final_accuracy"]["mean"] == pytest.approx(0.6)
    assert fast["final_accuracy"]["sd"] == pytest.approx(math.sqrt(0.08))
    # the same client trains every round: jump = first - previous last, progress = first - last
    assert fast["mean_abs_loss_jump"]["mean"] == pytest.approx(0.2)
    assert fast["relative_abs_jump"]["mean"] == pytest.approx(0.2 / 0.2)
    assert slow["relative_abs_jump"]["mean"] == pytest.approx(0.1 / 0.1)
    assert "| fast |" in grid.markdown(summary)


def test_jump_ratio_needs_local_progress(grid, tmp_path):
    # clients end their rounds where they began: the jump has nothing to be relative to
    _write_run(grid.run_dir(tmp_path, 0.3, "flora", 1), [0.3, 0.3], first=1.0, last=1.0)
    summary = grid.summarize(
        _args(grid, tmp_path, "--variants", "flora", "--seeds", "1", "--alphas", "0.3"),
        dict(grid.PRESETS["minilm"], num_rounds=2),
    )
    entry = summary["alphas"]["0.3"]["variants"]["flora"]
    assert entry["local_progress"]["mean"] == 0.0 and entry["mean_abs_loss_jump"]["mean"] == 0.0
    assert entry["relative_abs_jump"]["mean"] is None
    assert "| flora | 1 |" in grid.markdown(summary)


def test_jump_ratio_needs_progress_above_its_noise(grid, tmp_path):
    # progress 0.3, -0.1, -0.1 over three seeds: mean 0.033 < its standard error 0.133, so no ratio
    for seed, last in ((1, 0.7), (2, 1.1), (3, 1.1)):
        _write_run(grid.run_dir(tmp_path, 0.3, "fedit", seed), [0.3, 0.3], first=1.0, last=last)
    summary = grid.summarize(
        _args(grid, tmp_path, "--variants", "fedit", "--seeds", "1", "2", "3", "--alphas", "0.3"),
        dict(grid.PRESETS["minilm"], num_rounds=2),
    )
    entry = summary["alphas"]["0.3"]["variants"]["fedit"]
    assert entry["local_progress"]["mean"] == pytest.approx(0.1 / 3)
    assert entry["relative_abs_jump"]["mean"] is None
    # the same spread around a clear progress keeps its ratio
    assert grid._jump_over_progress({"mean": 0.2}, {"mean": 0.3, "sd": 0.2, "n": 3}) == pytest.approx(0.2 / 0.3)


def test_a_run_claimed_by_one_grid_process_is_skipped_by_another(grid, tmp_path):
    """Grids started side by side over the same jobs never run one twice; a finished run's claim is released."""
    out = tmp_path / "alpha-0.3" / "fedit" / "seed-42"
    claim = grid._claim(out)
    assert claim is not None and claim.exists()
    assert grid._claim(out) is None  # another process: skipped
    claim.unlink()
    assert grid._claim(out) is not None
