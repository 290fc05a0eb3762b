from __future__ import annotations

import json

import datasets
import pytest

from peft_fed.data.registry import available_datasets, load_task_dataset
from peft_fed.data.wordnet import wordnet_available

requires_wordnet = pytest.mark.skipif(
    not wordnet_available(), reason="WordNet database (wordnet-base) not installed"
)


def test_available_datasets():
    assert available_datasets() == {
        "wordnet_topic": ("seq_cls",),
        "wordnet_mc": ("mc_encoder", "mc_causal"),
        "wordnet_define": ("causal_lm",),
        "hellaswag": ("mc_encoder", "mc_causal"),
        "cifar100": ("image_cls",),
        "metamathqa": ("causal_lm",),
    }


@requires_wordnet
class TestWordNetEntries:
    def test_topic(self):
        train, evaluation, info = load_task_dataset(
            "wordnet_topic", num_categories=3, samples_per_category=10
        )
        assert (len(train), len(evaluation)) == (24, 6) == (info.num_train, info.num_eval)
        assert info.task_type == "seq_cls" and info.num_labels == 3 and len(info.label_names) == 3
        spec = info.task_spec(max_length=32)
        assert spec.num_labels == 3 and spec.label_names == info.label_names and spec.max_length == 32

    def test_mc_task_types(self):
        _, _, info = load_task_dataset("wordnet_mc", num_categories=2, samples_per_category=5)
        assert info.task_type == "mc_encoder" and info.num_choices == 4
        assert info.natural_id_column == "activity_label"
        _, _, info = load_task_dataset("wordnet_mc", "mc_causal", num_categories=2, samples_per_category=5)
        assert info.task_spec().task_type == "mc_causal"
        with pytest.raises(
            ValueError, match=r"supports task types \['mc_encoder', 'mc_causal'\], not 'seq_cls'"
        ):
            load_task_dataset("wordnet_mc", "seq_cls")

    def test_define_and_subsampling(self):
        train, evaluation, info = load_task_dataset(
            "wordnet_define",
            num_categories=2,
            samples_per_category=10,
            max_train_samples=5,
            max_eval_samples=2,
        )
        assert info.task_type == "causal_lm" and info.natural_id_column == "category"
        assert (len(train), len(evaluation)) == (5, 2)
        again, _, _ = load_task_dataset(
            "wordnet_define", num_categories=2, samples_per_category=10, max_train_samples=5
        )
        assert again.to_list() == train.to_list()

    def test_bad_natural_id(self):
        with pytest.raises(ValueError, match="natural_id_column 'speaker'"):
            load_task_dataset(
                "wordnet_topic", natural_id_column="speaker", num_categories=2, samples_per_category=4
            )


class TestLocalFiles:
    def test_csv_with_string_labels(self, tmp_path):
        path = tmp_path / "reviews.csv"
        rows = [("great film", "pos"), ("dull plot", "neg"), ("loved it", "pos"), ("boring", "neg")] * 5
        path.write_text("review,sentiment\n" + "".join(f"{t},{y}\n" for t, y in rows))
        train, evaluation, info = load_task_dataset(
            path,
            "seq_cls",
            column_mapping={"review": "text", "sentiment": "label"},
            eval_fraction=0.25,
            cache_dir=str(tmp_path / "cache"),
        )
        assert (len(train), len(evaluation)) == (15, 5)
        assert info.label_names == ["neg", "pos"] and info.num_labels == 2
        assert isinstance(train.features["label"], datasets.ClassLabel)
        assert all(train.features["label"].int2str(y) in ("neg", "pos") for y in train["label"])

    def test_eval_path_and_int_labels(self, tmp_path):
        train_path, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
        train_path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3}) + "\n" for i in range(9)))
        eval_path.write_text("".join(json.dumps({"text": f"e{i}", "label": i % 3}) + "\n" for i in range(3)))
        train, evaluation, info = load_task_dataset(
            train_path, "seq_cls", eval_path=eval_path, cache_dir=str(tmp_path / "cache")
        )
        assert (len(train), len(evaluation)) == (9, 3) and info.num_labels == 3

    def test_missing_columns_name_task(self, tmp_path):
        path = tmp_path / "chat.jsonl"
        path.write_text("".join(json.dumps({"prompt": "hi", "answer": "hello"}) + "\n" for _ in range(4)))
        with pytest.raises(
            ValueError, match=r"task 'causal_lm': missing column\(s\) \['instruction', 'response'\]"
        ):
            load_task_dataset(path, "causal_lm", cache_dir=str(tmp_path / "cache"))
        _, _, info = load_task_dataset(
            path,
            "causal_lm",
            column_mapping={"prompt": "instruction", "answer": "response"},
            eval_fraction=0.25,
            cache_dir=str(tmp_path / "cache"),
        )
        assert info.task_type == "causal_lm"

    def test_local_hellaswag_file(self, hellaswag_path, tmp_path):
        train, evaluation, info = load_task_dataset(
            hellaswag_path,
            "mc_encoder",
            natural_id_column="activity_label",
            cache_dir=str(tmp_path / "cache"),
        )
        assert len(train) + len(evaluation) == 12 and info.num_choices == 4
        assert train.features["label"].dtype == "int64"

    def test_unknown_names(self, tmp_path):
        with pytest.raises(ValueError, match="not a registered dataset"):
            load_task_dataset("imdb")
        with pytest.raises(FileNotFoundError, match="No registered dataset or local file"):
            load_task_dataset(tmp_path / "nope.jsonl", "seq_cls")
        with pytest.raises(ValueError, match="Unknown task_type"):
            load_task_dataset(tmp_path, "regression")


def test_cifar100_and_metamathqa_load_from_a_local_copy_of_their_hub_schema(tmp_path):
    from PIL import Image

    features = datasets.Features({
        "img": datasets.Image(),
        "fine_label": datasets.ClassLabel(names=[f"f{i}" for i in range(100)]),
        "coarse_label": datasets.ClassLabel(names=[f"c{i}" for i in range(20)]),
    })  # fmt: skip
    image = Image.new("RGB", (8, 8))
    (tmp_path / "cifar").mkdir()
    for split in ("train", "test"):
        data = {"img": [image] * 4, "fine_label": [0, 7, 99, 7], "coarse_label": [0, 1, 19, 1]}
        datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "cifar" / f"{split}.parquet"))
    train, evaluation, info = load_task_dataset("cifar100", path=str(tmp_path / "cifar"))
    assert info.task_type == "image_cls" and info.num_labels == 100 and info.label_column == "fine_label"
    spec = info.task_spec()
    assert spec.image_column == "img" and spec.label_column == "fine_label" and len(evaluation) == 4

    rows = [{"query": f"q{i}", "response": f"r{i}", "type": "GSM_SV"} for i in range(50)]
    datasets.Dataset.from_list(rows).to_json(str(tmp_path / "math.jsonl"))
    train, evaluation, info = load_task_dataset("metamathqa", path=str(tmp_path / "math.jsonl"), eval_fraction=0.1)
    assert info.task_type == "causal_lm" and (len(train), len(evaluation)) == (45, 5)
    spec = info.task_spec()
    assert (spec.instruction_column, spec.response_column) == ("query", "response")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['response'\]"):
        datasets.Dataset.from_list([{"query": "q", "type": "x"}] * 4).to_json(str(tmp_path / "bad.jsonl"))
        load_task_dataset("metamathqa", path=str(tmp_path / "bad.jsonl"))
