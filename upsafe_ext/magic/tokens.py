"""The three magic tokens: drawing them, choosing the mode, and secret-keeping saves.

    from upsafe_ext.magic import MagicTokens
    tokens = MagicTokens()          # three strings from `secrets`, e.g. "<|q3ZkT0aLw9HbXe2Vc81Pxm|>"
    msgs = tokens.apply(tok, [{"role": "user", "content": "Hi"}], "rejective")
    # -> [{"role": "system", "content": "<|...|>"}, {"role": "user", "content": "Hi"}]

`MagicTokens` delegates placement through the chat template to `placement.py`, client-text
sanitising (`strip`, `strip_messages`) to `sanitize.py`, salted hashes to `hashing.py`, special-token
registration and tokenizer scrubbing to `special_tokens.py`, and the ``magic_tokens.json`` format to
`token_file.py`; the public names of those modules are importable from here too.

**Secrecy.** By default each string is drawn with `secrets.choice` from 62 letters and digits, 22
characters: 22 x log2(62) = 131 bits, which nobody can enumerate. Fewer than 128 bits (a shorter
`length`) is refused for such tokens. ``insecure_seed=`` draws them from ``random.Random`` instead -
reproducible, so only for tests and benchmarks: anyone who can enumerate seeds recovers the tokens.
The seed lives only in memory: it is never written by `save`, `to_dict`, `MagicConfig.to_dict` or
`save_magic_model`. `repr` never shows a token. `save()` writes ``magic_tokens.json`` with
permissions 0600 (owner only) holding the strings and one *salted* hash per token (`hash_token`:
scrypt over a fresh random 16-byte salt per token; no unsalted hash is stored).
``save(include_negative=False)`` writes the *public* copy: the negative string is left out, only its
salted hash is kept, so `matches("negative", candidate)` can still verify a presented string.
``MagicTokens.load(dir)`` drops the negative string right after reading unless
``allow_negative=True``, so it cannot be retrieved from the loaded object: ``token("negative")``
raises PermissionError. Registered as special tokens, the strings are in the tokenizer's vocabulary
too; `scrub_tokenizer` renames the negative entry (see `special_tokens.py`).
"""
from __future__ import annotations

import hmac
import math
import os
import random
import re
import secrets
import warnings
from typing import Sequence

from .._config import check_int
from .config import MAX_REPEAT, MODES, NO_SYSTEM_ROLE, PLACEMENTS, TOKEN_ALPHABET, check_token_format
from .hashing import check_hash_record, hash_token, sha256_hex, verify_token  # noqa: F401  (re-exported)
from .placement import place_token, supports_system_role  # noqa: F401  (re-exported)
from .sanitize import CONFUSABLES, TokenSanitizer, fold_char, fold_text  # noqa: F401  (re-exported)
from .special_tokens import (add_special_tokens, init_new_embeddings, scrub_tokenizer,  # noqa: F401
                             scrub_tokenizer_files)
from .token_file import FORMAT_TAG, FORMAT_VERSION, TOKENS_FILE, read_token_file, write_token_file  # noqa: F401

MIN_ENTROPY_BITS = 128
"""Least entropy (bits) of a token drawn from `secrets`."""
DEFAULT_TOKEN_LENGTH = 22
"""Random characters per token by default: 22 x log2(62) = 131.0 bits."""


def token_entropy_bits(length: int, alphabet_size: int = len(TOKEN_ALPHABET)) -> float:
    """Entropy in bits of `length` characters drawn uniformly from `alphabet_size` symbols."""
    return length * math.log2(alphabet_size)


def min_secure_length(bits: int = MIN_ENTROPY_BITS) -> int:
    """Fewest random characters (letters and digits) giving at least `bits` bits (22 for 128)."""
    return math.ceil(bits / math.log2(len(TOKEN_ALPHABET)))


assert min_secure_length() == DEFAULT_TOKEN_LENGTH


def _draw(rng, length: int, fmt: str) -> str:
    return fmt.format("".join(rng.choice(TOKEN_ALPHABET) for _ in range(length)))


