"""Split a dataset across federated clients with the partitioners of `flwr-datasets`.

Schemes (`PARTITION_SCHEMES`):

* `iid`: shuffle (by `seed`), then equal contiguous shards (`IidPartitioner`); sizes differ by at most one.
* `dirichlet`: label skew, per-class proportions drawn from Dir(`alpha`) (`DirichletPartitioner`); small `alpha`
  (0.1) gives a few dominant classes per client, large `alpha` (100) approaches IID.
* `pathological`: each client holds exactly `classes_per_client` classes (`PathologicalPartitioner`).
* `shard`: sort by label, cut into shards, give each client `shards_per_client` shards (`ShardPartitioner`, the
  FedAvg paper's split).
* `natural_id`: one client per value of `natural_id_column` (e.g. HellaSwag's `activity_label`); with more distinct
  values than clients the values are grouped into exactly `num_clients` clients (see `group_natural_ids`).
* `linear` / `exponential`: quantity skew, client `i` gets a share proportional to `i` / `exp(i)` of the shuffled
  data (`LinearPartitioner` / `ExponentialPartitioner`).
* `size`: explicit client sizes `partition_sizes` (`SizePartitioner`) of the shuffled data.

All schemes except `pathological` (which may leave classes unused) and `shard` with a remainder assign every row to
exactly one client. Every scheme is a deterministic function of (dataset, arguments, seed).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    ExponentialPartitioner,
    IidPartitioner,
    LinearPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
    SizePartitioner,
)

logger = logging.getLogger(__name__)

PARTITION_SCHEMES: tuple[str, ...] = (
    "iid",
    "dirichlet",
    "pathological",
    "shard",
    "natural_id",
    "linear",
    "exponential",
    "size",
)
_LABEL_SCHEMES = ("dirichlet", "pathological", "shard")
_CLIENT_COLUMN = "__peft_fed_client__"


def _require_column(dataset: datasets.Dataset, column: str | None, scheme: str, argument: str) -> str:
    if column is None:
        raise ValueError(f"Partition scheme '{scheme}' needs `{argument}` (the column to partition by).")
    if column not in dataset.column_names:
        raise ValueError(
            f"Partition scheme '{scheme}' needs column '{column}' (`{argument}`), which the dataset lacks; "
            f"available columns: {dataset.column_names}."
        )
    return column


def group_natural_ids(values: Sequence[Hashable], num_clients: int) -> dict[Hashable, int]:
    """Map each distinct natural id to one of `num_clients` clients, balancing the number of rows per client.

    Longest-processing-time greedy: ids sorted by decreasing row count (ties by their string form) go one by one
    to the client with the fewest rows so far (ties to the lowest client index). Deterministic, every client gets
    at least one id when there are at least `num_clients` ids, and an id is never split across clients, so each
    client keeps the "natural" non-IID character of its ids. flwr's `GroupedNaturalIdPartitioner` groups a fixed
    number of ids per client and therefore cannot hit an arbitrary client count (e.g. 16 ids into 10 clients).
    """
    counts = Counter(values)
    if len(counts) < num_clients:
        raise ValueError(
            f"natural_id partitioning needs at least as many distinct ids as clients: {len(counts)} ids for "
            f"{num_clients} clients. Use fewer clients or another scheme (e.g. 'dirichlet')."
        )
    order = sorted(counts, key=lambda v: (-counts[v], str(v)))
    load = [0] * num_clients
    mapping: dict[Hashable, int] = {}
    for value in order:
        client = min(range(num_clients), key=lambda c: (load[c], c))
        mapping[value] = client
        load[client] += counts[value]
    return mapping


def _natural_id_partitions(
    dataset: datasets.Dataset, num_clients: int, column: str
) -> list[datasets.Dataset]:
    mapping = group_natural_ids(dataset[column], num_clients)
    # Partition on a client-index column so flwr's NaturalIdPartitioner yields exactly one partition per client.
    with_client = dataset.add_column(_CLIENT_COLUMN, [mapping[v] for v in dataset[column]])
    partitioner = NaturalIdPartitioner(partition_by=_CLIENT_COLUMN)
    partitioner.dataset = with_client
    # flwr numbers partitions in order of first appearance; re-index them by client number.
    by_client = {}
    for partition_id in range(partitioner.num_partitions):
        part = partitioner.load_partition(partition_id)
        by_client[part[0][_CLIENT_COLUMN]] = part.remove_columns(_CLIENT_COLUMN)
    return [by_client[c] for c in range(num_clients)]


def _make_partitioner(
    scheme: str,
    num_clients: int,
    *,
    label_column: str | None,
    alpha: float | Sequence[float],
    classes_per_client: int,
    class_assignment_mode: str,
    shards_per_client: int,
    partition_sizes: Sequence[int] | None,
    min_partition_size: int,
    seed: int,
) -> Partitioner:
    if scheme == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=label_column,
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if scheme == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by=label_column,
            num_classes_per_partition=classes_per_client,
            class_assignment_mode=class_assignment_mode,
            shuffle=True,
            seed=seed,
        )
    if scheme == "shard":
        return ShardPartitioner(
            num_partitions=num_clients,
            partition_by=label_column,
            num_shards_per_partition=shards_per_client,
            shuffle=True,
            seed=seed,
        )
    if scheme == "linear":
        return LinearPartitioner(num_partitions=num_clients)
    if scheme == "exponential":
        return ExponentialPartitioner(num_partitions=num_clients)
    if scheme == "size":
        if partition_sizes is None or len(partition_sizes) != num_clients:
            raise ValueError(
                f"Scheme 'size' needs `partition_sizes` with one size per client ({num_clients}), got {partition_sizes}."
            )
        return SizePartitioner(partition_sizes=list(partition_sizes))
    raise AssertionError(scheme)  # unreachable: validated by the caller


def partition_dataset(
    dataset: datasets.Dataset,
    num_clients: int,
    scheme: str = "iid",
    *,
    label_column: str | None = "label",
    natural_id_column: str | None = None,
    alpha: float | Sequence[float] = 0.5,
    classes_per_client: int = 2,
    class_assignment_mode: str = "first-deterministic",
    shards_per_client: int = 2,
    partition_sizes: Sequence[int] | None = None,
    min_partition_size: int = 2,
    seed: int = 0,
) -> list[datasets.Dataset]:
    """Split `dataset` into `num_clients` client datasets.

    Args:
        dataset: the (training) dataset to distribute.
        num_clients: number of clients (> 0, at most `len(dataset)`).
        scheme: one of `PARTITION_SCHEMES` (see the module docstring).
        label_column: class column for the label-skew schemes (`dirichlet`, `pathological`, `shard`).
        natural_id_column: id column for `natural_id` (e.g. `activity_label`, `category`).
        alpha: Dirichlet concentration (a scalar, or one value per client).
        classes_per_client: classes per client for `pathological`.
        class_assignment_mode: class assignment of `pathological`: `first-deterministic` (default: client `i` gets
            class `i % C` plus random others, so all classes are used when `num_clients >= C`), `deterministic`
            or `random` (see flwr's `PathologicalPartitioner`).
        shards_per_client: shards per client for `shard`.
        partition_sizes: client sizes for `size` (their sum may be below `len(dataset)`).
        min_partition_size: `dirichlet` resamples until every client has at least this many rows (flwr gives up
            after 10 tries, raised here as a `ValueError`). The default 2 keeps every client splittable into a
            local train and eval row by `split_clients`.
        seed: seeds shuffling and sampling; same arguments and seed give the same partitions.

    Returns:
        One `datasets.Dataset` per client, in client order.

    Raises:
        ValueError: unknown scheme, missing column, more clients than rows, a scheme that could not satisfy its
            constraints, or a client that came out empty (with the offending client ids and what to change).
    """
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"Unknown partition scheme '{scheme}'; choose one of {list(PARTITION_SCHEMES)}.")
    if num_clients < 1:
        raise ValueError(f"num_clients must be positive, got {num_clients}.")
    if num_clients > len(dataset):
        raise ValueError(
            f"Cannot split {len(dataset)} rows across {num_clients} clients: more clients than samples. "
            "Use fewer clients or a larger dataset."
        )

    if scheme == "natural_id":
        column = _require_column(dataset, natural_id_column, scheme, "natural_id_column")
        partitions = _natural_id_partitions(dataset, num_clients, column)
    else:
        if scheme in _LABEL_SCHEMES:
            _require_column(dataset, label_column, scheme, "label_column")
        else:
            # Without shuffling, the contiguous shards of these partitioners would inherit any ordering of the
            # data (e.g. sorted by label), silently turning a quantity skew into a label skew.
            dataset = dataset.shuffle(seed=seed)
        partitioner = _make_partitioner(
            scheme,
            num_clients,
            label_column=label_column,
            alpha=alpha,
            classes_per_client=classes_per_client,
            class_assignment_mode=class_assignment_mode,
            shards_per_client=shards_per_client,
            partition_sizes=partition_sizes,
            min_partition_size=min_partition_size,
            seed=seed,
        )
        partitioner.dataset = dataset
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                partitions = [partitioner.load_partition(i) for i in range(num_clients)]
        except ValueError as err:
            raise ValueError(_explain_failure(scheme, num_clients, len(dataset), err)) from err
        resamplings = 0
        for warning in caught:
            message = str(warning.message)
            if "min_partition_size" in message:
                resamplings += 1  # Dirichlet warns at every resampling: summarised below
            elif "will NOT be used" in message:
                logger.warning("Partition scheme '%s': %s", scheme, message)
            else:
                warnings.warn(message, warning.category, stacklevel=2)
        if resamplings:
            logger.info(
                "Dirichlet partitioning needed %d resampling(s) to reach min_partition_size=%d.",
                resamplings,
                min_partition_size,
            )

    empty = [i for i, part in enumerate(partitions) if len(part) == 0]
    if empty:
        raise ValueError(
            f"Partition scheme '{scheme}' left client(s) {empty} without data ({num_clients} clients, "
            f"{len(dataset)} rows). Raise `min_partition_size` (dirichlet) or `alpha`, use fewer clients, or pick a "
            "less skewed scheme."
        )
    return partitions


def _explain_failure(scheme: str, num_clients: int, num_rows: int, err: Exception) -> str:
    hint = {
        "dirichlet": "lower `min_partition_size`, raise `alpha`, or use fewer clients",
        "pathological": "lower `classes_per_client`, use fewer clients, or `class_assignment_mode='deterministic'`",
        "shard": "lower `shards_per_client` or use fewer clients",
        "linear": "use fewer clients (the smallest client gets ~2/(n(n+1)) of the data)",
        "exponential": "use fewer clients (the smallest client gets ~e^-(n-1) of the largest share), or 'linear'",
        "size": "make `partition_sizes` positive and sum to at most the dataset size",
    }.get(scheme, "check the arguments")
    return (
        f"Partition scheme '{scheme}' failed for {num_clients} clients on {num_rows} rows: {err} "
        f"(a client would come out empty or the scheme's constraints cannot be met): {hint}."
    )


def split_clients(
    partitions: Sequence[datasets.Dataset], eval_fraction: float = 0.2, *, seed: int = 0
) -> tuple[list[datasets.Dataset], list[datasets.Dataset]]:
    """Split every client's data into a local train and a local eval set.

    Each client holds out `round(eval_fraction * n)` rows (at least 1, at most `n - 1`); client `i` is split with
    seed `seed + i`, so the result is deterministic and independent of the other clients.

    Returns:
        `(train_partitions, eval_partitions)`, each a list in client order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    if eval_fraction == 0.0:  # every row trains (e.g. a deployed client's own file)
        return list(partitions), [part.select([]) for part in partitions]
    trains, evals = [], []
    for client, part in enumerate(partitions):
        n = len(part)
        if n < 2:
            raise ValueError(
                f"Client {client} has {n} row(s): cannot split it into train and eval. Raise "
                "`min_partition_size` / `alpha` or use fewer clients."
            )
        n_eval = min(n - 1, max(1, round(eval_fraction * n)))
        split = part.train_test_split(test_size=n_eval, seed=seed + client, shuffle=True)
        trains.append(split["train"])
        evals.append(split["test"])
    return trains, evals


def label_distribution(
    partitions: Sequence[datasets.Dataset], label_column: str = "label", labels: Sequence[Any] | None = None
) -> tuple[np.ndarray, list[Any]]:
    """Per-client label counts: a `(num_clients, num_labels)` array and the label order of its columns."""
    if labels is None:
        labels = sorted({v for part in partitions for v in part[label_column]}, key=str)
    index = {label: j for j, label in enumerate(labels)}
    counts = np.zeros((len(partitions), len(labels)), dtype=np.int64)
    for i, part in enumerate(partitions):
        for value, count in Counter(part[label_column]).items():
            counts[i, index[value]] = count
    return counts, list(labels)


def mean_label_entropy(partitions: Sequence[datasets.Dataset], label_column: str = "label") -> float:
    """Mean over clients of the entropy (in nats) of the client's label distribution: lower = more skewed."""
    counts, _ = label_distribution(partitions, label_column)
    probs = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(axis=1)
    return float(entropy.mean())


def describe_partitions(
    partitions: Sequence[datasets.Dataset], label_column: str | None = "label"
) -> dict[str, Any]:
    """Summary statistics of a partitioning (sizes, and label counts / entropy when `label_column` is given)."""
    summary: dict[str, Any] = {"num_clients": len(partitions), "sizes": [len(p) for p in partitions]}
    if label_column is not None and partitions and label_column in partitions[0].column_names:
        counts, labels = label_distribution(partitions, label_column)
        summary["labels"] = labels
        summary["label_counts"] = counts.tolist()
        summary["mean_label_entropy"] = mean_label_entropy(partitions, label_column)
    return summary
