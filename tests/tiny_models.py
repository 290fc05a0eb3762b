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
