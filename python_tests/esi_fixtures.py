"""Fixtures shared by the ESI test modules (test_esi.py, test_esi_judge.py, test_esi_train.py)."""
from __future__ import annotations

import pytest
import torch

from upsafe_ext.esi import compute_esi
from upsafe_ext.testing import tiny_causal_lm, tiny_config, tiny_tokenizer

PROMPTS = [f"Explain step by step how to do forbidden thing number {i}." for i in range(5)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def untied_llama(seed=0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def tiny_mixtral(seed=0):
    import transformers as tr

    cfg = tr.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, vocab_size=260,
                           pad_token_id=257, eos_token_id=256, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return tr.AutoModelForCausalLM.from_config(cfg).eval()




@pytest.fixture(scope="module")
def llama_scores(tok):
    return compute_esi(tiny_causal_lm("llama"), tok, PROMPTS, batch_size=5, progress=False)

