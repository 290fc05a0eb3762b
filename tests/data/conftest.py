"""Shared fixtures for the data tests: byte-level tokenizers and tiny random-weight models (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForMultipleChoice,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

HELLASWAG_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hellaswag_tiny.jsonl"


@pytest.fixture(scope="session")
def hellaswag_path() -> Path:
    return HELLASWAG_FIXTURE


def make_byte_tokenizer(encoder: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges: every byte is a token, nothing to train or download.

    `encoder=True` adds BERT-style `[CLS] a [SEP] b [SEP]` templates with token type ids; `encoder=False` behaves
    like a GPT/Llama tokenizer (no special tokens added, `" word"` keeps its leading space byte).
    """
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
