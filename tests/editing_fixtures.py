"""Tiny random models of the three architectures, with matching ModelSpecs, for editor tests."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from editors.spec import ModelSpec
from runner.tokenizers import train_bpe
from tests.conftest import make_corpus

ARCHS = ("gpt2", "gptj", "llama")

SPECS = {
    "gpt2": ModelSpec(
        "transformer.h.{}",
        "transformer.h.{}.mlp.c_proj",
        "transformer.h.{}.attn.c_proj",
        "transformer.ln_f",
        "lm_head",
        3,
    ),
    "gptj": ModelSpec(
        "transformer.h.{}",
        "transformer.h.{}.mlp.fc_out",
        "transformer.h.{}.attn.out_proj",
        "transformer.ln_f",
        "lm_head",
        3,
    ),
    "llama": ModelSpec(
        "model.layers.{}",
        "model.layers.{}.mlp.down_proj",
        "model.layers.{}.self_attn.o_proj",
        "model.norm",
        "lm_head",
        3,
    ),
}


def tokenizer(arch: str):
    return train_bpe(make_corpus(), vocab_size=400, style="llama" if arch == "llama" else "gpt2")


def model(arch: str, tok, init: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    vocab = len(tok)
    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab, n_positions=128, n_embd=48, n_layer=3, n_head=4, initializer_range=init
        )
        return GPT2LMHeadModel(cfg).eval()
    if arch == "gptj":
        cfg = GPTJConfig(
            vocab_size=vocab,
            n_positions=128,
            n_embd=48,
            n_layer=3,
            n_head=4,
            rotary_dim=8,
            initializer_range=init,
        )
        return GPTJForCausalLM(cfg).eval()
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=init,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def given(editor, stats=None, cache=None):
    """``editor`` with its resources set (what ``prepare`` stores), context templates sampled at
    the first ``apply``; contract tests call ``prepare`` itself."""
    from editors.base import Resources

    editor.resources = Resources(stats=stats, targets=cache)
    return editor
