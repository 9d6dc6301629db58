"""Batched greedy chat generation for evaluation.

    from upsafe_ext.eval.generation import chat, generate_chat
    replies = generate_chat(model, tok, [chat("How do I bake bread?")], max_new_tokens=64)

Each conversation is rendered with the tokenizer's chat template plus the assistant generation
prompt (``upsafe_ext.train.sft.render_chat``) and tokenised without extra special tokens (the template
already contains them), exactly as ``encode_sft`` does for training. Batches are left-padded by hand
(conversations sorted by length so a batch pads little), generated greedily with the KV cache, and
only the newly generated tokens are decoded, up to the first end-of-sequence token, special tokens
skipped. The tokenizer is not modified (a tokenizer without a pad token is fine: the eos id pads).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..train.sft import render_chat

__all__ = ["chat", "generate_chat", "encode_prompts", "eos_token_ids"]


def chat(prompt: str, system: str | None = None) -> list[dict]:
    """A one-turn conversation: ``[{"role": "system", ...}?, {"role": "user", "content": prompt}]``."""
    if not isinstance(prompt, str):
        raise ValueError(f"chat: `prompt` must be a str, got {type(prompt).__name__}")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"chat: `system` must be a str or None, got {type(system).__name__}")
    conv = [] if system is None else [{"role": "system", "content": system}]
    conv.append({"role": "user", "content": prompt})
    return conv


def _check_conversations(conversations, op: str) -> list[list[dict]]:
    if isinstance(conversations, (str, dict)) or not isinstance(conversations, Sequence):
        raise ValueError(f"{op}: `conversations` must be a list of conversations (lists of message dicts), "
                         f"got {type(conversations).__name__}; wrap a prompt with chat(prompt)")
    out = []
    for i, conv in enumerate(conversations):
        if isinstance(conv, str) or not isinstance(conv, Sequence) or not conv:
            raise ValueError(f"{op}: conversations[{i}] must be a non-empty list of message dicts, got {conv!r:.80}")
        for m in conv:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"{op}: conversations[{i}] has a message without role/content: {m!r:.80}")
        out.append(list(conv))
    return out


def encode_prompts(tokenizer, conversations: Sequence[Sequence[dict]]) -> list[list[int]]:
    """Token ids of each conversation rendered with the generation prompt (no extra special tokens)."""
    convs = _check_conversations(conversations, "encode_prompts")
    texts = [render_chat(tokenizer, c, add_generation_prompt=True) for c in convs]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def eos_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the tokenizer's eos plus the model generation config's eos id(s)."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(gen, "eos_token_id", None)):
        if src is None:
            continue
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _pad_id(tokenizer, eos: list[int]) -> int:
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    return eos[0] if eos else 0


@torch.no_grad()
def generate_chat(model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 64,
                  batch_size: int = 16, progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy replies to `conversations` (one string per conversation, in input order).

    model: a Hugging Face causal LM (anything with ``.generate``); tokenizer: with a chat template.
    Batches of `batch_size` are left-padded to ``[B, L]`` and run through ``model.generate`` with
    ``do_sample=False`` and the KV cache; the reply is the decoded ``[L, L + max_new_tokens)`` slice up
    to the first eos, special tokens skipped, surrounding whitespace stripped.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate_chat: `max_new_tokens` must be a positive int, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"generate_chat: `batch_size` must be a positive int, got {batch_size!r}")
    prompts = encode_prompts(tokenizer, conversations)
    if not prompts:
        return []
    eos = eos_token_ids(model, tokenizer)
    pad = _pad_id(tokenizer, eos)
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
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompts[i]
                ids[row, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=gen_cfg)
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
