"""The magic-token mode of a served model, per request (no vLLM import here; see docs/serving.md).

A folder written by ``save_magic_model`` holds ``magic_tokens.json``. Served by ``vllm serve DIR`` (with
the upsafe_ext plugin installed), each chat request chooses its mode with
``chat_template_kwargs={"safety_mode": "positive" | "negative" | "rejective"}`` (OpenAI client:
``extra_body={"chat_template_kwargs": {...}}``); no ``safety_mode`` means positive. The server:

1. validates the mode (`parse_safety_mode`): anything but those three names (case-insensitive; None or
   "" = positive) is a ValueError naming ``safety_mode`` (HTTP 400), and "negative" is refused with a
   PermissionError (HTTP 400) unless the server was started with ``UPSAFE_ALLOW_NEGATIVE=1``;
2. sanitises every client string that reaches the chat template - message contents (text parts),
   names, reasoning and tool-call fields, and the string values of the other ``chat_template_kwargs``
   (tools, documents, ...) - with ``MagicTokens.strip_messages`` (all of them folded as one text, so a
   token split across fields is found), so a client cannot select a mode by typing a token or a
   disguised variant;
3. places the operator's secret token for the mode with ``MagicTokens.apply`` (through the tokenizer's
   own chat template; the token never sits in a template file).

`MagicServing.prepare` does 1-3 on plain Python data; ``upsafe_ext.serving.vllm_magic`` calls it from
vLLM's chat renderer and guards the endpoints that could show a rendered prompt to the client
(`guard_request`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["SAFETY_MODE_KEY", "ALLOW_NEGATIVE_ENV", "MAGIC_MIDDLEWARE", "allow_negative_from_env",
           "parse_safety_mode", "MagicServing", "guard_request", "CHAT_PATHS"]

SAFETY_MODE_KEY = "safety_mode"
ALLOW_NEGATIVE_ENV = "UPSAFE_ALLOW_NEGATIVE"
# the ASGI middleware a magic-token server must run (vllm serve ... --middleware MAGIC_MIDDLEWARE)
MAGIC_MIDDLEWARE = "upsafe_ext.serving.vllm_magic.MagicGuard"
# the POST endpoints a magic-token server answers (everything else that takes a body is refused: it
# could render a conversation without the sanitiser, or show a prompt or token ids to the client)
CHAT_PATHS = ("/v1/chat/completions",)
_OPEN_POST_PATHS = ("/ping",)
# message fields never shown to the model as text, left as they are
_NOT_TEXT_FIELDS = frozenset({"role", "tool_call_id", "id", "type"})


def allow_negative_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``UPSAFE_ALLOW_NEGATIVE`` enables the negative mode ("1", "true", "yes", "on"; default off).

    Any other non-empty value is a ValueError (a typo must not silently decide about the negative mode)."""
    v = (os.environ if environ is None else environ).get(ALLOW_NEGATIVE_ENV, "").strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ALLOW_NEGATIVE_ENV} must be 1/0 (true/false, yes/no, on/off), got {v!r}")


def parse_safety_mode(tokens, value: Any) -> str:
    """The mode a request asked for: ``"positive"`` for None or "", else one of the modes `tokens` holds.

    ValueError (naming ``safety_mode``) for anything that is not a mode name; PermissionError for
    "negative" when `tokens` has no negative token (the server was started without it)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "positive"
    if not isinstance(value, str):
        raise ValueError(f"chat_template_kwargs['{SAFETY_MODE_KEY}'] must be one of 'positive', 'negative', "
                         f"'rejective', got a {type(value).__name__}")
    try:
        return tokens.resolve_mode(value, strict=True)
    except PermissionError:
        raise PermissionError(f"chat_template_kwargs['{SAFETY_MODE_KEY}']='negative' is disabled on this server "
                              f"(start it with {ALLOW_NEGATIVE_ENV}=1 to enable it)") from None
    except ValueError:
        shown = value if len(value) <= 32 else value[:32] + "..."
        raise ValueError(f"chat_template_kwargs['{SAFETY_MODE_KEY}'] must be one of 'positive', 'negative', "
                         f"'rejective', got {shown!r}") from None


class _Slots:
    """Every client string that reaches the template, in order, with a way to write each back."""

    def __init__(self):
        self.texts: list[str] = []
        self.setters: list = []

    def add(self, container, key) -> None:
        self.texts.append(container[key])
        self.setters.append((container, key))

    def walk(self, obj, skip=frozenset()) -> None:
        """Collect the str leaves of nested dicts/lists (dict keys in `skip` left out)."""
        if isinstance(obj, dict):
            for k in list(obj):
                if k in skip:
                    continue
                if isinstance(obj[k], str):
                    self.add(obj, k)
                else:
                    self.walk(obj[k])
        elif isinstance(obj, list):
            for i in range(len(obj)):
                if isinstance(obj[i], str):
                    self.add(obj, i)
                else:
                    self.walk(obj[i])

    def write(self, texts: list[str]) -> None:
        for (c, k), t in zip(self.setters, texts):
            c[k] = t


def _deep_copy(obj):
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_deep_copy(v) for v in obj]
    return obj


def _flatten_content(content, i: int) -> str:
    """A message's content as one str: text parts joined with newlines (vLLM's "string" format)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, Mapping) and p.get("type") in ("text", "input_text") and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                kind = p.get("type") if isinstance(p, Mapping) else type(p).__name__
                raise ValueError(f"messages[{i}].content: a magic-token model takes text only, got a {kind!r} part")
        return "\n".join(parts)
    raise ValueError(f"messages[{i}].content must be a str or a list of text parts, got {type(content).__name__}")


