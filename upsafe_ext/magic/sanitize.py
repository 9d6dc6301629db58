"""Sanitising client text: the magic tokens, disguised or not, are removed before a token is placed.

`TokenSanitizer` (what `MagicTokens.strip` / `strip_messages` use) removes from client text every known
token, any run of 8 or more consecutive characters of a known token's random part, and every
token-shaped string (the format's wrapper around roughly `length` characters), matched on a *folded*
copy of the text (`fold_char` / `fold_text`): compatibility-normalised (NFKD, so full-width and other
NFKC-foldable forms fold; combining marks dropped), case-folded, common Cyrillic/Greek/Latin
look-alikes mapped to Latin (`CONFUSABLES`), zero-width, format and whitespace characters removed.
`strip_messages` folds a whole conversation as one text, so a token split across two messages is
found and removed from both.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from typing import Iterable, Sequence

_INVISIBLE = frozenset("\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180e\u200b\u200c\u200d"
                       "\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064"
                       "\u2066\u2067\u2068\u2069\u206a\u206b\u206c\u206d\u206e\u206f\u2800\u3164\ufe00\ufe01"
                       "\ufe02\ufe03\ufe04\ufe05\ufe06\ufe07\ufe08\ufe09\ufe0a\ufe0b\ufe0c\ufe0d\ufe0e\ufe0f"
                       "\ufeff\uffa0")
# look-alikes that compatibility normalisation keeps distinct (applied after casefold): Cyrillic,
# Greek, Armenian and IPA letters that render like Latin ones, and brackets/bars like the default wrapper
CONFUSABLES = {
    "а": "a", "в": "b", "е": "e", "ё": "e", "з": "3", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "һ": "h", "ԁ": "d", "ԛ": "q", "ԝ": "w",
    "ӏ": "l", "ь": "b", "ɡ": "g", "ɑ": "a", "ɩ": "i", "ı": "i", "ȷ": "j", "ʏ": "y", "ʀ": "r", "ᴠ": "v",
    "α": "a", "β": "b", "γ": "y", "ε": "e", "ζ": "z", "η": "n", "ι": "i", "κ": "k", "μ": "u", "ν": "v",
    "ο": "o", "ρ": "p", "σ": "o", "ς": "c", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j",
    "օ": "o", "ս": "u", "ց": "g", "զ": "q", "հ": "h", "ո": "n",
    "‹": "<", "›": ">", "〈": "<", "〉": ">", "⟨": "<", "⟩": ">", "❮": "<", "❯": ">", "˂": "<", "˃": ">",
    "ᐸ": "<", "ᐳ": ">", "∣": "|", "ǀ": "|", "│": "|", "┃": "|", "❘": "|", "￨": "|", "ⅼ": "l", "ℓ": "l",
}
_ASCII_FOLD = tuple("" if (c.isspace() or ord(c) < 32 or ord(c) == 127) else c.lower() for c in map(chr, range(128)))


@functools.lru_cache(maxsize=8192)
def _fold_char_uncached(c: str) -> str:
    out = []
    for ch in unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", c).casefold()):
        if ch in _INVISIBLE or ch.isspace() or unicodedata.category(ch) in ("Mn", "Me", "Cf", "Cc", "Zs", "Zl", "Zp"):
            continue
        out.append(CONFUSABLES.get(ch, ch))
    return "".join(out)


def fold_char(c: str) -> str:
    """The sanitiser's view of one character: "" for whitespace and invisible characters, else the
    compatibility-folded (NFKD), case-folded, look-alike-mapped form (one or more characters)."""
    o = ord(c)
    return _ASCII_FOLD[o] if o < 128 else _fold_char_uncached(c)


def fold_text(text: str) -> str:
    """`text` folded character by character (see `fold_char`)."""
    return "".join(fold_char(c) for c in text)


def check_messages(messages, op: str) -> list[dict]:
    """Shallow copies of `messages` (a non-empty list of dicts with 'role' and a str 'content');
    ValueError naming `op` otherwise."""
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


_FRAGMENT = 8  # a run of this many folded characters of a known token's random part is removed


class TokenSanitizer:
    """Finds and removes the tokens `tokens` (strings in `token_format` around `length` random
    characters), runs of their random part and any token-shaped string in client text (see the
    module docstring). Built once per set of tokens; rebuild it when the tokens change."""

    def __init__(self, tokens: Iterable[str], token_format: str, length: int):
        pre, post = (fold_text(x) for x in token_format.split("{}"))
        lo, hi = max(1, length - 4), length + 4  # near-variants: a few characters more or less
        if post:  # anything up to the closing wrapper
            body = "[^%s]{%d,%d}" % (re.escape(post[0]), lo, hi)
        elif pre:
            body = r"[^\W_]{%d,%d}" % (lo, hi)
        else:
            body = "[a-z0-9]{%d}" % length
        self.pattern = re.compile(re.escape(pre) + body + re.escape(post))  # token-shaped, on folded text
        raw_pre, raw_post = token_format.split("{}")
        grams: set[str] = set()
        sizes = set()
        for t in tokens:
            wrapped = (raw_pre or raw_post) and t.startswith(raw_pre) and t.endswith(raw_post) and \
                len(t) > len(raw_pre) + len(raw_post)
            core = fold_text(t[len(raw_pre):len(t) - len(raw_post)] if wrapped else t)
            if len(core) >= _FRAGMENT:  # any 8 consecutive folded characters of the random part
                sizes.add(_FRAGMENT)
                grams.update(core[i:i + _FRAGMENT] for i in range(len(core) - _FRAGMENT + 1))
            else:  # a short (explicitly given) token: only the whole folded token
                whole = fold_text(t)
                if whole:
                    sizes.add(len(whole))
                    grams.add(whole)
        self.grams = grams  # folded fragments of the known tokens
        self.sizes = sorted(sizes)

    def spans(self, folded: str) -> list[tuple[int, int]]:
        """(start, end) of every match in the folded text `folded` (may overlap)."""
        spans = [m.span() for m in self.pattern.finditer(folded)]
        for k in self.sizes:
            spans += [(i, i + k) for i in range(len(folded) - k + 1) if folded[i:i + k] in self.grams]
        return spans

    def strip_texts(self, texts: Sequence[str], op: str = "MagicTokens.strip") -> list[str]:
        """`texts` (read as one text, in order) with every match removed; repeats until nothing matches
        (removing one token cannot assemble another). Invisible characters next to a removed span go
        with it."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"{op}: text {i} must be a str, got {type(t).__name__}")
        while True:
            chars: list[str] = []
            where: list[tuple[int, int]] = []
            for ti, t in enumerate(texts):
                for ci, c in enumerate(t):
                    f = fold_char(c)
                    if f:
                        chars.append(f)
                        where.extend([(ti, ci)] * len(f))
            spans = self.spans("".join(chars))
            if not spans:
                return texts
            drop = [bytearray(len(t)) for t in texts]
            for s, e in spans:
                (t0, c0), (t1, c1) = where[s], where[e - 1]
                for ti in range(t0, t1 + 1):
                    lo = c0 if ti == t0 else 0
                    hi = c1 + 1 if ti == t1 else len(texts[ti])
                    drop[ti][lo:hi] = b"\x01" * (hi - lo)
            for t, dr in zip(texts, drop):  # invisible characters next to a removed span go with it
                for i in [i for i in range(len(t)) if dr[i]]:
                    for step in (-1, 1):
                        j = i + step
                        while 0 <= j < len(t) and not dr[j] and not t[j].isspace() and not fold_char(t[j]):
                            dr[j] = 1
                            j += step
            texts = ["".join(c for c, d in zip(t, dr) if not d) for t, dr in zip(texts, drop)]

    def strip_messages(self, messages: Sequence[dict], op: str = "MagicTokens.strip_messages") -> list[dict]:
        """A copy of `messages` whose contents are sanitised together (`strip_texts`)."""
        msgs = check_messages(messages, op)
        cleaned = self.strip_texts([m["content"] for m in msgs])
        return [{**m, "content": c} for m, c in zip(msgs, cleaned)]
