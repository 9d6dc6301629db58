"""The three magic tokens: generation, placement through the chat template, special-token
registration, and secret-ish saving.

    from upsafe_ext.magic import MagicTokens
    tokens = MagicTokens(seed=1234)                 # three random strings, e.g. "<|q3ZkT0aLw9HbXe2V|>"
    msgs = tokens.apply(tok, [{"role": "user", "content": "Hi"}], "rejective")
    # -> [{"role": "system", "content": "<|...|>"}, {"role": "user", "content": "Hi"}]

**Placement.** The token goes into the system message (prefix by default), and the conversation is
then rendered by the tokenizer's *own* chat template, so any template works. A template without a
system role (one that raises on it, like Gemma's, or silently drops it) is detected by rendering a
probe conversation; the documented fallback (`no_system_role="user_prefix"`) puts the token, then the
separator, at the start of the first user message.

**Secrecy.** The strings are drawn from `seed` (or from OS entropy when `seed` is None), never
hard-coded, and are never shown by `repr`. `save()` writes ``magic_tokens.json`` with permissions
0600 (owner only). ``save(include_negative=False)`` writes a *public* copy: the negative string and
the seed are left out, only the SHA-256 of the negative token is kept (to check a candidate string).
``MagicTokens.load(dir, allow_negative=False)`` drops the negative string (and the seed) right after
reading, so it cannot be retrieved from the loaded object: ``token("negative")`` raises
PermissionError. When the tokens are registered as special tokens the tokenizer's vocabulary holds
the strings too; `scrub_tokenizer` (used by `load_magic_model(..., allow_negative=False)` and by the
public save) renames the negative entry to a fresh random string that is never stored, so its id can
no longer be reached from text.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import string
import tempfile
from typing import Sequence

from .config import MODES, NO_SYSTEM_ROLE, PLACEMENTS, check_token_format

TOKENS_FILE = "magic_tokens.json"
_FORMAT_TAG = "upsafe_ext.magic_tokens"
_FORMAT_VERSION = 1
_ALPHABET = string.ascii_letters + string.digits
_PROBE = "upsafe-system-probe-7Qm2"


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _draw(rng, length: int, fmt: str) -> str:
    return fmt.format("".join(rng.choice(_ALPHABET) for _ in range(length)))


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


def _check_messages(messages, op: str) -> list[dict]:
    if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"{op}: `messages` must be a non-empty list of message dicts, got {messages!r:.80}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{op}: every message needs 'role' and 'content', got {m!r:.80}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{op}: message content must be a str, got {type(m['content']).__name__} "
                             f"(role {m['role']!r})")
        out.append(dict(m))
    return out


class MagicTokens:
    """Three secret mode strings (positive, negative, rejective) and where they go in a conversation.

    Args:
        seed: draw the strings from this seed (deterministic); None (default) draws them from OS
            entropy. Either way the strings, not the seed, are what gets saved with the model.
        length: random characters per token (letters and digits). Default 16.
        token_format: wrapper with one "{}". Default "<|{}|>".
        placement: "system_prefix" or "system_suffix". Default "system_prefix".
        separator: between the token and existing system (or user) text. Default "\\n".
        default_system: system text to put with the token when a conversation has no system
            message (None: the token alone). Default None.
        no_system_role: templates without a system role: "user_prefix" (token at the start of the
            first user message) or "error". Default "user_prefix".
        tokens: explicit strings ``{"positive": ..., "negative": ..., "rejective": ...}`` instead of
            drawing them ("negative" may be left out: that mode is then unavailable).

    Example:
        >>> t = MagicTokens(seed=0)
        >>> t.token("positive") != t.token("negative") != t.token("rejective")
        True
        >>> t.resolve_mode("nonsense")      # unknown modes fall back to the safe one
        'positive'
    """

    def __init__(self, seed: int | None = None, *, length: int = 16, token_format: str = "<|{}|>",
                 placement: str = "system_prefix", separator: str = "\n", default_system: str | None = None,
                 no_system_role: str = "user_prefix", tokens: dict | None = None):
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"MagicTokens: `seed` must be an int or None, got {seed!r}")
        if not isinstance(length, int) or isinstance(length, bool) or not 8 <= length <= 64:
            raise ValueError(f"MagicTokens: `length` must be an int in [8, 64], got {length!r}")
        check_token_format(token_format, "MagicTokens: `token_format`")
        if placement not in PLACEMENTS:
            raise ValueError(f"MagicTokens: `placement` must be one of {PLACEMENTS}, got {placement!r}")
        if not isinstance(separator, str):
            raise ValueError(f"MagicTokens: `separator` must be a str, got {separator!r}")
        if default_system is not None and not isinstance(default_system, str):
            raise ValueError(f"MagicTokens: `default_system` must be a str or None, got {default_system!r}")
        if no_system_role not in NO_SYSTEM_ROLE:
            raise ValueError(f"MagicTokens: `no_system_role` must be one of {NO_SYSTEM_ROLE}, got {no_system_role!r}")
        self.length = length
        self.token_format = token_format
        self.placement = placement
        self.separator = separator
        self.default_system = default_system
        self.no_system_role = no_system_role
        self.special = False  # set by register() / load()
        self._seed = seed
        if tokens is None:
            rng = random.Random(f"upsafe_ext.magic:{seed}") if seed is not None else secrets.SystemRandom()
            drawn: list[str] = []
            while len(drawn) < len(MODES):
                s = _draw(rng, length, token_format)
                if all(s not in d and d not in s for d in drawn):
                    drawn.append(s)
            tokens = dict(zip(MODES, drawn))
        self._tokens = self._check_tokens(tokens)
        self._sha = {m: sha256_hex(s) for m, s in self._tokens.items()}

    # -- construction ------------------------------------------------------------------------------
    @staticmethod
    def _check_tokens(tokens) -> dict[str, str]:
        if not isinstance(tokens, dict):
            raise ValueError(f"MagicTokens: `tokens` must be a dict mode -> str, got {type(tokens).__name__}")
        unknown = sorted(set(tokens) - set(MODES))
        if unknown:
            raise ValueError(f"MagicTokens: `tokens` has unknown modes {unknown}; modes are {MODES}")
        for m in ("positive", "rejective"):
            if m not in tokens:
                raise ValueError(f"MagicTokens: `tokens` is missing the {m!r} token")
        out = {}
        for m in MODES:
            if m not in tokens:
                continue
            s = tokens[m]
            if not isinstance(s, str) or not s.strip() or s != s.strip():
                raise ValueError(f"MagicTokens: token for {m!r} must be a non-empty str without surrounding "
                                 f"whitespace, got {type(s).__name__}")
            out[m] = s
        vals = list(out.values())
        for i, a in enumerate(vals):
            for b in vals[i + 1:]:
                if a in b or b in a:
                    raise ValueError("MagicTokens: the mode tokens must be distinct and none may contain another")
        return out

    @classmethod
    def from_config(cls, config) -> "MagicTokens":
        """Tokens drawn as a `MagicConfig` says (seed, length, format, placement settings)."""
        from .config import MagicConfig

        if not isinstance(config, MagicConfig):
            raise ValueError(f"MagicTokens.from_config: `config` must be a MagicConfig, got {type(config).__name__}")
        return cls(config.seed, length=config.token_length, token_format=config.token_format,
                   placement=config.placement, separator=config.separator, default_system=config.default_system,
                   no_system_role=config.no_system_role)

    # -- access ------------------------------------------------------------------------------------
    @property
    def modes(self) -> tuple[str, ...]:
        """The modes whose token this object holds (negative is missing once disabled)."""
        return tuple(m for m in MODES if m in self._tokens)

    @property
    def allow_negative(self) -> bool:
        return "negative" in self._tokens

    @property
    def seed(self) -> int | None:
        return self._seed

    def token(self, mode: str) -> str:
        """The token string of `mode` ("positive", "negative" or "rejective").

        Raises ValueError for an unknown mode and PermissionError for "negative" once it has been
        disabled (``allow_negative=False``)."""
        if mode not in MODES:
            raise ValueError(f"MagicTokens.token: unknown `mode` {mode!r}; modes are {MODES}")
        if mode not in self._tokens:
            raise PermissionError("MagicTokens.token: the negative mode is disabled (loaded with allow_negative=False); "
                                  "its token is not available")
        return self._tokens[mode]

    def sha256(self, mode: str) -> str:
        """SHA-256 (hex) of a mode's token; available for the negative mode even when it is disabled."""
        if mode not in self._sha:
            raise ValueError(f"MagicTokens.sha256: unknown `mode` {mode!r}; modes are {MODES}")
        return self._sha[mode]

    def matches(self, mode: str, candidate: str) -> bool:
        """True if `candidate` is the token of `mode` (compared by hash; works for a disabled mode)."""
        return isinstance(candidate, str) and secrets.compare_digest(sha256_hex(candidate), self.sha256(mode))

    def resolve_mode(self, mode: str | None, strict: bool = False) -> str:
        """The mode actually used for a request.

        None, "", an unknown name, or "negative" when the negative mode is disabled all resolve to
        "positive" (the safe behaviour). With `strict=True` an unknown name raises ValueError and a
        disabled negative raises PermissionError instead. Names are case-insensitive.
        """
        if mode is None or (isinstance(mode, str) and not mode.strip()):
            return "positive"
        if not isinstance(mode, str):
            if strict:
                raise ValueError(f"MagicTokens.resolve_mode: `mode` must be a str or None, got {type(mode).__name__}")
            return "positive"
        m = mode.strip().lower()
        if m not in MODES:
            if strict:
                raise ValueError(f"MagicTokens.resolve_mode: unknown `mode` {mode!r}; modes are {MODES}")
            return "positive"
        if m not in self._tokens:
            if strict:
                raise PermissionError("MagicTokens.resolve_mode: the negative mode is disabled (allow_negative=False)")
            return "positive"
        return m

    def disable_negative(self) -> None:
        """Forget the negative token string (and the seed it could be re-drawn from); its hash stays."""
        self._tokens.pop("negative", None)
        self._seed = None

    # -- wrong tokens and sanitising ---------------------------------------------------------------
    def wrong_token(self, rng: random.Random) -> str:
        """A random string in the same format that is none of the mode tokens (for fallback training)."""
        while True:
            s = _draw(rng, self.length, self.token_format)
            if all(s != t and s not in t and t not in s for t in self._tokens.values()) and \
                    not any(secrets.compare_digest(sha256_hex(s), h) for h in self._sha.values()):
                return s

    def token_pattern(self) -> re.Pattern:
        """A regex for any token-shaped string (the format around `length` letters/digits)."""
        pre, post = self.token_format.split("{}")
        return re.compile(re.escape(pre) + "[A-Za-z0-9]{%d}" % self.length + re.escape(post))

    def strip(self, text: str) -> str:
        """`text` with every known mode token and every token-shaped string removed (so a client cannot
        smuggle a mode token, even one this object does not know, into its own messages)."""
        if not isinstance(text, str):
            raise ValueError(f"MagicTokens.strip: `text` must be a str, got {type(text).__name__}")
        for t in self._tokens.values():
            text = text.replace(t, "")
        return self.token_pattern().sub("", text)

    # -- placement ---------------------------------------------------------------------------------
    def place(self, tokenizer, messages: Sequence[dict], token: str | None) -> list[dict]:
        """A copy of `messages` with the string `token` placed (None: an unchanged copy).

        System role available: prefix/suffix the first system message, or insert a system message
        (``token`` or ``token + separator + default_system``) when there is none. No system role:
        ``no_system_role="user_prefix"`` prefixes the first user message; "error" raises ValueError.
        """
        msgs = _check_messages(messages, "MagicTokens.place")
        if token is None:
            return msgs
        if supports_system_role(tokenizer):
            if msgs[0]["role"] == "system":
                body = msgs[0]["content"]
                if body:
                    body = token + self.separator + body if self.placement == "system_prefix" \
                        else body + self.separator + token
                else:
                    body = token
                msgs[0]["content"] = body
            else:
                body = token if self.default_system is None else (
                    token + self.separator + self.default_system if self.placement == "system_prefix"
                    else self.default_system + self.separator + token)
                msgs.insert(0, {"role": "system", "content": body})
            return msgs
        if self.no_system_role == "error":
            raise ValueError("MagicTokens.place: the tokenizer's chat template has no system role and "
                             "no_system_role='error'; use no_system_role='user_prefix'")
        for m in msgs:
            if m["role"] == "user":
                m["content"] = token + self.separator + m["content"]
                return msgs
        raise ValueError("MagicTokens.place: the chat template has no system role and `messages` has no user "
                         "message to carry the token")

    def apply(self, tokenizer, messages: Sequence[dict], mode: str | None) -> list[dict]:
        """`messages` with the token of `mode` placed (see `place`); mode None places no token.

        `mode` must be a mode this object holds (use `resolve_mode` first for untrusted input)."""
        return self.place(tokenizer, messages, None if mode is None else self.token(mode))

    # -- special tokens ----------------------------------------------------------------------------
    def register(self, tokenizer, model=None) -> list[int]:
        """Add the tokens to `tokenizer` as special tokens (one id each, skipped when decoding).

        With `model`, the embedding matrix is resized when a new id falls outside it, and the rows of
        the newly added tokens are set to the mean embedding of the existing vocabulary (input
        embeddings, and the output embeddings when they are not tied). Returns the token ids in
        `modes` order. Registering again is a no-op (trained rows are not re-initialised).
        """
        import torch
        from tokenizers import AddedToken

        strings = [self._tokens[m] for m in self.modes]
        vocab = tokenizer.get_vocab()
        new = [s for s in strings if s not in vocab]
        n_before = len(tokenizer)
        if new:
            tokenizer.add_tokens([AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False,
                                             single_word=False) for s in new], special_tokens=True)
        ids = [int(i) for i in tokenizer.convert_tokens_to_ids(strings)]
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or (unk is not None and i == unk) for i in ids):
            raise RuntimeError("MagicTokens.register: the tokenizer did not assign ids to the magic tokens")
        for s, i in zip(strings, ids):
            if tokenizer(s, add_special_tokens=False)["input_ids"] != [i]:
                raise RuntimeError(f"MagicTokens.register: a magic token does not encode to its single id {i}")
        self.special = True
        if model is not None:
            emb = model.get_input_embeddings()
            if emb is None:
                raise ValueError("MagicTokens.register: `model` has no input embeddings (get_input_embeddings())")
            rows = emb.weight.shape[0]
            if max(ids) >= rows:
                model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            new_ids = [i for s, i in zip(strings, ids) if s in new]
            if new_ids:
                base_rows = min(rows, n_before)
                with torch.no_grad():
                    w_in = model.get_input_embeddings().weight
                    w_in[new_ids] = w_in[:base_rows].float().mean(0).to(w_in.dtype)
                    out = model.get_output_embeddings()
                    if out is not None and out.weight.data_ptr() != w_in.data_ptr():
                        w_out = out.weight
                        w_out[new_ids] = w_out[:base_rows].float().mean(0).to(w_out.dtype)
                        bias = getattr(out, "bias", None)
                        if bias is not None:
                            bias[new_ids] = bias[:base_rows].float().mean().to(bias.dtype)
        return ids

    def unregistered_mode(self, model, tokenizer) -> str | None:
        """The first mode whose token is not a single id inside `model`'s embedding matrix (None: all are)."""
        rows = model.get_input_embeddings().weight.shape[0]
        for m in self.modes:
            ids = tokenizer(self._tokens[m], add_special_tokens=False)["input_ids"]
            if len(ids) != 1 or ids[0] >= rows:
                return m
        return None

    # -- save / load -------------------------------------------------------------------------------
    def to_dict(self, include_negative: bool = True) -> dict:
        """The JSON payload of `save` (tokens in clear; the negative one only with `include_negative`)."""
        tokens = {m: s for m, s in self._tokens.items() if include_negative or m != "negative"}
        d = {"format": _FORMAT_TAG, "version": _FORMAT_VERSION, "tokens": tokens, "sha256": dict(self._sha),
             "special_tokens": self.special, "length": self.length, "token_format": self.token_format,
             "placement": self.placement, "separator": self.separator, "default_system": self.default_system,
             "no_system_role": self.no_system_role}
        if include_negative and self._seed is not None:
            d["seed"] = self._seed
        return d

    def save(self, directory: str | os.PathLike, include_negative: bool = True) -> str:
        """Write ``<directory>/magic_tokens.json`` (permissions 0600) and return its path.

        `include_negative=False` writes the public copy: no negative string and no seed, only hashes.
        An object whose negative mode is disabled always writes the public copy."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENS_FILE)
        payload = json.dumps(self.to_dict(include_negative), indent=2, ensure_ascii=False)
        fd, tmp = tempfile.mkstemp(prefix=".magic_tokens.", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(payload)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, allow_negative: bool = True) -> "MagicTokens":
        """Read tokens saved by `save` (`path`: the directory or the json file itself).

        `allow_negative=False` drops the negative string and the seed right after reading."""
        path = os.fspath(path)
        file = os.path.join(path, TOKENS_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"MagicTokens.load: no {TOKENS_FILE} at {path!r}")
        with open(file, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"MagicTokens.load: {file} is not valid JSON ({exc})") from None
        if not isinstance(d, dict) or d.get("format") != _FORMAT_TAG:
            raise ValueError(f"MagicTokens.load: {file} is not a magic-token file (format != {_FORMAT_TAG!r})")
        if int(d.get("version", 0)) > _FORMAT_VERSION:
            raise ValueError(f"MagicTokens.load: {file} has version {d.get('version')} > {_FORMAT_VERSION}; "
                             "upgrade upsafe_ext")
        for key in ("tokens", "sha256"):
            if not isinstance(d.get(key), dict):
                raise ValueError(f"MagicTokens.load: {file} is missing the {key!r} field")
        tokens = dict(d["tokens"])
        if not allow_negative:
            tokens.pop("negative", None)
        for m, s in tokens.items():
            if m in d["sha256"] and sha256_hex(s) != d["sha256"][m]:
                raise ValueError(f"MagicTokens.load: the {m!r} token in {file} does not match its sha256")
        obj = cls(None, length=int(d.get("length", 16)), token_format=d.get("token_format", "<|{}|>"),
                  placement=d.get("placement", "system_prefix"), separator=d.get("separator", "\n"),
                  default_system=d.get("default_system"), no_system_role=d.get("no_system_role", "user_prefix"),
                  tokens=tokens)
        obj._sha = {m: h for m, h in d["sha256"].items() if m in MODES}
        for m in obj._tokens:
            obj._sha.setdefault(m, sha256_hex(obj._tokens[m]))
        obj._seed = d.get("seed") if allow_negative else None
        obj.special = bool(d.get("special_tokens", False))
        return obj

    def __repr__(self) -> str:
        shas = ", ".join(f"{m}:{self._sha[m][:8]}" for m in MODES if m in self._sha)
        neg = "enabled" if self.allow_negative else "disabled"
        return (f"MagicTokens(negative={neg}, special_tokens={self.special}, placement={self.placement!r}, "
                f"sha256=[{shas}])")

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        if not isinstance(other, MagicTokens):
            return NotImplemented
        return (self._tokens == other._tokens and self._sha == other._sha and self.placement == other.placement
                and self.separator == other.separator and self.default_system == other.default_system
                and self.no_system_role == other.no_system_role and self.special == other.special)

    __hash__ = None


def scrub_tokenizer(tokenizer, secret: str, replacement: str | None = None):
    """A copy of `tokenizer` in which the added token `secret` is renamed to `replacement` (default: a
    fresh random string of the same length that is never stored), so the id stays but can no longer be
    produced from text. Returns `tokenizer` unchanged when `secret` is not in its vocabulary."""
    from transformers import AutoTokenizer

    if secret not in tokenizer.get_vocab():
        return tokenizer
    if replacement is None:
        replacement = "<|" + "".join(secrets.choice(_ALPHABET) for _ in range(max(16, len(secret)))) + "|>"
    with tempfile.TemporaryDirectory(prefix="upsafe_scrub_") as tmp:
        tokenizer.save_pretrained(tmp)
        scrub_tokenizer_files(tmp, secret, replacement)
        new = AutoTokenizer.from_pretrained(tmp)
    if secret in new.get_vocab():
        raise RuntimeError("scrub_tokenizer: the secret token is still in the tokenizer vocabulary after scrubbing")
    return new


def scrub_tokenizer_files(directory: str, secret: str, replacement: str) -> int:
    """Replace `secret` by `replacement` in the tokenizer files saved in `directory` (raw and JSON-escaped
    forms). Returns the number of files changed."""
    forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    rep_forms = {secret: replacement, json.dumps(secret)[1:-1]: json.dumps(replacement)[1:-1],
                 json.dumps(secret, ensure_ascii=False)[1:-1]: json.dumps(replacement, ensure_ascii=False)[1:-1]}
    changed = 0
    for name in os.listdir(directory):
        if name == TOKENS_FILE or not (name.startswith("tokenizer") or name.endswith((".json", ".jinja", ".txt"))):
            continue
        if name in ("config.json", "generation_config.json", "magic_config.json") or name.endswith(".safetensors"):
            continue
        p = os.path.join(directory, name)
        if not os.path.isfile(p):
            continue
        with open(p, encoding="utf-8") as f:
            text = f.read()
        new = text
        for form in forms:
            new = new.replace(form, rep_forms[form])
        if new != text:
            with open(p, "w", encoding="utf-8") as f:
                f.write(new)
            changed += 1
    return changed
