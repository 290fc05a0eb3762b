from __future__ import annotations

import re

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, EvalPrediction

from peft_fed.data.tasks import IGNORE_INDEX, TASK_CLASSES, TASK_TYPES, TaskSpec, multiple_choice_scores
from peft_fed.data.tasks.base import register_task

MC_ROWS = {
    "ctx": ["A woman fills a kettle. She", 'The noun "oak" means', "A man opens the door and", ""],
    "endings": [
        ["boils the water.", "eats the kettle whole.", "paints it red.", "sings."],
        [
            "a deciduous tree bearing acorns.",
            "a small boat.",
            "an old song about the sea.",
            "a kind of cheese.",
        ],
        ["walks in.", "flies away over the roof of the house.", "sleeps.", "knocks twice on the frame."],
        ["an item without context.", "another one.", "and a third.", "and the last one."],
    ],
    "label": [0, 1, 3, 2],
}


@pytest.fixture(scope="module")
def mc_raw() -> datasets.Dataset:
    return datasets.Dataset.from_dict(MC_ROWS)


def explicit_scores(model, data: datasets.Dataset) -> torch.Tensor:
    """Reference: run every (context + ending) unpadded and average the ending tokens' log-probabilities."""
    scores = torch.zeros(len(data), 4)
    with torch.no_grad():
        for i, row in enumerate(data):
            for j in range(4):
                ids = torch.tensor([row["input_ids"][j]])
                mask = torch.tensor(row["ending_mask"][j], dtype=torch.bool)
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                token_logp = logp[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)  # position t predicts t + 1
                scores[i, j] = token_logp[mask[1:]].mean()
    return scores


class TestMultipleChoiceCausal:
    def test_loss_matches_explicit_mean_log_prob(self, mc_raw, decoder_tokenizer, tiny_llama):
        spec = TaskSpec("mc_causal", max_length=128)
        data = spec.preprocess(mc_raw, decoder_tokenizer)
        batch = spec.collator(decoder_tokenizer)(list(data))
        with torch.no_grad():
            loss, scores = spec.compute_loss(tiny_llama, batch)
        expected = explicit_scores(tiny_llama, data)
        assert scores.shape == (4, 4)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            loss, F.cross_entropy(expected, torch.tensor(MC_ROWS["label"])), atol=1e-5, rtol=1e-5
        )

    def test_peft_model_and_gradients(self, mc_raw, decoder_tokenizer, tiny_llama):
        spec = TaskSpec("mc_causal", max_length=128)
        data = spec.preprocess(mc_raw, decoder_tokenizer)
        batch = spec.collator(decoder_tokenizer)(list(data))
        with torch.no_grad():
            _, base_scores = spec.compute_loss(tiny_llama, batch)
        peft_model = get_peft_model(
            tiny_llama, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
        )
        try:
            loss, scores = spec.compute_loss(peft_model, batch)
            # LoRA starts as the identity (B = 0): same scores through the PeftModel wrapper.
            torch.testing.assert_close(scores, base_scores, atol=1e-5, rtol=1e-5)
            loss.backward()
            grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
            assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        finally:
            peft_model.unload()

    def test_wrapped_model_is_unwrapped(self, mc_raw, decoder_tokenizer, tiny_llama):
        class Wrapper(torch.nn.Module):  # the shape of DDP / DeepSpeed engines: forward(*args, **kwargs)
            def __init__(self, module):
                super().__init__()
                self.module = module

            def forward(self, *args, **kwargs):
                return self.module(*args, **kwargs)

        spec = TaskSpec("mc_causal", max_length=128)
        batch = spec.collator(decoder_tokenizer)(list(spec.preprocess(mc_raw, decoder_tokenizer)))
        with torch.no_grad():
            _, direct = spec.compute_loss(tiny_llama, batch)
            _, wrapped = spec.compute_loss(Wrapper(tiny_llama), batch)
        torch.testing.assert_close(direct, wrapped)

    def test_empty_context_uses_bos(self, mc_raw, decoder_tokenizer):
        data = TaskSpec("mc_causal").preprocess(mc_raw, decoder_tokenizer)
        row = data[3]
        assert row["input_ids"][0][0] == decoder_tokenizer.bos_token_id and row["ending_mask"][0][0] == 0

    def test_truncation_keeps_the_ending(self, mc_raw, decoder_tokenizer):
        spec = TaskSpec("mc_causal", max_length=16)
        data = spec.preprocess(mc_raw, decoder_tokenizer)
        for row in data:
            for ids, mask in zip(row["input_ids"], row["ending_mask"], strict=True):
                assert len(ids) <= 16 and mask[0] == 0 and sum(mask) >= 1
        # "flies away over the roof of the house." is longer than 15 bytes: cut to 15 tokens + 1 context token.
        assert sum(data[2]["ending_mask"][1]) == 15

    def test_collator_left_pads(self, mc_raw, decoder_tokenizer):
        spec = TaskSpec("mc_causal")
        data = spec.preprocess(mc_raw, decoder_tokenizer)
        batch = spec.collator(decoder_tokenizer)(list(data))
        assert set(batch) == {"input_ids", "attention_mask", "ending_mask", "labels"}
        ids, attention, endings = batch["input_ids"][0], batch["attention_mask"][0], batch["ending_mask"][0]
        assert (attention[:, -1] == 1).all() and (endings[:, -1] == 1).all()
        shortest = int(attention.sum(-1).argmin())
        assert attention[shortest, 0] == 0 and ids[shortest, 0] == decoder_tokenizer.pad_token_id

    def test_scores_need_context(self):
        ids = torch.ones(1, 2, 3, dtype=torch.long)
        with pytest.raises(ValueError, match="context token"):
            multiple_choice_scores(torch.nn.Identity(), ids, ids, ids)


