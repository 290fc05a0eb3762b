"""Federated data for peft-fed: datasets, client partitioning and task definitions."""

from .hellaswag import (
    HELLASWAG_FEATURES,
    HELLASWAG_HUB_ID,
    clean_hellaswag_text,
    load_hellaswag,
    normalize_hellaswag,
)
from .hub import CIFAR100_HUB_ID, METAMATHQA_HUB_ID, load_cifar100, load_metamathqa
from .partition import (
    PARTITION_SCHEMES,
    describe_partitions,
    group_natural_ids,
    label_distribution,
    mean_label_entropy,
    partition_dataset,
    split_clients,
)
from .registry import DATASET_REGISTRY, TaskDatasetInfo, available_datasets, load_task_dataset
from .tasks import (
    IGNORE_INDEX,
    PEFT_TASK_TYPES,
    TASK_TYPES,
    TaskSpec,
    multiple_choice_scores,
)
from .wordnet import (
    Synset,
    build_wordnet_define,
    build_wordnet_mc,
    build_wordnet_topic,
    category_counts,
    find_wordnet_dir,
    load_wordnet,
    wordnet_available,
)

__all__ = [
    "CIFAR100_HUB_ID",
    "METAMATHQA_HUB_ID",
    "DATASET_REGISTRY",
    "HELLASWAG_FEATURES",
    "HELLASWAG_HUB_ID",
    "IGNORE_INDEX",
    "PARTITION_SCHEMES",
    "PEFT_TASK_TYPES",
    "TASK_TYPES",
    "Synset",
    "TaskDatasetInfo",
    "TaskSpec",
    "available_datasets",
    "build_wordnet_define",
    "build_wordnet_mc",
    "build_wordnet_topic",
    "category_counts",
    "clean_hellaswag_text",
    "describe_partitions",
    "find_wordnet_dir",
    "group_natural_ids",
    "label_distribution",
    "load_cifar100",
    "load_hellaswag",
    "load_metamathqa",
    "load_task_dataset",
    "load_wordnet",
    "mean_label_entropy",
    "multiple_choice_scores",
    "normalize_hellaswag",
    "partition_dataset",
    "split_clients",
    "wordnet_available",
]