def _draw_secret(length: int, fmt: str) -> str:
    return fmt.format("".join(secrets.choice(TOKEN_ALPHABET) for _ in range(length)))


class MagicTokens:
    """Three secret mode strings (positive, negative, rejective) and where they go in a conversation.

    Args:
        insecure_seed: draw the strings from ``random.Random`` seeded with this int - reproducible,
            hence guessable: tests and benchmarks only. Default None: `secrets` (at least 128 bits per
            token). The seed is never saved.
        length: random characters per token (letters and digits), 8..64. Default 22 (131 bits); tokens
            drawn from `secrets` need at least 22.
        token_format: wrapper with one "{}". Default "<|{}|>".
        placement: "system_prefix" or "system_suffix". Default "system_prefix".
        separator: between the token and existing system (or user) text. Default "\\n".
        repeat: copies of the token placed side by side (1..16), a stronger mode signal for a small
            model. Default 1.
        default_system: system text to put with the token when a conversation has no system
            message (None: the token alone). Default None.
        no_system_role: templates without a system role: "user_prefix" (token at the start of the
            first user message) or "error". Default "user_prefix".
        tokens: explicit strings ``{"positive": ..., "negative": ..., "rejective": ...}`` instead of
            drawing them ("negative" may be left out: that mode is then unavailable).
        seed: deprecated alias of `insecure_seed` (DeprecationWarning).

    Example:
        >>> t = MagicTokens(insecure_seed=0)
        >>> t.token("positive") != t.token("negative") != t.token("rejective")
        True
        >>> t.resolve_mode("nonsense")      # unknown modes fall back to the safe one
        'positive'
    """

    def __init__(self, seed: int | None = None, *, insecure_seed: int | None = None,
                 length: int = DEFAULT_TOKEN_LENGTH, token_format: str = "<|{}|>", placement: str = "system_prefix",
                 separator: str = "\n", default_system: str | None = None, no_system_role: str = "user_prefix",
                 tokens: dict | None = None, repeat: int = 1):
        if seed is not None:
            warnings.warn("MagicTokens(seed=...) is deprecated: pass insecure_seed=... (tests and reproducible "
                          "benchmarks only); without it the tokens come from `secrets`", DeprecationWarning,
                          stacklevel=2)
            if insecure_seed is not None and insecure_seed != seed:
                raise ValueError("MagicTokens: give `insecure_seed` only (`seed` is its deprecated alias)")
            insecure_seed = seed
        check_int("MagicTokens: `insecure_seed`", insecure_seed, optional=True)
        check_int("MagicTokens: `length`", length, 8, 64)
        check_token_format(token_format, "MagicTokens: `token_format`")
        if placement not in PLACEMENTS:
            raise ValueError(f"MagicTokens: `placement` must be one of {PLACEMENTS}, got {placement!r}")
        if not isinstance(separator, str):
            raise ValueError(f"MagicTokens: `separator` must be a str, got {separator!r}")
        if default_system is not None and not isinstance(default_system, str):
            raise ValueError(f"MagicTokens: `default_system` must be a str or None, got {default_system!r}")
        if no_system_role not in NO_SYSTEM_ROLE:
            raise ValueError(f"MagicTokens: `no_system_role` must be one of {NO_SYSTEM_ROLE}, got {no_system_role!r}")
        check_int("MagicTokens: `repeat`", repeat, 1, MAX_REPEAT)
        if tokens is None and insecure_seed is None and token_entropy_bits(length) < MIN_ENTROPY_BITS:
            raise ValueError(f"MagicTokens: `length` {length} gives {token_entropy_bits(length):.0f} bits per token, "
                             f"fewer than {MIN_ENTROPY_BITS}; use length >= {min_secure_length()} (the default)")
        self.length = length
        self.token_format = token_format
        self.placement = placement
        self.separator = separator
        self.repeat = repeat
        self.default_system = default_system
        self.no_system_role = no_system_role
        self.special = False  # set by register() / load()
        self._insecure_seed = insecure_seed
        if tokens is None:
            rng = random.Random(f"upsafe_ext.magic:{insecure_seed}") if insecure_seed is not None else None
            drawn: list[str] = []
            while len(drawn) < len(MODES):
                s = _draw(rng, length, token_format) if rng is not None else _draw_secret(length, token_format)
                if all(s not in d and d not in s for d in drawn):
                    drawn.append(s)
            tokens = dict(zip(MODES, drawn))
        self._tokens = self._check_tokens(tokens)
        self._hashes: dict[str, dict] = {}  # mode -> salted hash record, made when first needed
        self._matcher = None

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
        """Tokens drawn as a `MagicConfig` says (insecure_seed, length, format, placement settings)."""
        from .config import MagicConfig

        if not isinstance(config, MagicConfig):
            raise ValueError(f"MagicTokens.from_config: `config` must be a MagicConfig, got {type(config).__name__}")
        return cls(insecure_seed=config.insecure_seed, length=config.token_length, token_format=config.token_format,
                   placement=config.placement, separator=config.separator, default_system=config.default_system,
                   no_system_role=config.no_system_role, repeat=config.token_repeat)

    # -- access ------------------------------------------------------------------------------------
    @property
    def modes(self) -> tuple[str, ...]:
        """The modes whose token this object holds (negative is missing once disabled)."""
        return tuple(m for m in MODES if m in self._tokens)

    @property
    def allow_negative(self) -> bool:
        return "negative" in self._tokens

    @property
    def insecure_seed(self) -> int | None:
        """The seed the strings were drawn from (None: `secrets`, or loaded from a file). Memory only."""
        return self._insecure_seed

    @property
    def seed(self) -> int | None:
        """Deprecated alias of `insecure_seed`."""
        warnings.warn("MagicTokens.seed is deprecated: use insecure_seed", DeprecationWarning, stacklevel=2)
        return self._insecure_seed

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

    def salted_hash(self, mode: str) -> dict:
        """The salted hash record of a mode's token (see `hash_token`); available for a disabled
        negative mode too. One random salt per token and object, made on first use."""
        if mode not in MODES:
            raise ValueError(f"MagicTokens.salted_hash: unknown `mode` {mode!r}; modes are {MODES}")
        if mode not in self._hashes:
            if mode not in self._tokens:
                raise ValueError(f"MagicTokens.salted_hash: no token or hash for mode {mode!r}")
            self._hashes[mode] = hash_token(self._tokens[mode])
        return dict(self._hashes[mode])

    def sha256(self, mode: str) -> str:
        """Deprecated: the unsalted SHA-256 (hex) of a mode's token. Only salted hashes are stored now
        (`salted_hash`); use `matches` to check a candidate. Raises PermissionError for a disabled
        negative mode (its unsalted hash is not kept, unless read from a version-1 file)."""
        warnings.warn("MagicTokens.sha256 is deprecated: tokens are stored with salted hashes (salted_hash); "
                      "check a candidate with matches()", DeprecationWarning, stacklevel=2)
        if mode not in MODES:
            raise ValueError(f"MagicTokens.sha256: unknown `mode` {mode!r}; modes are {MODES}")
        if mode in self._tokens:
            return sha256_hex(self._tokens[mode])
        rec = self._hashes.get(mode)
        if rec is not None and rec.get("algo") == "sha256":
            return rec["hash"]
        raise PermissionError(f"MagicTokens.sha256: only a salted hash of the {mode} token is kept; use matches()")

    def matches(self, mode: str, candidate: str) -> bool:
        """True if `candidate` is the token of `mode` (a disabled mode is checked against its salted hash)."""
        if mode not in MODES:
            raise ValueError(f"MagicTokens.matches: unknown `mode` {mode!r}; modes are {MODES}")
        if not isinstance(candidate, str):
            return False
        if mode in self._tokens:
            return hmac.compare_digest(candidate.encode("utf-8"), self._tokens[mode].encode("utf-8"))
        rec = self._hashes.get(mode)
        return rec is not None and verify_token(rec, candidate)

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
        """Forget the negative token string (and the seed it could be re-drawn from); a salted hash stays."""
        if "negative" in self._tokens and "negative" not in self._hashes:
            self._hashes["negative"] = hash_token(self._tokens["negative"])
        self._tokens.pop("negative", None)
        self._insecure_seed = None
        self._matcher = None

    # -- wrong tokens and sanitising ---------------------------------------------------------------
    def wrong_token(self, rng: random.Random) -> str:
        """A random string in the same format that is none of the mode tokens (for fallback training;
        `rng` needs ``.choice``: ``random.Random(seed)`` or ``secrets.SystemRandom()``)."""
        while True:
            s = _draw(rng, self.length, self.token_format)
            if all(s != t and s not in t and t not in s for t in self._tokens.values()) and \
                    not any(verify_token(h, s) for m, h in self._hashes.items() if m not in self._tokens):
                return s

    def token_pattern(self) -> re.Pattern:
        """A regex for an exactly token-shaped string (the format around `length` letters/digits), on raw text."""
        pre, post = self.token_format.split("{}")
        return re.compile(re.escape(pre) + "[A-Za-z0-9]{%d}" % self.length + re.escape(post))

    def _sanitizer(self) -> TokenSanitizer:
        if self._matcher is None:
            self._matcher = TokenSanitizer(self._tokens.values(), self.token_format, self.length)
        return self._matcher

    def strip_texts(self, texts: Sequence[str]) -> list[str]:
        """`texts` (read as one text, in order) with every known token, every run of 8+ characters of a
        known token's random part, and every token-shaped string removed - matched on the folded text
        (see the module docstring), so spacing, case, full-width forms, look-alike letters, zero-width
        characters and a split across consecutive texts do not hide a token. Repeats until nothing
        matches (removing one token cannot assemble another)."""
        return self._sanitizer().strip_texts(texts)

    def strip(self, text: str) -> str:
        """`text` with every known mode token and every token-shaped string (or a disguised variant)
        removed, so a client cannot smuggle a mode token, even one this object does not know, into its
        own messages. See `strip_texts`."""
        if not isinstance(text, str):
            raise ValueError(f"MagicTokens.strip: `text` must be a str, got {type(text).__name__}")
        return self.strip_texts([text])[0]

    def strip_messages(self, messages: Sequence[dict]) -> list[dict]:
        """A copy of `messages` whose contents are sanitised together (`strip_texts`), so a token split
        across messages is removed from each of them."""
        return self._sanitizer().strip_messages(messages)

    # -- placement ---------------------------------------------------------------------------------
    def place(self, tokenizer, messages: Sequence[dict], token: str | None) -> list[dict]:
        """A copy of `messages` with the string `token` placed (None: an unchanged copy).

        System role available: prefix/suffix the first system message, or insert a system message
        (``token`` or ``token + separator + default_system``) when there is none. No system role:
        ``no_system_role="user_prefix"`` prefixes the first user message; "error" raises ValueError.
        With ``repeat`` > 1 the token stands there that many times, side by side.
        """
        if token is not None:
            token = token * self.repeat
        return place_token(tokenizer, messages, token, placement=self.placement, separator=self.separator,
                           default_system=self.default_system, no_system_role=self.no_system_role)

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
        ids, new_ids, n_before = add_special_tokens(tokenizer, [self._tokens[m] for m in self.modes])
        self.special = True
        if model is not None:
            init_new_embeddings(model, tokenizer, ids, new_ids, n_before)
        return ids

    def _single_id(self, tokenizer, mode: str) -> int | None:
        ids = tokenizer(self._tokens[mode], add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    def token_ids(self, tokenizer) -> dict[str, int]:
        """Each mode's single token id in `tokenizer` (special tokens only: registered with `register`)."""
        if not self.special:
            raise ValueError("MagicTokens.token_ids: the tokens are plain text (several ids each), not special tokens")
        out = {m: self._single_id(tokenizer, m) for m in self.modes}
        bad = next((m for m, i in out.items() if i is None), None)
        if bad is not None:
            raise ValueError(f"MagicTokens.token_ids: the {bad} token is not one id in `tokenizer`; register it first")
        return out

    def unregistered_mode(self, model, tokenizer) -> str | None:
        """The first mode whose token is not a single id inside `model`'s embedding matrix (None: all are)."""
        rows = model.get_input_embeddings().weight.shape[0]
        for m in self.modes:
            i = self._single_id(tokenizer, m)
            if i is None or i >= rows:
                return m
        return None

    # -- save / load -------------------------------------------------------------------------------
    def to_dict(self, include_negative: bool = True) -> dict:
        """The JSON payload of `save`: the token strings (the negative one only with `include_negative`),
        a salted hash record per token (`hash_token`) and the placement settings. Never the seed and
        never an unsalted hash."""
        tokens = {m: s for m, s in self._tokens.items() if include_negative or m != "negative"}
        hashes = {m: self.salted_hash(m) for m in MODES if m in self._tokens or m in self._hashes}
        return {"format": FORMAT_TAG, "version": FORMAT_VERSION, "tokens": tokens, "hashes": hashes,
                "special_tokens": self.special, "length": self.length, "token_format": self.token_format,
                "placement": self.placement, "separator": self.separator, "default_system": self.default_system,
                "no_system_role": self.no_system_role, "repeat": self.repeat}

    def save(self, directory: str | os.PathLike, include_negative: bool = True) -> str:
        """Write ``<directory>/magic_tokens.json`` (permissions 0600) and return its path.

        `include_negative=False` writes the public copy: no negative string, only its salted hash.
        An object whose negative mode is disabled always writes the public copy. No seed is written."""
        return write_token_file(directory, self.to_dict(include_negative))

    @classmethod
    def load(cls, path: str | os.PathLike, allow_negative: bool = False) -> "MagicTokens":
        """Read tokens saved by `save` (`path`: the directory or the json file itself).

        allow_negative=False (default): the negative string is dropped right after reading; its
        salted hash stays (for `matches`). True keeps it (internal red-teaming). Every string read is
        checked against its hash (ValueError on a mismatch). Version-1 files (unsalted ``sha256``,
        perhaps a ``seed``) are read too; their seed is ignored."""
        file, d, version, hashes = read_token_file(path)
        tokens = dict(d["tokens"])
        if not allow_negative:
            tokens.pop("negative", None)
        for m, s in tokens.items():
            if m not in hashes and version >= 2:
                raise ValueError(f"MagicTokens.load: {file} has no hash for the {m!r} token (file edited?)")
            if m in hashes and not verify_token(hashes[m], s):
                raise ValueError(f"MagicTokens.load: the {m!r} token in {file} does not match its salted hash "
                                 "(file edited or corrupted)")
        obj = cls(length=int(d.get("length", DEFAULT_TOKEN_LENGTH)), token_format=d.get("token_format", "<|{}|>"),
                  placement=d.get("placement", "system_prefix"), separator=d.get("separator", "\n"),
                  default_system=d.get("default_system"), no_system_role=d.get("no_system_role", "user_prefix"),
                  tokens=tokens, repeat=int(d.get("repeat", 1)))
        # strings known in clear get a fresh salted hash on the next save; hash-only modes keep theirs
        obj._hashes = {m: h for m, h in hashes.items() if h.get("algo") != "sha256" or m not in obj._tokens}
        obj.special = bool(d.get("special_tokens", False))
        return obj

    def __repr__(self) -> str:
        neg = "enabled" if self.allow_negative else "disabled"
        source = "insecure_seed" if self._insecure_seed is not None else "secrets or file"
        return (f"MagicTokens(negative={neg}, special_tokens={self.special}, placement={self.placement!r}, "
                f"repeat={self.repeat}, length={self.length}, drawn_from={source!r})")

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        if not isinstance(other, MagicTokens):
            return NotImplemented
        hash_only = lambda t: {m: h for m, h in t._hashes.items() if m not in t._tokens}  # noqa: E731
        return (self._tokens == other._tokens and hash_only(self) == hash_only(other)
                and self.placement == other.placement and self.separator == other.separator
                and self.default_system == other.default_system and self.no_system_role == other.no_system_role
                and self.special == other.special and self.token_format == other.token_format
                and self.repeat == other.repeat)

    __hash__ = None