INSTRUCTIONS = {
    "instruction": ['Define the noun "oak".', 'Define the verb "run".'],
    "response": ["A deciduous tree bearing acorns.", "Move fast by using your legs."],
}


class TestCausalLM:
    def test_prompt_tokens_are_masked(self, decoder_tokenizer, tiny_llama):
        spec = TaskSpec("causal_lm", max_length=256, use_chat_template=False)
        data = spec.preprocess(datasets.Dataset.from_dict(INSTRUCTIONS), decoder_tokenizer)
        assert data.column_names == ["input_ids", "labels"]
        for row, instruction, response in zip(data, *INSTRUCTIONS.values(), strict=True):
            prompt = spec.prompt_template.format(instruction=instruction)
            n_prompt = len(decoder_tokenizer(prompt)["input_ids"])
            assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
            target = row["labels"][n_prompt:]
            assert IGNORE_INDEX not in target
            assert decoder_tokenizer.decode(target) == response + decoder_tokenizer.eos_token
            assert row["input_ids"][n_prompt:] == target
        batch = spec.collator(decoder_tokenizer)(list(data))
        with torch.no_grad():
            loss, logits = spec.compute_loss(tiny_llama, batch)
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
            expected = F.cross_entropy(shifted, batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(loss, expected)
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()

    def test_chat_template_and_truncation(self, make_tokenizer):
        tokenizer = make_tokenizer(encoder=False)
        tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>{% endif %}"
        spec = TaskSpec("causal_lm", max_length=24)
        row = spec.preprocess(datasets.Dataset.from_dict(INSTRUCTIONS), tokenizer)[0]
        assert len(row["input_ids"]) == 24
        n_masked = row["labels"].count(IGNORE_INDEX)
        # Half the budget is kept for the response, the prompt is cut from the left (keeping its end).
        assert n_masked == 12 and row["input_ids"][n_masked - 1] == tokenizer.bos_token_id
        assert tokenizer.decode(row["labels"][n_masked:]) == INSTRUCTIONS["response"][0][:12]
        with pytest.raises(ValueError, match="no chat template"):
            TaskSpec("causal_lm", use_chat_template=True).format_prompt("x", make_tokenizer(encoder=False))

    def test_metrics_use_response_tokens(self):
        spec = TaskSpec("causal_lm")
        labels = np.array([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, 8, IGNORE_INDEX]])
        # predictions at t are compared with labels at t + 1
        logits = torch.zeros(2, 4, 10)
        for b, t, token in [(0, 1, 5), (0, 2, 6), (1, 0, 7), (1, 1, 0)]:
            logits[b, t, token] = 1.0
        preds = spec.preprocess_logits_for_metrics(logits, torch.from_numpy(labels))
        assert preds.shape == (2, 4)
        metrics = spec.compute_metrics(EvalPrediction(predictions=preds.numpy(), label_ids=labels))
        assert metrics == {"accuracy": 0.75}


