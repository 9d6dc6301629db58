"""``magic_tokens.json`` on disk: its name and format tag, the owner-only atomic write, and the checked
read (format tag, version, well-formed hash records). What goes into the file is `MagicTokens.to_dict`;
version 2 holds salted hashes ("hashes") and never a seed; version 1 (read only) held unsalted
"sha256" hashes and maybe a "seed".
"""
from __future__ import annotations

import json
import os

from ..saving import atomic_file
from .config import MODES
from .hashing import check_hash_record

TOKENS_FILE = "magic_tokens.json"
FORMAT_TAG = "upsafe_ext.magic_tokens"
FORMAT_VERSION = 2  # 2: salted hashes ("hashes"), never a seed; 1 (read only): unsalted "sha256", maybe "seed"


def write_token_file(directory: str | os.PathLike, payload: dict) -> str:
    """Write `payload` as ``<directory>/magic_tokens.json`` (atomically, permissions 0600) and return its path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TOKENS_FILE)
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    with atomic_file(path, mode=0o600) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def read_token_file(path: str | os.PathLike) -> tuple[str, dict, int, dict]:
    """``(file, payload, version, hashes)`` of the token file at `path` (the directory or the json file
    itself); `hashes` maps each mode to its hash record (version 1: ``{"algo": "sha256", "hash": ...}``).
    FileNotFoundError or ValueError (naming ``MagicTokens.load``) for a missing or malformed file."""
    path = os.fspath(path)
    file = os.path.join(path, TOKENS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"MagicTokens.load: no {TOKENS_FILE} at {path!r}")
    with open(file, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"MagicTokens.load: {file} is not valid JSON ({exc})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT_TAG:
        raise ValueError(f"MagicTokens.load: {file} is not a magic-token file (format != {FORMAT_TAG!r})")
    version = int(d.get("version", 0))
    if version > FORMAT_VERSION:
        raise ValueError(f"MagicTokens.load: {file} has version {d.get('version')} > {FORMAT_VERSION}; "
                         "upgrade upsafe_ext")
    key = "hashes" if version >= 2 else "sha256"
    for k in ("tokens", key):
        if not isinstance(d.get(k), dict):
            raise ValueError(f"MagicTokens.load: {file} is missing the {k!r} field")
    if version >= 2:
        hashes = {m: check_hash_record(r, f"MagicTokens.load: {file} hash of {m!r}")
                  for m, r in d["hashes"].items() if m in MODES}
    else:  # version 1: unsalted SHA-256
        hashes = {m: {"algo": "sha256", "hash": h} for m, h in d["sha256"].items()
                  if m in MODES and isinstance(h, str)}
    return file, d, version, hashes
