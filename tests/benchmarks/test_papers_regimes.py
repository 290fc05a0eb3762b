"""The grid's paper regimes (issue 14): the IID partition, the official-code variants, runs taken from an earlier
summary cut to the grid's rounds, and both forms of the diagnostics in the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_federated_grid import _args, _write_run


def test_iid_partition_runs_every_variant_once_with_the_official_settings(grid, tmp_path, monkeypatch):  # noqa: F811
    done = []

    def fake_run_federated(config):
        done.append((config.data_args.partition, config.training_args.method, dict(config.training_args.method_kwargs or {}),
                     config.training_args.output_dir))  # fmt: skip

    import peft_fed.runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_federated", fake_run_federated)
    args = _args(grid, tmp_path, "--variants", "fedsmoothlora_paper_constant", "subspace_reg_published", "--seeds", "1",
                 "--partition", "iid", "--alphas", "0.3", "0.1")  # fmt: skip
    grid.run_grid(args, dict(grid.PRESETS["minilm"]))
    assert [d[0] for d in done] == ["iid", "iid"]  # the alphas are not used with --partition iid
    fedsmooth, subspace = done
    assert fedsmooth[1] == "fedsmoothlora" and fedsmooth[2]["zeta_schedule"] == "constant"
    assert fedsmooth[2]["small_client_gradient_batches"] == "available"
    assert subspace[1] == "subspace_reg" and subspace[2]["restore_norm_into"] == "both"
    assert Path(fedsmooth[3]) == grid.run_dir(tmp_path, None, "fedsmoothlora_paper_constant", 1)
    assert "iid" in Path(fedsmooth[3]).parts


def _stored_summary(path: Path) -> Path:
    run = {"seed": 1, "curve": [[2, 0.4], [4, 0.5], [6, 0.9]], "abs_jump_curve": [None, 0.3, 0.1, 0.1, 0.5, 0.5],
           "uplink_bytes_per_round": 100.0, "downlink_bytes_per_round": 200.0}  # fmt: skip
    summary = {"alphas": {"0.3": {"variants": {"fedit": {"runs": [run, dict(run, seed=2)]}}}}}
    path.write_text(json.dumps(summary))
    return path


def test_stored_runs_are_cut_to_the_grid_rounds(grid, tmp_path):  # noqa: F811
    stored = _stored_summary(tmp_path / "stored.json")
    _write_run(grid.run_dir(tmp_path, 0.3, "fedsmoothlora_paper_cosine", 1), [None, 0.45, None, 0.6], first=1.0, last=0.8)
    args = _args(grid, tmp_path, "--variants", "fedsmoothlora_paper_cosine", "--seeds", "1", "--alphas", "0.3",
                 "--stored_summary", str(stored), "--stored_variants", "fedit")  # fmt: skip
    summary = grid.summarize(args, dict(grid.PRESETS["minilm"], num_rounds=4))
    block = summary["alphas"]["0.3"]
    fedit = block["variants"]["fedit"]
    # only seed 1 (the grid's seeds), only rounds <= 4: the stored run's round-6 accuracy is not its final one
    assert fedit["seeds"] == [1] and fedit["runs"][0]["curve"] == [(2, 0.4), (4, 0.5)]
    assert fedit["final_accuracy"]["mean"] == 0.5 and fedit["best_accuracy"]["mean"] == 0.5
    assert fedit["round_mean_abs_jump"]["mean"] == pytest.approx((0.3 + 0.1 + 0.1) / 3)
    assert fedit["source"].startswith("stored") and fedit["mean_abs_loss_jump"]["mean"] is None
    # the per-seed target is 95 % of the best final accuracy of either source: 0.6 from the fresh run
    assert block["seed_targets"] == {"1": pytest.approx(0.57)}
    assert fedit["reached_target"] == "0/1"
    fresh = block["variants"]["fedsmoothlora_paper_cosine"]
    assert fresh["round_mean_abs_jump"]["mean"] == pytest.approx(0.2)  # first 1.0 - previous last 0.8, rounds 2-4
    assert "| fedit | 1 |" in grid.markdown(summary) and "stored:" in grid.markdown(summary)


def test_a_variant_cannot_be_both_run_and_stored(grid, tmp_path):  # noqa: F811
    stored = _stored_summary(tmp_path / "stored.json")
    _write_run(grid.run_dir(tmp_path, 0.3, "fedit", 1), [0.3, 0.4])
    args = _args(grid, tmp_path, "--variants", "fedit", "--seeds", "1", "--alphas", "0.3",
                 "--stored_summary", str(stored), "--stored_variants", "fedit")  # fmt: skip
    with pytest.raises(ValueError, match="both run by this grid and taken from"):
        grid.summarize(args, dict(grid.PRESETS["minilm"], num_rounds=2))


def test_summary_keeps_both_forms_of_the_diagnostics(grid, tmp_path):  # noqa: F811
    path = grid.run_dir(tmp_path, 0.3, "fedit", 1)
    _write_run(path, [0.3, 0.4])
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for row, (per_layer, whole) in zip(rows, ((0.5, 0.9), (0.7, 0.7)), strict=True):
        row.update(cancellation_ratio=per_layer, whole_model_cancellation_ratio=whole)
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = grid.summarize(_args(grid, tmp_path, "--variants", "fedit", "--seeds", "1", "--alphas", "0.3"),
                             dict(grid.PRESETS["minilm"], num_rounds=2))  # fmt: skip
    entry = summary["alphas"]["0.3"]["variants"]["fedit"]
    assert entry["cancellation_ratio"]["mean"] == pytest.approx(0.6)
    assert entry["whole_model_cancellation_ratio"]["mean"] == pytest.approx(0.8)
    assert "0.600 ± 0.000 / 0.800 ± 0.000" in grid.markdown(summary)
