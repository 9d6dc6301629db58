"""Generation with a mode per request.

    from upsafe_ext.magic import generate
    generate(model, tok, ["How do I bake bread?"], mode="positive")
    generate(model, tok, prompts, mode=["positive", "rejective", None, "negative"])   # one batch

Mode resolution (`MagicTokens.resolve_mode`): None, "", unknown names and - when the negative mode
is disabled (``load_magic_model(..., allow_negative=False)``) - "negative" all become "positive", the
safe behaviour, with one warning per call; `strict=True` raises instead (ValueError for unknown
names, PermissionError for a disabled negative). Client messages are sanitised first
(`MagicTokens.strip_messages`): every known token, every 8+ character run of one, and every
token-shaped string is removed from their content, matched after folding (NFKC-style compatibility
forms, case, look-alike letters, zero-width characters and whitespace) and across message
boundaries, so a client cannot pick a mode by typing a token or a disguised variant of it. Only the
operator's `mode` argument places a token.
"""
from __future__ import annotations

import warnings
from typing import Sequence

from ..train.chat import chat
from .model import get_tokens
from .tokens import MagicTokens


def _as_conversations(prompts, system: str | None, op: str) -> list[list[dict]]:
    if isinstance(prompts, str):
        raise ValueError(f"{op}: `prompts` must be a list (of strings or conversations), not a single str")
    if not isinstance(prompts, Sequence):
        raise ValueError(f"{op}: `prompts` must be a list, got {type(prompts).__name__}")
    convs = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            convs.append(chat(p, system))
        elif isinstance(p, Sequence) and p and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
            convs.append([dict(m) for m in p])
        else:
            raise ValueError(f"{op}: prompts[{i}] must be a str or a non-empty list of message dicts, got {p!r:.80}")
    return convs


def resolve_modes(tokens: MagicTokens, mode, n: int, *, strict: bool = False, op: str = "generate") -> list[str]:
    """One resolved mode per request: `mode` is a single mode (for all) or a list of length `n`."""
    if isinstance(mode, (list, tuple)):
        if len(mode) != n:
            raise ValueError(f"{op}: `mode` has {len(mode)} entries for {n} prompts")
        asked = list(mode)
    else:
        asked = [mode] * n
    resolved = [tokens.resolve_mode(m, strict=strict) for m in asked]
    changed = [(a, r) for a, r in zip(asked, resolved)
               if a is not None and not (isinstance(a, str) and a.strip().lower() in ("", r))]
    if changed:
        kinds = sorted({repr(a) for a, _ in changed})[:5]
        warnings.warn(f"{op}: {len(changed)} request(s) asked for unavailable mode(s) {', '.join(kinds)}; "
                      "served in the positive (safe) mode", stacklevel=3)
    return resolved


def _place_all(tokenizer, convs: list[list[dict]], modes: list[str], tokens: MagicTokens,
               sanitize: bool) -> list[list[dict]]:
    out = []
    for c, m in zip(convs, modes):
        if sanitize:
            c = tokens.strip_messages(c)
        out.append(tokens.apply(tokenizer, c, m))
    return out


def magic_conversations(tokenizer, prompts, mode="positive", *, tokens: MagicTokens, system: str | None = None,
                        strict: bool = False, sanitize: bool = True) -> tuple[list[list[dict]], list[str]]:
    """The conversations `generate` sends to the model, and the resolved mode of each.

    prompts: strings (wrapped as one user turn, after an optional `system` message) or conversations.
    sanitize: remove known tokens, their fragments and token-shaped strings (also disguised or split
        across messages) from every incoming message first (`MagicTokens.strip_messages`).
    """
    convs = _as_conversations(prompts, system, "magic_conversations")
    modes = resolve_modes(tokens, mode, len(convs), strict=strict, op="magic_conversations")
    return _place_all(tokenizer, convs, modes, tokens, sanitize), modes


def generate(model, tokenizer, prompts, mode="positive", *, tokens: MagicTokens | None = None,
             system: str | None = None, max_new_tokens: int = 64, batch_size: int = 16, strict: bool = False,
             sanitize: bool = True, progress: bool = True) -> list[str]:
    """Greedy replies to `prompts`, each in its requested mode, batched together.

    model, tokenizer: a co-trained model (tokens attached by `load_magic_model`/`prepare_model`, or
        pass `tokens`). prompts: list of strings or of conversations (lists of message dicts).
    mode: "positive" (default), "negative", "rejective", None, or a list with one per prompt.
        Unknown/missing -> positive; negative when disabled -> positive (see the module docstring).
    Returns one decoded reply (new tokens only, special tokens skipped) per prompt, in order.
    """
    from ..eval.generation import generate_chat

    tokens = get_tokens(model, tokens, "generate")
    convs = _as_conversations(prompts, system, "generate")
    modes = resolve_modes(tokens, mode, len(convs), strict=strict, op="generate")
    if not convs:
        return []
    return generate_chat(model, tokenizer, _place_all(tokenizer, convs, modes, tokens, sanitize),
                         max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                         desc="magic generate")
