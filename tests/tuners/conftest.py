"""Tiny random models for the tuner tests: a BERT classifier (nn.Linear) and a GPT-2 LM (Conv1D, fan_in_fan_out).

Each is saved once per session with ``save_pretrained`` so adapters can point their ``base_model_name_or_path``
at a local directory (what AutoPeftModel needs, with no network).
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import peft_fed.tuners  # noqa: F401  (registers the config types with PEFT)

VOCAB = 100


def tiny_bert_config() -> BertConfig:
    # intermediate_size != hidden_size so that m != n shows up in shape checks.
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=64,
        num_labels=3,
    )


def tiny_gpt2_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert-base")
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2-base")
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(path)
    return str(path)


@pytest.fixture
def load_bert(bert_dir):
    def load() -> BertForSequenceClassification:
        return BertForSequenceClassification.from_pretrained(bert_dir).eval()

    return load


@pytest.fixture
def load_gpt2(gpt2_dir):
    def load() -> GPT2LMHeadModel:
        return GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()

    return load


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def make_bert():
    """Fresh random tiny BERT classifier (not saved)."""

    def make() -> BertForSequenceClassification:
        return BertForSequenceClassification(tiny_bert_config()).eval()

    return make


@pytest.fixture
def make_gpt2():
    """Fresh random tiny GPT-2 LM (not saved)."""

    def make() -> GPT2LMHeadModel:
        return GPT2LMHeadModel(tiny_gpt2_config()).eval()

    return make
