"""The downlink benchmark's bookkeeping on a few rounds of small layers: what it records is what ``configure`` sends,
never above the per-version list or the dense bound, equal to it when every client trains every round."""

from __future__ import annotations

import json

#: rank-8 updates (the default r): 8 * 56 = 448 numbers against 768 for layer "a", so one missed update travels
#: stacked and two or more dense
LAYERS = {"a": [32, 24], "b": [24, 40]}


def test_downlink_benchmark_records_the_bounded_catch_up(downlink, tmp_path):
    results = downlink.main(["--num_clients", "2", "12", "--clients_per_round", "2", "--num_rounds", "15",
                             "--check_every", "5", "--layers", json.dumps(LAYERS), "--output_dir", str(tmp_path)])  # fmt: skip
    assert json.loads((tmp_path / "downlink.json").read_text())["by_num_clients"].keys() == {"2", "12"}
    assert (tmp_path / "downlink.png").stat().st_size > 0
    bound = 4 * sum(m * n for m, n in LAYERS.values())
    update = 4 * 8 * sum(m + n for m, n in LAYERS.values())
    every_round, partial = results["by_num_clients"]["2"], results["by_num_clients"]["12"]
    assert every_round["dense_bound_bytes"] == bound and every_round["update_bytes"] == update
    # every client every round: one missed update each, sent as itself
    assert all(r["mean_new"] == r["mean_old"] == r["max_new"] == update for r in every_round["rounds"][1:])
    rows = partial["rounds"]
    assert all(r["max_new"] <= min(r["max_old"], bound) and r["mean_new"] <= r["mean_old"] for r in rows)
    assert any(r["max_old"] > bound for r in rows) and max(r["max_new"] for r in rows) == bound
    assert partial["summary"]["new_never_above_dense_bound"] and partial["summary"]["first_time_clients"] == 12
    assert partial["checks"] and all(c["relative_error"] < 1e-5 for c in partial["checks"])
