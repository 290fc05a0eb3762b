from __future__ import annotations

import datasets
import numpy as np
import pytest

from peft_fed.data.partition import (
    PARTITION_SCHEMES,
    describe_partitions,
    group_natural_ids,
    label_distribution,
    mean_label_entropy,
    partition_dataset,
    split_clients,
)

NUM_ROWS = 600


@pytest.fixture(scope="module")
def table() -> datasets.Dataset:
    # Rows sorted by label (blocks of 100) so that a scheme forgetting to shuffle would show a label skew.
    idx = list(range(NUM_ROWS))
    return datasets.Dataset.from_dict(
        {
            "idx": idx,
            "label": [i // 100 for i in idx],
            "group": [f"g{(i * 7) % 16:02d}" for i in idx],  # 16 natural ids of unequal sizes
        }
    )


SCHEME_KWARGS = {
    "iid": {},
    "dirichlet": {"alpha": 0.3},
    "pathological": {"classes_per_client": 2},
    "shard": {"shards_per_client": 2},
    "natural_id": {"natural_id_column": "group"},
    "linear": {},
    "exponential": {},
    "size": {"partition_sizes": [50, 100, 150, 200, 90]},
}
# Schemes promising that every row lands in exactly one client (shard: 600 rows = 5 clients x 2 shards x 60).
FULL_COVERAGE = ("iid", "dirichlet", "pathological", "shard", "natural_id", "linear", "exponential")


def _ids(parts: list[datasets.Dataset]) -> list[list[int]]:
    return [list(p["idx"]) for p in parts]


def test_all_schemes_are_tested():
    assert set(SCHEME_KWARGS) == set(PARTITION_SCHEMES)


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_deterministic_by_seed(table, scheme):
    first = partition_dataset(table, 5, scheme, seed=3, **SCHEME_KWARGS[scheme])
    second = partition_dataset(table, 5, scheme, seed=3, **SCHEME_KWARGS[scheme])
    assert len(first) == 5
    assert _ids(first) == _ids(second)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological", "shard", "linear"])
def test_seed_changes_partition(table, scheme):
    a = partition_dataset(table, 5, scheme, seed=0, **SCHEME_KWARGS[scheme])
    b = partition_dataset(table, 5, scheme, seed=1, **SCHEME_KWARGS[scheme])
    assert _ids(a) != _ids(b)


@pytest.mark.parametrize("scheme", FULL_COVERAGE)
def test_each_sample_exactly_once(table, scheme):
    parts = partition_dataset(table, 5, scheme, seed=0, **SCHEME_KWARGS[scheme])
    all_ids = [i for ids in _ids(parts) for i in ids]
    assert len(all_ids) == NUM_ROWS  # no duplicates ...
    assert sorted(all_ids) == list(range(NUM_ROWS))  # ... and no loss
    assert all(len(p) > 0 for p in parts)


def test_size_scheme_sizes_and_disjoint(table):
    sizes = SCHEME_KWARGS["size"]["partition_sizes"]
    parts = partition_dataset(table, 5, "size", partition_sizes=sizes, seed=0)
    assert [len(p) for p in parts] == sizes
    all_ids = [i for ids in _ids(parts) for i in ids]
    assert len(set(all_ids)) == len(all_ids) == sum(sizes)


def test_quantity_skew_sizes_increase(table):
    linear = [len(p) for p in partition_dataset(table, 5, "linear", seed=0)]
    exponential = [len(p) for p in partition_dataset(table, 5, "exponential", seed=0)]
    assert linear == sorted(linear) and linear[0] < linear[-1]
    assert exponential[-1] / exponential[0] > linear[-1] / linear[0]


def test_iid_shuffles_before_sharding(table):
    parts = partition_dataset(table, 6, "iid", seed=0)
    assert [len(p) for p in parts] == [100] * 6
    # The data is sorted by label: contiguous shards without shuffling would each hold a single label.
    assert all(len(set(p["label"])) > 3 for p in parts)


def test_dirichlet_small_alpha_is_more_skewed_than_iid(table):
    iid = mean_label_entropy(partition_dataset(table, 5, "iid", seed=0))
    skewed = np.mean(
        [mean_label_entropy(partition_dataset(table, 5, "dirichlet", alpha=0.1, seed=s)) for s in range(3)]
    )
    flat = mean_label_entropy(partition_dataset(table, 5, "dirichlet", alpha=1000.0, seed=0))
    assert iid > 0.95 * np.log(6)
    assert skewed < iid - 0.5
    assert abs(flat - iid) < 0.1


def test_pathological_classes_per_client(table):
    parts = partition_dataset(table, 6, "pathological", classes_per_client=2, seed=0)
    assert all(len(set(p["label"])) == 2 for p in parts)


def test_label_distribution_counts(table):
    parts = partition_dataset(table, 3, "iid", seed=0)
    counts, labels = label_distribution(parts)
    assert labels == list(range(6))
    assert counts.shape == (3, 6) and counts.sum() == NUM_ROWS
    summary = describe_partitions(parts)
    assert summary["sizes"] == [200, 200, 200]


class TestNaturalId:
    def test_one_id_per_client_when_counts_match(self, table):
        parts = partition_dataset(table, 16, "natural_id", natural_id_column="group")
        groups = [set(p["group"]) for p in parts]
        assert all(len(g) == 1 for g in groups)
        assert set().union(*groups) == set(table["group"])

    def test_more_ids_than_clients_are_grouped(self, table):
        parts = partition_dataset(table, 5, "natural_id", natural_id_column="group")
        groups = [set(p["group"]) for p in parts]
        assert len(parts) == 5
        # No id is split across clients and every id is used.
        for a in range(5):
            for b in range(a + 1, 5):
                assert not groups[a] & groups[b]
        assert set().union(*groups) == set(table["group"])
        # Greedy balancing keeps client sizes close (16 ids of 37-38 rows each into 5 clients).
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 38

    def test_group_natural_ids_is_deterministic_and_balanced(self):
        values = ["a"] * 10 + ["b"] * 7 + ["c"] * 5 + ["d"] * 3 + ["e"] * 2
        mapping = group_natural_ids(values, 2)
        assert mapping == group_natural_ids(list(reversed(values)), 2)
        assert set(mapping.values()) == {0, 1}
        loads = [sum(values.count(v) for v, c in mapping.items() if c == client) for client in range(2)]
        assert sorted(loads) == [13, 14]

    def test_fewer_ids_than_clients(self, table):
        with pytest.raises(ValueError, match="16 ids for 20 clients"):
            partition_dataset(table, 20, "natural_id", natural_id_column="group")


class TestErrors:
    def test_unknown_scheme(self, table):
        with pytest.raises(ValueError, match="Unknown partition scheme 'zipf'"):
            partition_dataset(table, 3, "zipf")

    def test_missing_label_column(self, table):
        with pytest.raises(ValueError, match="needs column 'target'.*available columns"):
            partition_dataset(table, 3, "dirichlet", label_column="target")

    def test_missing_natural_id_column(self, table):
        with pytest.raises(ValueError, match="needs `natural_id_column`"):
            partition_dataset(table, 3, "natural_id")
        with pytest.raises(ValueError, match="needs column 'speaker'"):
            partition_dataset(table, 3, "natural_id", natural_id_column="speaker")

    def test_more_clients_than_samples(self, table):
        with pytest.raises(ValueError, match="more clients than samples"):
            partition_dataset(table.select(range(4)), 5, "iid")

    def test_empty_partition_is_reported(self, table):
        small = table.select(range(0, NUM_ROWS, 30))  # 20 rows, 6 labels
        with pytest.raises(ValueError, match=r"client\(s\) \[.*\] without data.*min_partition_size"):
            partition_dataset(small, 8, "dirichlet", alpha=0.01, min_partition_size=0, seed=0)

    def test_unsatisfiable_dirichlet(self, table):
        with pytest.raises(ValueError, match="min_partition_size"):
            partition_dataset(table, 10, "dirichlet", alpha=0.01, min_partition_size=100, seed=0)

    def test_exponential_too_many_clients(self, table):
        with pytest.raises(ValueError, match="'exponential' failed for 12 clients"):
            partition_dataset(table, 12, "exponential")

    def test_size_needs_sizes(self, table):
        with pytest.raises(ValueError, match="partition_sizes"):
            partition_dataset(table, 3, "size")


class TestSplitClients:
    def test_deterministic_and_disjoint(self, table):
        parts = partition_dataset(table, 4, "iid", seed=0)
        train_a, eval_a = split_clients(parts, 0.25, seed=5)
        train_b, eval_b = split_clients(parts, 0.25, seed=5)
        assert _ids(train_a) == _ids(train_b) and _ids(eval_a) == _ids(eval_b)
        for part, tr, ev in zip(parts, train_a, eval_a, strict=True):
            assert len(ev) == round(0.25 * len(part))
            assert sorted(list(tr["idx"]) + list(ev["idx"])) == sorted(part["idx"])

    def test_tiny_client(self, table):
        with pytest.raises(ValueError, match="Client 1 has 1 row"):
            split_clients([table.select(range(5)), table.select(range(1))])
        train, evaluation = split_clients([table.select(range(2))], 0.1)
        assert len(train[0]) == 1 and len(evaluation[0]) == 1
