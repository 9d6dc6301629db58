"""The magic-token mode in vLLM: a chat renderer that places the mode token, and the endpoint guard.

`UpsafeHfRenderer` is vLLM's ``HfRenderer`` (the renderer of every Hugging Face tokenizer, registered by
``upsafe_ext.serving.vllm_plugin`` for ``renderer_mode="hf"``). For a folder without
``magic_tokens.json`` it only refuses a ``safety_mode`` kwarg; for a magic folder it reads the request's
``chat_template_kwargs["safety_mode"]``, sanitises the client's strings and places the secret token
(`upsafe_ext.serving.magic_mode.MagicServing.prepare`) before the tokenizer's own chat template runs.
The token is read from the folder at server start; no template file holds it.

`MagicGuard` (``vllm serve DIR --middleware upsafe_ext.serving.vllm_magic.MagicGuard``) refuses the
requests that could show the client a rendered prompt (`magic_mode.guard_request`). A magic server
without it refuses every chat request (HTTP 400 saying so), so forgetting the flag cannot leak a token.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

from vllm.exceptions import VLLMValidationError
from vllm.renderers.hf import HfRenderer

from .magic_mode import MAGIC_MIDDLEWARE, SAFETY_MODE_KEY, MagicServing, guard_request

__all__ = ["UpsafeHfRenderer", "MagicGuard"]

logger = logging.getLogger("vllm.upsafe_ext.magic")  # under vLLM's logger: its handlers print it

# the magic folder served by this process (set by the renderer) and whether MagicGuard runs here
_STATE = {"serving": None, "guard": False}


def _model_dir(config) -> str | None:
    mc = getattr(config, "model_config", None)
    for d in (getattr(mc, "model", None), getattr(mc, "tokenizer", None)):
        if isinstance(d, str) and os.path.isdir(d):
            return d
    return None


class UpsafeHfRenderer(HfRenderer):
    """``HfRenderer`` plus the per-request magic-token mode (see the module docstring)."""

    def __init__(self, config, tokenizer) -> None:
        super().__init__(config, tokenizer)
        self.magic = MagicServing.from_dir(_model_dir(config)) if config is not None else None
        if self.magic is not None:
            _STATE["serving"] = self.magic
            logger.info("upsafe_ext: serving a magic-token model; safety_mode per request, negative mode %s",
                        "ENABLED (UPSAFE_ALLOW_NEGATIVE)" if self.magic.allow_negative else "disabled")

    def _magic_prepare(self, messages, params):
        kwargs = params.chat_template_kwargs or {}
        if self.magic is None:
            if SAFETY_MODE_KEY in kwargs:
                raise VLLMValidationError(f"chat_template_kwargs['{SAFETY_MODE_KEY}'] is only available for a "
                                          "magic-token model (this folder has no magic_tokens.json)",
                                          parameter=f"chat_template_kwargs.{SAFETY_MODE_KEY}")
            return messages, params
        if not _STATE["guard"]:
            raise VLLMValidationError("this server serves a magic-token model without its endpoint guard; the "
                                      f"operator must start it with --middleware {MAGIC_MIDDLEWARE}")
        try:
            msgs, kwargs, _ = self.magic.prepare(self.get_tokenizer(), messages, kwargs)
        except (ValueError, PermissionError) as e:  # messages never hold a token (no secret in them)
            raise VLLMValidationError(str(e), parameter=f"chat_template_kwargs.{SAFETY_MODE_KEY}"
                                      if SAFETY_MODE_KEY in str(e) else None) from None
        return msgs, dataclasses.replace(params, chat_template_kwargs=kwargs)

    def _scrub(self, conversation):
        if self.magic is None:
            return conversation
        for m in conversation:  # the rendered conversation must not carry the token anywhere it is echoed
            if isinstance(m.get("content"), str):
                m["content"] = self.magic.scrub(m["content"])
        return conversation

    def render_messages(self, messages, params):
        messages, params = self._magic_prepare(messages, params)
        conversation, prompt = super().render_messages(messages, params)
        return self._scrub(conversation), prompt

    async def render_messages_async(self, messages, params):
        messages, params = self._magic_prepare(messages, params)
        conversation, prompt = await super().render_messages_async(messages, params)
        return self._scrub(conversation), prompt


def _error_body(message: str, status: int) -> bytes:
    kind = "BadRequestError" if status == 400 else "ForbiddenError"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


class MagicGuard:
    """ASGI middleware: on a magic-token server, refuses (HTTP 400/403) the requests that
    `magic_mode.guard_request` names; a no-op on other servers."""

    def __init__(self, app) -> None:
        self.app = app
        _STATE["guard"] = True

    async def __call__(self, scope, receive, send):
        serving = _STATE["serving"]
        if scope.get("type") != "http" or serving is None or scope.get("method") == "GET":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:  # read the whole body, then replay it to the app
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, receive, send)
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        why = guard_request(scope.get("path", ""), scope.get("method", ""), body,
                            special_tokens=bool(serving.tokens.special))
        if why is not None:
            status = 400 if scope.get("path", "").rstrip("/") == "/v1/chat/completions" else 403
            data = _error_body(why, status)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
            return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
