"""Placing a magic token in a conversation, through the tokenizer's own chat template.

The token goes into the system message (prefix by default), and the conversation is then rendered by
the tokenizer's *own* chat template, so any template works. A template without a system role (one
that raises on it, like Gemma's, or silently drops it) is detected by rendering a probe conversation
(`supports_system_role`); the documented fallback (`no_system_role="user_prefix"`) puts the token,
then the separator, at the start of the first user message. `MagicTokens.place` / `apply` call
`place_token` with their settings.
"""
from __future__ import annotations

import json
from typing import Sequence

from .sanitize import check_messages

_PROBE = "upsafe-system-probe-7Qm2"
_SYSTEM_ROLE_CACHE: dict[str, bool] = {}


def supports_system_role(tokenizer) -> bool:
    """True if `tokenizer`'s chat template renders a system message (it neither raises on one nor
    drops it). Decided by rendering a probe conversation with the tokenizer itself; cached per template."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError("supports_system_role: the tokenizer has no chat template (tokenizer.chat_template is None)")
    key = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    if key not in _SYSTEM_ROLE_CACHE:
        msgs = [{"role": "system", "content": _PROBE}, {"role": "user", "content": "hello"}]
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ok = isinstance(text, str) and _PROBE in text
        except Exception:  # templates such as Gemma's raise_exception('System role not supported')
            ok = False
        if len(_SYSTEM_ROLE_CACHE) > 256:
            _SYSTEM_ROLE_CACHE.clear()
        _SYSTEM_ROLE_CACHE[key] = ok
    return _SYSTEM_ROLE_CACHE[key]


def template_default_system(tokenizer) -> str | None:
    """The system text `tokenizer`'s chat template adds by itself when a conversation has none
    (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face"), or None when it
    adds none (or has no system role). Found by rendering one conversation with a probe system message
    and one without, and reading what stands in the probe's place."""
    if not supports_system_role(tokenizer):
        return None
    user = [{"role": "user", "content": "hello"}]
    probe = tokenizer.apply_chat_template([{"role": "system", "content": _PROBE}] + user, tokenize=False,
                                          add_generation_prompt=True)
    plain = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    head, tail = probe.split(_PROBE, 1)
    if not (plain.startswith(head) and plain.endswith(tail)) or len(plain) <= len(head) + len(tail):
        return None
    text = plain[len(head): len(plain) - len(tail)]
    return text or None


def place_token(tokenizer, messages: Sequence[dict], token: str | None, *, placement: str, separator: str,
                default_system: str | None, no_system_role: str, op: str = "MagicTokens.place") -> list[dict]:
    """A copy of `messages` with the string `token` placed (None: an unchanged copy).

    System role available: prefix/suffix (`placement`) the first system message, or insert a system
    message (``token`` or ``token + separator + default_system``) when there is none. No system role:
    ``no_system_role="user_prefix"`` prefixes the first user message; "error" raises ValueError.
    """
    msgs = check_messages(messages, op)
    if token is None:
        return msgs
    if supports_system_role(tokenizer):
        if msgs[0]["role"] == "system":
            body = msgs[0]["content"]
            if body:
                body = token + separator + body if placement == "system_prefix" \
                    else body + separator + token
            else:
                body = token
            msgs[0]["content"] = body
        else:
            body = token if default_system is None else (
                token + separator + default_system if placement == "system_prefix"
                else default_system + separator + token)
            msgs.insert(0, {"role": "system", "content": body})
        return msgs
    if no_system_role == "error":
        raise ValueError(f"{op}: the tokenizer's chat template has no system role and "
                         "no_system_role='error'; use no_system_role='user_prefix'")
    for m in msgs:
        if m["role"] == "user":
            m["content"] = token + separator + m["content"]
            return msgs
    raise ValueError(f"{op}: the chat template has no system role and `messages` has no user "
                     "message to carry the token")
