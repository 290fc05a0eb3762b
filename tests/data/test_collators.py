"""Each task type's collator gives byte-identical batches to the collator before the refactor.

The reference is the pre-refactor `TaskCollator` (`pre_refactor_collator.py`). Compared live on the same
preprocessed rows: keys, values, shapes and dtypes, with tokenizers that pad on either side, with and without
`token_type_ids`, with `pad_to_multiple_of`, with extra (kept) columns and without labels.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from pre_refactor_collator import old_collator

from peft_fed.data.tasks import TaskSpec

MC = {
    "ctx": ["A woman fills a kettle. She", 'The noun "oak" means', "A man opens the door and", "Short"],
    "endings": [
        ["boils the water.", "eats the kettle whole.", "paints it red.", "sings."],
        ["a deciduous tree bearing acorns.", "a small boat.", "an old song about the sea.", "a cheese."],
        ["walks in.", "flies away over the roof of the house.", "sleeps.", "knocks twice on the frame."],
        ["an item.", "another one.", "and a third.", "and the last one of the four endings."],
    ],
    "label": [0, 1, 3, 2],
}
TEXT = {
    "text": ["a short one", "a somewhat longer sentence than the first", "mid length text", "x"],
    "pair": ["first pair", "p", "a third pair segment, longer", "q"],
    "label": [1, 0, 2, 1],
}
INSTRUCTIONS = {
    "instruction": ["Define the noun \"oak\".", "Say hi.", "Explain federated learning in one sentence please."],
    "response": ["A deciduous tree bearing acorns.", "Hi!", "Clients train locally; a server averages updates."],
}


def assert_identical(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> None:
    assert sorted(new) == sorted(old)
    for key in old:
        assert isinstance(new[key], torch.Tensor), key
        assert new[key].dtype == old[key].dtype, (key, new[key].dtype, old[key].dtype)
        assert new[key].shape == old[key].shape, (key, new[key].shape, old[key].shape)
        assert torch.equal(new[key], old[key]), key


@pytest.fixture(params=["encoder", "decoder", "decoder-left"])
def tokenizer(request, make_tokenizer):
    tok = make_tokenizer(encoder=request.param == "encoder")
    if request.param == "decoder-left":
        tok.padding_side = "left"  # the collators pad on their own fixed side, whatever the tokenizer says
    return tok


def _compare(spec: TaskSpec, rows: list[dict], tokenizer) -> None:
    for batch in (rows, rows[1:3], rows[:1]):
        assert_identical(spec.collator(tokenizer)(batch), old_collator(spec.task_type, tokenizer, spec.pad_to_multiple_of)(batch))


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
@pytest.mark.parametrize("pair", [False, True])
def test_seq_cls(tokenizer, pad_to_multiple_of, pair):
    spec = TaskSpec(
        "seq_cls", num_labels=3, max_length=16, text_pair_column="pair" if pair else None,
        pad_to_multiple_of=pad_to_multiple_of,
    )  # fmt: skip
    rows = list(spec.preprocess(datasets.Dataset.from_dict(TEXT), tokenizer, keep_columns=["text"]))
    assert "text" in rows[0]  # a kept raw column is not a model input: both collators ignore it
    _compare(spec, rows, tokenizer)
    _compare(spec, [{k: v for k, v in r.items() if k != "labels"} for r in rows], tokenizer)


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
@pytest.mark.parametrize("task_type", ["mc_encoder", "mc_causal"])
def test_multiple_choice(tokenizer, task_type, pad_to_multiple_of):
    spec = TaskSpec(task_type, max_length=24, pad_to_multiple_of=pad_to_multiple_of)
    rows = list(spec.preprocess(datasets.Dataset.from_dict(MC), tokenizer))
    _compare(spec, rows, tokenizer)
    if task_type == "mc_causal":
        _compare(spec, [{k: v for k, v in r.items() if k != "labels"} for r in rows], tokenizer)


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_causal_lm(tokenizer, pad_to_multiple_of):
    spec = TaskSpec("causal_lm", max_length=24, pad_to_multiple_of=pad_to_multiple_of)
    rows = list(spec.preprocess(datasets.Dataset.from_dict(INSTRUCTIONS), tokenizer))
    _compare(spec, rows, tokenizer)
    _compare(spec, [{k: v for k, v in r.items() if k != "labels"} for r in rows], tokenizer)


def test_image_cls():
    from PIL import Image
    from transformers import ViTImageProcessor

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(5)]
    raw = datasets.Dataset.from_dict({"img": images, "label": [0, 2, 1, 1, 0]})
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    spec = TaskSpec("image_cls", num_labels=3, image_column="img")
    rows = [row for row in spec.preprocess(raw, processor)]
    _compare(spec, rows, processor)
