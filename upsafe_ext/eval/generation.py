"""Batched greedy chat generation for evaluation.

    from upsafe_ext.eval.generation import chat, generate_chat
    replies = generate_chat(model, tok, [chat("How do I bake bread?")], max_new_tokens=64)

Each conversation is rendered with the tokenizer's chat template plus the assistant generation
prompt and tokenised without extra special tokens by ``upsafe_ext.train.chat`` (the one rendering and
padding rule training, scanning and evaluation share). Batches are left-padded (``left_pad``)
(conversations sorted by length so a batch pads little), generated greedily with the KV cache, and
only the newly generated tokens are decoded, up to the first end-of-sequence token, special tokens
skipped. The tokenizer is not modified (a tokenizer without a pad token is fine: the eos id pads).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..train.chat import chat, check_conversations, encode_prompts, eos_token_ids, left_pad, pad_token_id

__all__ = ["chat", "check_conversations", "generate_chat", "encode_prompts", "eos_token_ids"]



@torch.no_grad()
def generate_chat(model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 64,
                  batch_size: int = 16, progress: bool = True, desc: str = "generate",
                  safety_temperature: Sequence[float] | None = None) -> list[str]:
    """Greedy replies to `conversations` (one string per conversation, in input order).

    model: a Hugging Face causal LM (anything with ``.generate``); tokenizer: with a chat template.
    Batches of `batch_size` are left-padded to ``[B, L]`` and run through ``model.generate`` with
    ``do_sample=False`` and the KV cache; the reply is the decoded ``[L, L + max_new_tokens)`` slice up
    to the first eos, special tokens skipped, surrounding whitespace stripped.
    safety_temperature: one τ per conversation for an upcycled model's ``generate`` (None: the model's own).
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate_chat: `max_new_tokens` must be a positive int, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"generate_chat: `batch_size` must be a positive int, got {batch_size!r}")
    prompts = encode_prompts(tokenizer, conversations)
    if safety_temperature is not None:
        safety_temperature = [float(t) for t in safety_temperature]
        if len(safety_temperature) != len(prompts):
            raise ValueError(f"generate_chat: `safety_temperature` needs one τ per conversation, got "
                             f"{len(safety_temperature)} for {len(prompts)}")
    if not prompts:
        return []
    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, model)
    device = next(model.parameters()).device
    padding_side = getattr(tokenizer, "padding_side", None)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                               pad_token_id=pad, eos_token_id=eos or None)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    replies: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False, unit="conv")
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            ids, mask = left_pad([prompts[i] for i in idx], pad)
            width = ids.shape[1]
            tau = {} if safety_temperature is None else {"safety_temperature": [safety_temperature[i] for i in idx]}
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=gen_cfg, **tau)
            new = out[:, width:].tolist()
            for row, i in enumerate(idx):
                toks = new[row]
                for j, t in enumerate(toks):
                    if t in eos:
                        toks = toks[:j]
                        break
                replies[i] = tokenizer.decode(toks, skip_special_tokens=True).strip()
            bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
        if padding_side is not None and getattr(tokenizer, "padding_side", None) != padding_side:
            tokenizer.padding_side = padding_side
    return [r if r is not None else "" for r in replies]
