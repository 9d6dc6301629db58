"""Salted hashes of the magic tokens: what ``magic_tokens.json`` keeps so a token can be checked
without being stored.

    rec = hash_token(token)           # {"algo": "scrypt", "n", "r", "p", "salt", "hash"} (hex)
    verify_token(rec, candidate)      # constant-time check of a presented string

`hash_token` runs scrypt over a fresh random 16-byte salt per call (PBKDF2-HMAC-SHA256 where hashlib has
no scrypt), so the same token hashes differently every time and no unsalted hash is ever written.
`check_hash_record` bounds the cost parameters of a record read from a file, so a crafted file cannot
stall a load. `sha256_hex` (unsalted) only reads version-1 token files.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}
_PBKDF2_ITERATIONS = 200_000
_SALT_BYTES = 16


def sha256_hex(text: str) -> str:
    """Unsalted SHA-256 (hex) of `text` (only used to read version-1 token files)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_token(token: str, salt: bytes | None = None) -> dict:
    """A salted hash record of `token`: ``{"algo": "scrypt", "n", "r", "p", "salt", "hash"}`` (hex).

    `salt`: bytes (default: 16 fresh bytes from `secrets`, so the same token hashes differently every
    time). Falls back to PBKDF2-HMAC-SHA256 ({"algo": "pbkdf2_sha256", "iterations", ...}) where
    hashlib has no scrypt. Check a candidate with `verify_token`.
    """
    if not isinstance(token, str) or not token:
        raise ValueError("hash_token: `token` must be a non-empty str")
    if salt is None:
        salt = secrets.token_bytes(_SALT_BYTES)
    if not isinstance(salt, (bytes, bytearray)) or len(salt) < 8:
        raise ValueError("hash_token: `salt` must be bytes (at least 8)")
    salt = bytes(salt)
    if hasattr(hashlib, "scrypt"):
        rec = {"algo": "scrypt", "n": _SCRYPT["n"], "r": _SCRYPT["r"], "p": _SCRYPT["p"], "salt": salt.hex()}
    else:  # pragma: no cover - OpenSSL without scrypt
        rec = {"algo": "pbkdf2_sha256", "iterations": _PBKDF2_ITERATIONS, "salt": salt.hex()}
    rec["hash"] = _derive(rec, token).hex()
    return rec


def _derive(rec: dict, candidate: str) -> bytes:
    data = candidate.encode("utf-8")
    if rec["algo"] == "scrypt":
        n, r, p = rec["n"], rec["r"], rec["p"]
        return hashlib.scrypt(data, salt=bytes.fromhex(rec["salt"]), n=n, r=r, p=p, dklen=32,
                              maxmem=2 * 128 * r * n * p + (1 << 20))
    if rec["algo"] == "pbkdf2_sha256":
        return hashlib.pbkdf2_hmac("sha256", data, bytes.fromhex(rec["salt"]), rec["iterations"])
    return hashlib.sha256(data).digest()  # "sha256": unsalted, from a version-1 file


def check_hash_record(rec, where: str = "hash record") -> dict:
    """`rec` if it is a well-formed record with bounded cost (so a crafted file cannot stall a load)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("hash"), str):
        raise ValueError(f"{where}: not a hash record (a dict with 'algo' and 'hash')")
    algo = rec.get("algo")
    try:
        bytes.fromhex(rec["hash"])
        if algo in ("scrypt", "pbkdf2_sha256"):
            if len(bytes.fromhex(rec.get("salt", ""))) < 8:
                raise ValueError
    except (ValueError, TypeError):
        raise ValueError(f"{where}: 'hash' and 'salt' must be hex strings (salt of at least 8 bytes)") from None
    if algo == "scrypt":
        n, r, p = rec.get("n"), rec.get("r"), rec.get("p")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p)) or n < 2 or n & (n - 1) \
                or n > 2 ** 20 or not 1 <= r <= 32 or not 1 <= p <= 16 or 128 * r * n * p > 1 << 30:
            raise ValueError(f"{where}: scrypt parameters out of range (n a power of two <= 2**20, r <= 32, p <= 16)")
    elif algo == "pbkdf2_sha256":
        it = rec.get("iterations")
        if not isinstance(it, int) or isinstance(it, bool) or not 1000 <= it <= 10_000_000:
            raise ValueError(f"{where}: pbkdf2 iterations out of range [1000, 10000000]")
    elif algo != "sha256":
        raise ValueError(f"{where}: unknown hash algorithm {algo!r} (scrypt, pbkdf2_sha256, or sha256 from v1)")
    return dict(rec)


def verify_token(rec: dict, candidate: str) -> bool:
    """True if `candidate` is the token `rec` (from `hash_token`) was made from; constant-time compare."""
    if not isinstance(candidate, str):
        return False
    rec = check_hash_record(rec, "verify_token")
    return hmac.compare_digest(_derive(rec, candidate), bytes.fromhex(rec["hash"]))
