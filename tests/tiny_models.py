"""Tiny random-weight models for unit tests (never for results): a BERT classifier and a GPT-2 LM."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel


def tiny_bert_config(num_labels: int = 3) -> BertConfig:
    return BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def tiny_gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0)


def tiny_bert(num_labels: int = 3, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config()).eval()


def lora_bert(r: int = 4, seed: int = 0, config_cls=LoraConfig, **kwargs):
    kwargs.setdefault("target_modules", ["query", "value"])
    kwargs.setdefault("modules_to_save", ["classifier"])
    return get_peft_model(tiny_bert(seed=seed), config_cls(r=r, lora_alpha=2 * r, lora_dropout=0.0, **kwargs))


def lora_gpt2(r: int = 4, seed: int = 0):
    return get_peft_model(
        tiny_gpt2(seed=seed), LoraConfig(r=r, lora_alpha=r, target_modules=["c_attn"], fan_in_fan_out=True)
    )


def token_batch(n: int = 6, length: int = 10, seed: int = 0, num_labels: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 99, (n, length), generator=g),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "labels": torch.randint(0, num_labels, (n,), generator=g),
    }


def classification_loss(model, batch):
    return model(**batch).loss


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]).loss


def make_byte_tokenizer(encoder: bool):
    """A byte-level BPE tokenizer without merges: every byte is a token, nothing to train or download.

    `encoder=True` adds BERT-style `[CLS] a [SEP] b [SEP]` templates with token type ids; `encoder=False` behaves
    like a GPT/Llama tokenizer (no special tokens added, `" word"` keeps its leading space byte).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "[CLS]", "[SEP]"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    kwargs = {}
    if encoder:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        kwargs = {
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        }
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", **kwargs
    )


def save_stand_in(kind: str, folder) -> str:
    """Write a tiny random-weight stand-in of a preset's model family to `folder` (HF format); return its path.

    `roberta`: a RoBERTa encoder (multiple choice); `llama`: a Llama decoder (SmolLM / Llama-3.2 family);
    `llama-wide`: the same with 128-wide projections (room for FedSmoothLoRA's 2r <= min(m, n) at r=32);
    `vit`: a ViT image classifier on 32x32 images with its image processor.
    """
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        RobertaConfig,
        RobertaForMultipleChoice,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    torch.manual_seed(0)
    folder = str(folder)
    if kind == "vit":
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, num_labels=10)  # fmt: skip
        ViTForImageClassification(config).save_pretrained(folder)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
        return folder
    tokenizer = make_byte_tokenizer(encoder=kind == "roberta")
    if kind == "roberta":
        model = RobertaForMultipleChoice(RobertaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=600, pad_token_id=tokenizer.pad_token_id, type_vocab_size=2,
        ))  # fmt: skip
    elif kind in ("llama", "llama-wide"):
        width = 128 if kind == "llama-wide" else 32
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4 if kind == "llama-wide" else 2, max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
        ))  # fmt: skip
    else:
        raise ValueError(f"unknown stand-in kind {kind!r}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