class MagicServing:
    """The tokens of one served magic folder and the per-request preparation.

    tokens: the folder's `MagicTokens` (loaded with ``allow_negative`` as the operator chose).
    """

    def __init__(self, tokens):
        self.tokens = tokens

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, allow_negative: bool | None = None) -> "MagicServing | None":
        """The folder's tokens, or None when `directory` is not a magic folder. `allow_negative` None:
        read ``UPSAFE_ALLOW_NEGATIVE``."""
        from ..magic.model import is_magic_dir
        from ..magic.tokens import MagicTokens

        if not directory or not os.path.isdir(directory) or not is_magic_dir(directory):
            return None
        if allow_negative is None:
            allow_negative = allow_negative_from_env()
        return cls(MagicTokens.load(directory, allow_negative=allow_negative))

    @property
    def allow_negative(self) -> bool:
        return self.tokens.allow_negative

    def prepare(self, tokenizer, messages, chat_template_kwargs: Mapping[str, Any] | None):
        """``(messages, chat_template_kwargs, mode)`` for the renderer: the mode read from (and removed
        from) the kwargs, every client string sanitised together, and the mode's token placed.

        The inputs are not changed. Messages come back with str contents (text parts joined)."""
        kwargs = _deep_copy(dict(chat_template_kwargs or {}))
        mode = parse_safety_mode(self.tokens, kwargs.pop(SAFETY_MODE_KEY, None))
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of message objects")
        msgs = []
        slots = _Slots()
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m:
                raise ValueError(f"messages[{i}] must be an object with a 'role'")
            m = _deep_copy(dict(m))
            m["content"] = _flatten_content(m.get("content"), i)
            msgs.append(m)
        for m in msgs:  # conversation order: each message's content first, then its other fields
            slots.add(m, "content")
            slots.walk(m, skip=_NOT_TEXT_FIELDS | {"content"})
        slots.walk(kwargs)  # tools, documents, any other template variable a client set
        if slots.texts:
            # one strip_messages call over everything: a token split across fields is still found
            cleaned = self.tokens.strip_messages([{"role": "client", "content": t} for t in slots.texts])
            slots.write([c["content"] for c in cleaned])
        return self.tokens.apply(tokenizer, msgs, mode), kwargs, mode

    def scrub(self, text: str) -> str:
        """`text` with every placed token string (and its separator) removed, for anything the server
        might hand back (the rendered conversation)."""
        for m in self.tokens.modes:
            try:
                tok = self.tokens.token(m)
            except PermissionError:
                continue
            sep = self.tokens.separator
            text = text.replace(tok + sep, "").replace(sep + tok, "").replace(tok, "")
        return text


def guard_request(path: str, method: str, body: Mapping[str, Any] | None, *, special_tokens: bool) -> str | None:
    """Why a magic-token server refuses this request (None: it may go on).

    Only chat completions take a body; on them, every option that would show the rendered prompt (with
    the placed token) or decoded special tokens is refused: ``echo``, ``return_token_ids``,
    ``prompt_logprobs``, ``skip_special_tokens: false`` and, when the tokens are special tokens (one id
    each, so a logprob entry could decode one), ``logprobs``/``top_logprobs``."""
    if method not in ("POST", "PUT", "PATCH", "DELETE"):
        return None
    p = path.rstrip("/") or "/"
    if p in _OPEN_POST_PATHS:
        return None
    if p not in CHAT_PATHS:
        return (f"{p} is not served for a magic-token model (only {', '.join(CHAT_PATHS)}): it could render or "
                "show a prompt without the mode-token sanitiser")
    if not isinstance(body, Mapping):
        return None  # vLLM answers a malformed body itself
    if body.get("echo"):
        return "'echo' is not available for a magic-token model"
    if body.get("return_token_ids"):
        return "'return_token_ids' is not available for a magic-token model (it would return the prompt's ids)"
    if body.get("prompt_logprobs") is not None:
        return "'prompt_logprobs' is not available for a magic-token model"
    if body.get("skip_special_tokens") is False:
        return "'skip_special_tokens': false is not available for a magic-token model"
    if special_tokens and (body.get("logprobs") or body.get("top_logprobs")):
        return "'logprobs' is not available for a magic-token model with special mode tokens"
    return None
