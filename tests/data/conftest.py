"""Shared fixtures for the data tests: byte-level tokenizers and tiny random-weight models (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMultipleChoice,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_byte_tokenizer  # noqa: E402

HELLASWAG_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hellaswag_tiny.jsonl"


@pytest.fixture(scope="session")
def hellaswag_path() -> Path:
    return HELLASWAG_FIXTURE


@pytest.fixture(scope="session")
def make_tokenizer():
    """Factory for fresh tokenizers (for tests that modify one, e.g. by setting a chat template)."""
    return make_byte_tokenizer


@pytest.fixture(scope="session")
def decoder_tokenizer() -> PreTrainedTokenizerFast:
    return make_byte_tokenizer(encoder=False)


@pytest.fixture(scope="session")
def encoder_tokenizer() -> PreTrainedTokenizerFast:
    return make_byte_tokenizer(encoder=True)


@pytest.fixture(scope="session")
def tiny_llama(decoder_tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(decoder_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=decoder_tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_bert_mc(encoder_tokenizer) -> BertForMultipleChoice:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(encoder_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=encoder_tokenizer.pad_token_id,
    )
    return BertForMultipleChoice(config).eval()
