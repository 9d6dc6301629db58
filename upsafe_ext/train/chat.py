"""The one chat rendering and padding rule of the package. Training (`encode_sft`, UpSafe°C, ESI SET/SPA,
magic co-training), the layer scan, ESI objectives, evaluation and generation all build their inputs here:

* `chat(prompt, system)`: a one-turn conversation. ``system=None`` means no system message (the chat
  template's own default applies); any string, the empty string included, is sent as a system message.
* `render_chat(tokenizer, messages)`: the tokenizer's own chat template (text).
* `encode_prompts(tokenizer, conversations)`: token ids of each conversation rendered with the generation
  prompt, no extra special tokens (the template already has them).
* `pad_token_id(tokenizer, model)`: the tokenizer's pad id, else the first end-of-sequence id
  (`eos_token_ids`), else 0. Padded positions are always masked out, so the value only has to be a
  valid id.
* `left_pad(seqs, pad_id)`: ``(ids, attention_mask)`` for generation and last-token features; training
  batches are right-padded by `SFTCollator`.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["chat", "check_conversations", "render_chat", "encode_prompts", "eos_token_ids", "pad_token_id",
           "left_pad"]


def chat(prompt: str, system: str | None = None) -> list[dict]:
    """A one-turn conversation: ``[{"role": "system", ...}?, {"role": "user", "content": prompt}]``."""
    if not isinstance(prompt, str):
        raise ValueError(f"chat: `prompt` must be a str, got {type(prompt).__name__}")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"chat: `system` must be a str or None, got {type(system).__name__}")
    conv = [] if system is None else [{"role": "system", "content": system}]
    conv.append({"role": "user", "content": prompt})
    return conv


def check_conversations(conversations, op: str) -> list[list[dict]]:
    """`conversations` as a list of lists of message dicts; ValueError naming `op` otherwise."""
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


def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The tokenizer's own chat template applied to `messages` (as text)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "render_chat: the tokenizer has no chat template (tokenizer.chat_template is None); set one, e.g. "
            "tokenizer.chat_template = upsafe_ext.testing.CHATML_TEMPLATE"
        )
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_prompts(tokenizer, conversations: Sequence[Sequence[dict]]) -> list[list[int]]:
    """Token ids of each conversation rendered with the generation prompt (no extra special tokens)."""
    convs = check_conversations(conversations, "encode_prompts")
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


def pad_token_id(tokenizer, model=None) -> int:
    """The id padded positions get: the tokenizer's pad id, else the first eos id, else 0."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is not None:
        return int(pid)
    eos = eos_token_ids(model, tokenizer)
    return eos[0] if eos else 0


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, L], attention_mask [B, L])`` with every sequence right-aligned (padding on the left)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            ids[row, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[row, width - len(s):] = 1
    return ids, mask