class TestSequenceClassification:
    def test_end_to_end(self, encoder_tokenizer):
        raw = datasets.Dataset.from_dict(
            {
                "text": ["a red fruit", "a large mammal", "a sweet fruit", "a small mammal"],
                "label": ["fruit", "animal", "fruit", "animal"],
            }
        )
        spec = TaskSpec("seq_cls", label_names=["animal", "fruit"], max_length=12)
        assert spec.num_labels == 2 and spec.peft_task_type == "SEQ_CLS"
        data = spec.preprocess(raw, encoder_tokenizer)
        assert list(data["labels"]) == [1, 0, 1, 0]
        assert max(len(ids) for ids in data["input_ids"]) == 12
        torch.manual_seed(0)
        model = BertForSequenceClassification(
            BertConfig(
                vocab_size=len(encoder_tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_labels=2,
            )
        )
        batch = spec.collator(encoder_tokenizer)(list(data))
        model.eval()  # no dropout, to compare with `evaluate` below
        with torch.no_grad():
            loss, logits = spec.compute_loss(model, batch)
        assert logits.shape == (4, 2) and torch.isfinite(loss)
        model.train()
        accuracy = spec.compute_metrics(
            EvalPrediction(predictions=logits.detach().numpy(), label_ids=batch["labels"].numpy())
        )["accuracy"]
        result = spec.evaluate(model, data, encoder_tokenizer, batch_size=3)
        assert result["num_samples"] == 4 and result["accuracy"] == pytest.approx(accuracy)
        assert result["loss"] == pytest.approx(float(loss), rel=1e-4)
        assert model.training  # evaluate restores the mode

    def test_label_errors(self, encoder_tokenizer):
        spec = TaskSpec("seq_cls", num_labels=2)
        with pytest.raises(ValueError, match="out of range"):
            spec.preprocess(datasets.Dataset.from_dict({"text": ["x"], "label": [2]}), encoder_tokenizer)
        with pytest.raises(ValueError, match="neither a class name"):
            spec.preprocess(datasets.Dataset.from_dict({"text": ["x"], "label": ["cat"]}), encoder_tokenizer)


class TestValidation:
    def test_spec_arguments(self):
        with pytest.raises(ValueError, match="Unknown task_type 'qa'"):
            TaskSpec("qa")
        with pytest.raises(ValueError, match="num_labels >= 2"):
            TaskSpec("seq_cls")
        with pytest.raises(ValueError, match="num_labels=3 but 2 label_names"):
            TaskSpec("seq_cls", num_labels=3, label_names=["a", "b"])
        with pytest.raises(ValueError, match="placeholder"):
            TaskSpec("causal_lm", prompt_template="no slot")

    @pytest.mark.parametrize(
        ("task_type", "columns", "missing"),
        [
            ("seq_cls", {"sentence": ["x"], "label": [0]}, "['text']"),
            ("mc_encoder", {"ctx": ["x"], "label": [0]}, "['endings']"),
            ("mc_causal", {"question": ["x"]}, "['ctx', 'endings', 'label']"),
            ("causal_lm", {"instruction": ["x"]}, "['response']"),
        ],
    )
    def test_missing_columns_named(self, task_type, columns, missing, decoder_tokenizer):
        spec = TaskSpec(task_type, num_labels=2 if task_type == "seq_cls" else None)
        with pytest.raises(
            ValueError, match=rf"task '{task_type}': missing column\(s\) {re.escape(missing)}"
        ):
            spec.preprocess(datasets.Dataset.from_dict(columns), decoder_tokenizer, name="toy")

    def test_wrong_number_of_endings(self, decoder_tokenizer):
        raw = datasets.Dataset.from_dict({"ctx": ["x"], "endings": [["a", "b", "c"]], "label": [0]})
        with pytest.raises(ValueError, match=r"\[3\] endings.*num_choices=4"):
            TaskSpec("mc_causal").preprocess(raw, decoder_tokenizer)

    def test_unknown_task_type(self):
        with pytest.raises(ValueError, match="Unknown task_type 'qa'"):
            TaskSpec("qa")


def test_one_class_per_task_type():
    assert TASK_TYPES == ("seq_cls", "mc_encoder", "mc_causal", "causal_lm", "image_cls")
    for name, cls in TASK_CLASSES.items():
        spec = TaskSpec(name, num_labels=2)
        assert type(spec) is cls and isinstance(spec, TaskSpec) and spec.task_type == name
        assert type(cls(task_type=name, num_labels=2)) is cls
    with pytest.raises(ValueError, match="is the task type 'seq_cls', got task_type='causal_lm'"):
        TASK_CLASSES["seq_cls"](task_type="causal_lm")


def test_adding_a_task_type_is_one_class(monkeypatch):
    monkeypatch.setattr("peft_fed.data.tasks.base.TASK_CLASSES", dict(TASK_CLASSES))

    @register_task("token_count")
    class TokenCountTask(TaskSpec):
        @property
        def required_columns(self) -> list[str]:
            return [self.text_column]

    spec = TaskSpec("token_count")
    assert type(spec) is TokenCountTask and not spec.is_multiple_choice and spec.peft_task_type is None
    with pytest.raises(ValueError, match="already registered"):
        register_task("token_count")(TokenCountTask)


@pytest.mark.parametrize("task_type", ["mc_causal", "causal_lm"])
def test_transformers_trainer_integration(task_type, tmp_path, mc_raw, decoder_tokenizer):
    """A Trainer subclass delegating to `spec.compute_loss` trains and reports `eval_accuracy` on a PeftModel."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(decoder_tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    spec = TaskSpec(task_type, max_length=64)
    raw = mc_raw if task_type == "mc_causal" else datasets.Dataset.from_dict(INSTRUCTIONS)
    data = spec.preprocess(raw, decoder_tokenizer)
    peft_model = get_peft_model(
        model, LoraConfig(task_type=spec.peft_task_type, target_modules=["q_proj", "v_proj"])
    )

    class TaskTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not spec.needs_custom_loss:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, logits = spec.compute_loss(model, inputs)
            return (loss, {"logits": logits}) if return_outputs else loss

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        **spec.training_args_overrides,
    )
    trainer = TaskTrainer(
        model=peft_model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=spec.collator(decoder_tokenizer),
        compute_metrics=spec.compute_metrics,
        preprocess_logits_for_metrics=spec.preprocess_logits_for_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and np.isfinite(metrics["eval_loss"])
    reference = spec.evaluate(peft_model, data, decoder_tokenizer, batch_size=2)
    assert metrics["eval_accuracy"] == pytest.approx(reference["accuracy"])


def _image_dataset(n: int = 6) -> datasets.Dataset:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(n)]}, features=features)


def test_image_cls_needs_classes_and_an_image_column():
    with pytest.raises(ValueError, match="image_cls needs num_labels >= 2"):
        TaskSpec("image_cls")
    spec = TaskSpec("image_cls", num_labels=3)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image'\]"):
        spec.check_dataset(_image_dataset())


def test_image_cls_resizes_on_the_fly_and_stacks_batches():
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    spec = TaskSpec("image_cls", num_labels=3, image_column="img")
    data = spec.preprocess(_image_dataset(), processor)
    assert data.column_names == ["img", "label"]  # images stay compressed; pixels are made when rows are read
    row = data[4]
    assert set(row) == {"pixel_values", "labels"} and tuple(row["pixel_values"].shape) == (3, 16, 16)
    assert row["labels"] == 1
    batch = spec.collator(processor)([data[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["labels"].tolist() == [0, 1, 2, 0]
    expected = processor(_image_dataset()[4]["img"], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(batch["pixel_values"][0], data[0]["pixel_values"]) and torch.allclose(row["pixel_values"], expected)


def test_accuracy_metric_loads_offline_from_the_package(tmp_path):
    """The `evaluate` accuracy script ships in the package: it loads with the Hub off and an empty module cache."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, torch\n"
        "from peft_fed.data.tasks import TaskSpec\n"
        "spec = TaskSpec('seq_cls', num_labels=3)\n"
        "logits = torch.tensor([[0., 1, 0], [2, 0, 0], [0, 0, 1], [1, 0, 0]])\n"
        "print(spec.accuracy(logits, np.array([1, 0, 0, 0])))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "m")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0.75"


@pytest.mark.parametrize(
    ("task_type", "raw", "kwargs"),
    [
        ("mc_causal", MC_ROWS, {}),
        ("seq_cls", {"text": ["a red fruit", "a large mammal", "a sweet fruit", "a small mammal"] * 2,
                     "label": ["fruit", "animal", "fruit", "animal"] * 2}, {"label_names": ["animal", "fruit"]}),
    ],
)  # fmt: skip
def test_tokenizing_the_partitions_in_one_pass_equals_each_on_its_own(task_type, raw, kwargs, decoder_tokenizer):
    spec = TaskSpec(task_type, max_length=24, **kwargs)
    data = datasets.Dataset.from_dict(raw)
    order = np.random.default_rng(0).permutation(len(data)).tolist()
    partitions = [data.select(order[:1]), data.select(order[1:3]), data.select(order[3:])]  # as a partitioner gives
    together = spec.preprocess_partitions(partitions, decoder_tokenizer)
    alone = [spec.preprocess(partition, decoder_tokenizer) for partition in partitions]
    assert [len(d) for d in together] == [len(d) for d in partitions]
    for joint, own in zip(together, alone, strict=True):
        assert joint.column_names == own.column_names and joint[:] == own[:]
    assert spec.preprocess_partitions([], decoder_tokenizer) == []


def test_image_partitions_keep_their_own_lazy_transform():
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    spec = TaskSpec("image_cls", num_labels=3, image_column="img")
    data = _image_dataset()
    clients = spec.preprocess_partitions([data.select([0, 1]), data.select([2, 3, 4, 5])], processor)
    assert [len(c) for c in clients] == [2, 4]
    assert torch.equal(clients[1][2]["pixel_values"], spec.preprocess(data, processor)[4]["pixel_values"])
