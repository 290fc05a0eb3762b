from __future__ import annotations

import json

import datasets
import pytest
import torch

from peft_fed.data.hellaswag import (
    HELLASWAG_FEATURES,
    clean_hellaswag_text,
    load_hellaswag,
    normalize_hellaswag,
)
from peft_fed.data.registry import load_task_dataset
from peft_fed.data.tasks import TaskSpec


@pytest.fixture(scope="module")
def hellaswag(hellaswag_path):
    return load_hellaswag(hellaswag_path)


def test_fixture_has_hub_schema(hellaswag_path):
    rows = [json.loads(line) for line in hellaswag_path.read_text().splitlines()]
    assert len(rows) == 12
    assert list(rows[0]) == [
        "ind",
        "activity_label",
        "ctx_a",
        "ctx_b",
        "ctx",
        "endings",
        "source_id",
        "split",
        "split_type",
        "label",
    ]
    assert all(
        isinstance(r["label"], str) and isinstance(r["ind"], int) and len(r["endings"]) == 4 for r in rows
    )


def test_loads_with_split_column(hellaswag):
    train, evaluation = hellaswag["train"], hellaswag["validation"]
    assert len(train) == 8 and len(evaluation) == 4
    assert train.features == HELLASWAG_FEATURES
    assert set(train["split"]) == {"train"} and set(evaluation["split"]) == {"val"}
    assert list(train["label"]) == [0, 1, 2, 3, 0, 1, 2, 3]
    # WikiHow markup is stripped from contexts and endings.
    assert not any("[" in ctx for ctx in train["ctx"])
    assert train[4]["ctx"] == "How to water houseplants. Check the soil. Push a finger into the soil"


def test_clean_text():
    assert clean_hellaswag_text("[header] How to x [title] Do y. [step]  Then z") == "How to x. Do y. Then z"


def test_normalize_string_labels_and_unlabeled_rows():
    raw = datasets.Dataset.from_dict(
        {
            "ctx_a": ["A man sits.", "A dog runs."],
            "ctx_b": ["he", "it"],
            "endings": [["a", "b", "c", "d"], ["e", "f", "g", "h"]],
            "label": ["2", ""],
        }
    )
    out = normalize_hellaswag(raw)
    assert len(out) == 1 and out[0]["label"] == 2 and out[0]["ctx"] == "A man sits. He"
    assert out.features == HELLASWAG_FEATURES


def test_normalize_missing_columns():
    raw = datasets.Dataset.from_dict({"question": ["q"], "label": ["0"]})
    with pytest.raises(ValueError, match=r"missing column\(s\) \['endings', 'ctx \(or ctx_a and ctx_b\)'\]"):
        normalize_hellaswag(raw)


def test_eval_fraction_fallback(tmp_path, hellaswag_path):
    lines = [json.loads(line) for line in hellaswag_path.read_text().splitlines()]
    path = tmp_path / "train_only.jsonl"
    path.write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in lines))
    data = load_hellaswag(path, eval_fraction=0.25, seed=0, cache_dir=str(tmp_path / "cache"))
    assert len(data["train"]) == 9 and len(data["validation"]) == 3


def test_registry_paths(hellaswag_path):
    train, evaluation, info = load_task_dataset("hellaswag", "mc_causal", path=hellaswag_path)
    assert (len(train), len(evaluation)) == (8, 4)
    assert info.num_choices == 4 and info.natural_id_column == "activity_label"
    spec = info.task_spec(max_length=64)
    assert spec.task_type == "mc_causal" and spec.natural_id_column == "activity_label"
    with pytest.raises(ValueError, match="supports task types"):
        load_task_dataset("hellaswag", "seq_cls", path=hellaswag_path)


def test_preprocess_mc_encoder(hellaswag, encoder_tokenizer, tiny_bert_mc):
    spec = TaskSpec("mc_encoder", max_length=256)
    data = spec.preprocess(hellaswag["train"], encoder_tokenizer)
    assert data.column_names == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    raw, row = hellaswag["train"][0], data[0]
    assert len(row["input_ids"]) == 4
    for j in range(4):
        # Each choice is the pair [CLS] context [SEP] ending [SEP].
        assert (
            encoder_tokenizer.decode(row["input_ids"][j]) == f"[CLS]{raw['ctx']}[SEP]{raw['endings'][j]}[SEP]"
        )
        assert set(row["token_type_ids"][j]) == {0, 1}
    batch = spec.collator(encoder_tokenizer)([data[i] for i in range(3)])
    assert (
        batch["input_ids"].shape[:2] == (3, 4) and batch["input_ids"].shape == batch["token_type_ids"].shape
    )
    assert batch["labels"].tolist() == [0, 1, 2]
    with torch.no_grad():
        loss, logits = spec.compute_loss(tiny_bert_mc, batch)
    assert logits.shape == (3, 4) and torch.isfinite(loss)


def test_mc_encoder_truncation(hellaswag, encoder_tokenizer):
    data = TaskSpec("mc_encoder", max_length=24).preprocess(hellaswag["train"], encoder_tokenizer)
    assert max(len(ids) for row in data["input_ids"] for ids in row) == 24


def test_preprocess_mc_causal(hellaswag, decoder_tokenizer):
    spec = TaskSpec("mc_causal", max_length=256)
    data = spec.preprocess(hellaswag["validation"], decoder_tokenizer)
    assert data.column_names == ["input_ids", "ending_mask", "labels"]
    raw = hellaswag["validation"][0]
    row = data[0]
    for j in range(4):
        ids, mask = row["input_ids"][j], row["ending_mask"][j]
        ending = [t for t, m in zip(ids, mask, strict=True) if m]
        context = [t for t, m in zip(ids, mask, strict=True) if not m]
        assert decoder_tokenizer.decode(ending) == " " + raw["endings"][j]
        assert decoder_tokenizer.decode(context) == raw["ctx"]
        assert mask == sorted(mask)  # the ending is a suffix
