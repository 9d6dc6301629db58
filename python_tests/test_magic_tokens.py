"""Token security (upsafe_ext.magic): tokens drawn from `secrets` with at least 128 bits, `insecure_seed`
only in memory, salted hashes, saved and exported folders holding no seed and (public copies) no
negative token, the negative mode off by default, and client-typed tokens - disguised or split - removed.

Split from test_magic.py; the shared helpers are in magic_fixtures.py.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import secrets
import stat
import string
import unicodedata
import warnings
from pathlib import Path

import pytest

from magic_fixtures import (CYRILLIC, disguise_all, files_containing, fullwidth, ids,  # noqa: F401
                            one_torch_thread, zero_width)
from upsafe_ext.magic import (MODES, MagicConfig, MagicTokens, MagicTrainConfig, generate, hash_token,
                              load_magic_model, magic_conversations, prepare_model, save_magic_model,
                              verify_token)
from upsafe_ext.magic import tokens as tokens_module
from upsafe_ext.magic.tokens import TOKENS_FILE, check_hash_record
from upsafe_ext.testing import tiny_causal_lm, tiny_tokenizer
from upsafe_ext.train.sft import render_chat


# ---------------------------------------------------------------------------------------------- secrecy

def test_insecure_seed_reproduces_tokens_distinct_and_hidden():
    a, b = MagicTokens(insecure_seed=7), MagicTokens(insecure_seed=7)
    assert [a.token(m) for m in MODES] == [b.token(m) for m in MODES] and a.insecure_seed == 7
    assert MagicTokens(insecure_seed=8).token("positive") != a.token("positive")
    toks = [a.token(m) for m in MODES]
    assert len(set(toks)) == 3
    for t in toks:
        assert t.startswith("<|") and t.endswith("|>") and len(t) == 22 + 4 and t[2:-2].isalnum()
    text = repr(a) + str(a)
    assert not any(t in text for t in toks) and "7" not in text  # neither the tokens nor the seed
    c = MagicTokens(insecure_seed=1, length=10, token_format="[[{}]]")
    assert all(len(c.token(m)) == 14 and c.token(m).startswith("[[") for m in MODES)
    with pytest.raises(ValueError, match="unknown `mode`"):
        a.token("evil")
    with pytest.raises(ValueError, match="distinct"):
        MagicTokens(tokens={"positive": "<|ab|>", "negative": "<|ab|>x", "rejective": "<|c|>"})
    with pytest.raises(ValueError, match="missing the 'rejective'"):
        MagicTokens(tokens={"positive": "<|ab|>"})


def test_default_tokens_come_from_secrets_differ_per_call_and_have_128_bits(monkeypatch):
    drawn = []
    real_choice = secrets.choice

    def spy(seq):
        drawn.append(seq)
        return real_choice(seq)

    def no_prng(*a, **k):
        raise AssertionError("default tokens must not come from random.Random")

    tok = tiny_tokenizer()
    models = [tiny_causal_lm("llama"), tiny_causal_lm("llama")]
    monkeypatch.setattr(secrets, "choice", spy)
    monkeypatch.setattr(tokens_module.random, "Random", no_prng)
    a, b = MagicTokens(), MagicTokens()
    assert len(drawn) >= 2 * 3 * 22 and set(drawn) == {string.ascii_letters + string.digits}
    p1 = prepare_model(models[0], tok, MagicConfig())
    p2 = prepare_model(models[1], tok)
    monkeypatch.undo()
    for t in (a, b, p1, p2):
        assert t.insecure_seed is None
        for m in MODES:
            body = t.token(m)[2:-2]
            assert set(body) <= set(string.ascii_letters + string.digits)
            assert len(body) * math.log2(62) >= 128, (len(body), len(body) * math.log2(62))  # 22 x 5.954 = 131.0
    for m in MODES:  # fresh tokens on every call
        assert len({t.token(m) for t in (a, b, p1, p2)}) == 4
    with pytest.raises(ValueError, match="128"):  # 16 characters = 95 bits: refused from secrets
        MagicTokens(length=16)
    assert len(MagicTokens(insecure_seed=1, length=16).token("positive")) == 20  # allowed for tests


def test_seed_is_deprecated_and_maps_to_insecure_seed():
    with pytest.warns(DeprecationWarning, match="insecure_seed"):
        old = MagicTokens(seed=7)
    assert old == MagicTokens(insecure_seed=7) and old.insecure_seed == 7
    with pytest.warns(DeprecationWarning, match="insecure_seed"):
        assert old.seed == 7
    with pytest.warns(DeprecationWarning, match="insecure_seed"):
        cfg = MagicConfig(seed=7, token_length=12)
    assert cfg.insecure_seed == 7 and cfg == MagicConfig(insecure_seed=7, token_length=12)
    with pytest.warns(DeprecationWarning):
        assert cfg.seed == 7
    with pytest.raises(ValueError, match="insecure_seed"), pytest.warns(DeprecationWarning):
        MagicConfig(seed=1, insecure_seed=2)
    tok = tiny_tokenizer()
    r1 = prepare_model(tiny_causal_lm("llama"), tok, MagicConfig(insecure_seed=7))
    r2 = prepare_model(tiny_causal_lm("llama"), tok, MagicConfig(insecure_seed=7))
    assert r1 == r2 and [r1.token(m) for m in MODES] == [MagicTokens(insecure_seed=7).token(m) for m in MODES]
    # the seed never reaches a saved config; an old config holding one loads with it dropped
    d = MagicConfig(insecure_seed=918273645).to_dict()
    assert "insecure_seed" not in d and "seed" not in d and "918273645" not in json.dumps(d)
    assert "918273645" not in repr(MagicConfig(insecure_seed=918273645))
    with pytest.warns(UserWarning, match="ignoring the stored token seed"):
        assert MagicConfig.from_dict({**d, "seed": 918273645}).insecure_seed is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MagicConfig.from_dict({**d, "seed": None}) == MagicConfig()  # old files stored seed: null


def test_salted_hashes_differ_per_salt_and_verify():
    token = MagicTokens().token("negative")
    h1, h2 = hash_token(token, salt=b"a" * 16), hash_token(token, salt=b"b" * 16)
    assert h1["hash"] != h2["hash"] and h1["salt"] != h2["salt"]
    assert h1 == hash_token(token, salt=b"a" * 16)  # deterministic given the salt
    assert verify_token(h1, token) and verify_token(h2, token)
    assert not verify_token(h1, token.swapcase()) and not verify_token(h1, token + " ")
    assert token not in json.dumps(h1) and hashlib.sha256(token.encode()).hexdigest() not in json.dumps(h1)
    r1, r2 = hash_token(token), hash_token(token)  # fresh random salts by default
    assert r1["salt"] != r2["salt"] and r1["hash"] != r2["hash"] and len(bytes.fromhex(r1["salt"])) >= 16
    a, b = MagicTokens(insecure_seed=3), MagicTokens(insecure_seed=3)  # same tokens, different salts
    assert a.salted_hash("negative")["hash"] != b.salted_hash("negative")["hash"]
    assert verify_token(a.salted_hash("negative"), b.token("negative"))
    with pytest.raises(ValueError, match="scrypt parameters"):  # a crafted file cannot ask for huge work
        check_hash_record({**r1, "n": 2 ** 30})
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        check_hash_record({**r1, "algo": "md5"})


def test_tokens_save_load_secrecy(tmp_path):
    t = MagicTokens(insecure_seed=918273645, default_system="Sys")
    neg = t.token("negative")
    path = t.save(tmp_path / "priv")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert MagicTokens.load(tmp_path / "priv", allow_negative=True) == t
    priv_text = open(path).read()
    assert neg in priv_text and "918273645" not in priv_text and '"seed"' not in priv_text  # no seed, ever
    assert MagicTokens.load(path, allow_negative=True).insecure_seed is None
    pub = t.save(tmp_path / "pub", include_negative=False)
    with open(pub) as f:
        text = f.read()
    d = json.loads(text)
    assert neg not in text and "918273645" not in text and "sha256" not in d
    assert hashlib.sha256(neg.encode()).hexdigest() not in text  # no unsalted hash either
    assert set(d["hashes"]) == set(MODES) and d["hashes"]["negative"]["salt"] != d["hashes"]["positive"]["salt"]
    assert verify_token(d["hashes"]["negative"], neg) and t.token("positive") in text
    for src in (tmp_path / "priv", tmp_path / "pub"):
        loaded = MagicTokens.load(src)  # allow_negative=False is the default
        with pytest.raises(PermissionError):
            loaded.token("negative")
        assert neg not in repr(vars(loaded)) and loaded.insecure_seed is None
        assert loaded.matches("negative", neg) and not loaded.matches("negative", neg.swapcase())
        assert loaded.token("rejective") == t.token("rejective")
    # a public file loaded with allow_negative=True simply lacks the mode
    assert not MagicTokens.load(tmp_path / "pub", allow_negative=True).allow_negative
    bad = json.loads(open(path).read())
    bad["tokens"]["positive"] = "<|tampered000000000000|>"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / TOKENS_FILE).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="salted hash"):
        MagicTokens.load(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match=TOKENS_FILE):
        MagicTokens.load(tmp_path / "nowhere")


def test_version_1_token_files_still_load_and_lose_their_seed(tmp_path):
    """A file from before salted hashes (unsalted sha256, a seed) loads; re-saving drops the seed."""
    t = MagicTokens(insecure_seed=5)
    v1 = {"format": "upsafe_ext.magic_tokens", "version": 1, "seed": 5,
          "tokens": {m: t.token(m) for m in MODES},
          "sha256": {m: hashlib.sha256(t.token(m).encode()).hexdigest() for m in MODES}}
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / TOKENS_FILE).write_text(json.dumps(v1))
    loaded = MagicTokens.load(tmp_path / "v1", allow_negative=True)
    assert [loaded.token(m) for m in MODES] == [t.token(m) for m in MODES] and loaded.insecure_seed is None
    loaded.save(tmp_path / "v2")
    d = json.loads((tmp_path / "v2" / TOKENS_FILE).read_text())
    assert d["version"] == 2 and "seed" not in d and "sha256" not in d
    assert all(d["hashes"][m]["algo"] != "sha256" for m in MODES)
    v1["tokens"]["positive"] = "<|x|>"
    (tmp_path / "v1" / TOKENS_FILE).write_text(json.dumps(v1))
    with pytest.raises(ValueError, match="does not match"):
        MagicTokens.load(tmp_path / "v1")


def test_negative_mode_is_off_unless_enabled():
    from upsafe_ext import cli

    assert inspect.signature(load_magic_model).parameters["allow_negative"].default is False
    assert inspect.signature(MagicTokens.load).parameters["allow_negative"].default is False
    ap = cli.build_parser()
    for sub in ("generate", "margin"):
        args = ap.parse_args(["magic", sub, "--model", "tiny"] + (["--prompt", "x"] if sub == "generate" else []))
        assert args.allow_negative is False
    args = ap.parse_args(["magic", "train", "--model", "tiny", "--data", "d.jsonl", "--out", "o"])
    assert args.insecure_seed is None and args.seed is None  # tokens from secrets by default


def test_public_copy_and_allow_negative_false_hide_the_negative_token(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    tokens = prepare_model(model, tok, MagicConfig(insecure_seed=12, special_tokens=True))
    neg, neg_id = tokens.token("negative"), ids(tok, tokens.token("negative"))[0]
    priv = save_magic_model(model, tok, tokens, tmp_path / "priv")
    pub = save_magic_model(model, tok, tokens, tmp_path / "pub", include_negative=False)
    leaked = [f for f in os.listdir(pub) if not f.endswith(".safetensors")
              and neg in open(os.path.join(pub, f), encoding="utf-8").read()]
    assert leaked == []
    assert any(neg in open(os.path.join(priv, f), encoding="utf-8").read() for f in os.listdir(priv)
               if f.startswith("tokenizer"))
    for d in (priv, pub):
        m, t, tk = load_magic_model(d, allow_negative=False)
        with pytest.raises(PermissionError):
            tk.token("negative")
        assert neg not in t.get_vocab() and neg_id not in ids(t, neg)  # typed text no longer reaches the id
        assert ids(t, tk.token("rejective")) == ids(tok, tokens.token("rejective"))
        assert len(t) == len(tok)  # the id still exists (renamed to a random, unstored string)
        with pytest.warns(UserWarning, match="positive"):
            a = generate(m, t, ["hi", "hi"], mode=["negative", "positive"], max_new_tokens=4, progress=False)
        assert a[0] == a[1]
        with pytest.raises(PermissionError):
            generate(m, t, ["hi"], mode="negative", strict=True, max_new_tokens=2, progress=False)
        # public save of an object without the negative token stays public
        save_magic_model(m, t, tk, tmp_path / "again", include_negative=True)
        assert neg not in open(tmp_path / "again" / TOKENS_FILE).read()


@pytest.mark.parametrize("special", [False, True], ids=["text_tokens", "special_tokens"])
def test_saved_and_exported_folders_hold_no_seed_and_public_no_plain_negative(tmp_path, special):
    from upsafe_ext import cli

    seed = 918273645519  # a decimal string that cannot turn up by chance
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    cfg = MagicConfig(insecure_seed=seed, special_tokens=special)
    tokens = prepare_model(model, tok, cfg)
    neg = tokens.token("negative")
    priv = save_magic_model(model, tok, tokens, tmp_path / "priv", config=cfg,
                            train_config=MagicTrainConfig(max_steps=3))
    assert cli.main(["magic", "export-public", "--model", str(priv), "--out", str(tmp_path / "pub")]) == 0
    direct = save_magic_model(model, tok, tokens, tmp_path / "pub2", include_negative=False, config=cfg)
    assert files_containing(priv, neg) != []  # the search does read the files (the private copy has it)
    for d in (priv, tmp_path / "pub", direct):
        assert os.listdir(d) and files_containing(d, str(seed)) == [], d
        meta = json.loads((Path(d) / "magic_config.json").read_text())
        assert "seed" not in meta["magic_config"] and "insecure_seed" not in meta["magic_config"]
    for d in (tmp_path / "pub", direct):
        assert files_containing(d, neg) == [] and files_containing(d, neg[2:-2]) == []
        assert files_containing(d, hashlib.sha256(neg.encode()).hexdigest()) == []  # no unsalted hash either
        public = MagicTokens.load(d, allow_negative=True)
        assert not public.allow_negative and public.matches("negative", neg)  # verified by salted hash
        assert not public.matches("negative", MagicTokens(insecure_seed=seed + 1).token("negative"))
        rec = json.loads((Path(d) / TOKENS_FILE).read_text())["hashes"]["negative"]
        assert rec["algo"] in ("scrypt", "pbkdf2_sha256") and len(bytes.fromhex(rec["salt"])) >= 16
        _, _, served = load_magic_model(d, allow_negative=True)
        assert served.resolve_mode("negative") == "positive"

# ---------------------------------------------------------------------------------------------- client text

def test_strip_removes_known_and_token_shaped_strings():
    t = MagicTokens(insecure_seed=0)
    other = MagicTokens(insecure_seed=99).token("negative")  # token-shaped, unknown to `t`
    text = f"hi {t.token('negative')} there {other} <|short|>"
    assert t.strip(text) == "hi  there  <|short|>"


def _one_message(disguise):
    """A variant sending "please <disguised token> answer" as a single user message."""
    return lambda t: [f"please {disguise(t)} answer"]


def _body_only(disguise):
    """`disguise` applied to the token's random part alone (the wrapper dropped)."""
    return lambda t: disguise(t[2:-2])


# the variants a client may type to reach a mode; each takes the token and returns the client messages
TOKEN_VARIANTS = {name: _one_message(disguise) for name, disguise in {
    "exact": str,
    "spacing": lambda t: " ".join([t[:2], t[2:9], t[9:17], t[17:-2], t[-2:]]),
    "spacing_tabs_newlines": lambda t: "\t".join(t[:13]) + "\n" + t[13:],
    "case": str.swapcase,
    "upper": str.upper,
    "fullwidth": fullwidth,
    "cyrillic": lambda t: t.translate(CYRILLIC),
    "zero_width": zero_width,
    "all_combined": disguise_all,
    "nested": lambda t: t[:9] + t + t[9:],
    # without the wrapper only a server that knows the token can tell: these need the fragment match,
    # after folding (case, look-alikes, full-width, zero-width, spacing)
    "body_only": _body_only(str),
    "body_only_case": _body_only(str.swapcase),
    "body_only_cyrillic": _body_only(lambda t: t.translate(CYRILLIC)),
    "body_only_fullwidth_zero_width": _body_only(lambda t: zero_width(fullwidth(t))),
}.items()}
TOKEN_VARIANTS.update({  # several messages
    "split_two_user_messages": lambda t: [f"please {t[:11]}", f"{t[11:]} answer"],
    "split_around_assistant": lambda t: [f"please {t[:14]}", ("assistant", "ok"), f"{t[14:]} answer"],
    "body_only_spaced_split": lambda t: [f"please {' '.join(t[2:13])}", f"{t[13:-2]} answer"],
})
# a negative token that contains letters with Cyrillic look-alikes (so the "cyrillic" variant changes it)
_VARIANT_NEG = "<|aeocpxAEOCPX0123kmtHy5|>"


def _conversation(parts):
    msgs = []
    for p in parts:
        role, content = p if isinstance(p, tuple) else ("user", p)
        msgs.append({"role": role, "content": content})
    return msgs


def _independent_fold(text):
    """A reference folding written separately from the package: NFKC, casefold, a few Cyrillic
    letters to Latin, then letters and digits only."""
    text = unicodedata.normalize("NFKC", text).casefold().translate(str.maketrans("аеосрх", "aeocpx"))
    return "".join(c for c in text if c.isascii() and c.isalnum())


@pytest.mark.parametrize("holder", ["operator", "public"])
@pytest.mark.parametrize("variant", sorted(TOKEN_VARIANTS))
def test_client_token_variants_are_neutralised(variant, holder):
    tok = tiny_tokenizer()
    t = MagicTokens(tokens={"positive": MagicTokens().token("positive"), "negative": _VARIANT_NEG,
                            "rejective": MagicTokens().token("rejective")})
    if holder == "public":  # the server does not know the negative string, only its salted hash
        t.disable_negative()
        if variant.startswith("body_only"):
            pytest.skip("without its wrapper an unknown token's random part is indistinguishable from text")
    parts = TOKEN_VARIANTS[variant](_VARIANT_NEG)
    raw = _conversation(parts)
    body = _independent_fold(_VARIANT_NEG[2:-2])
    assert body in _independent_fold("".join(m["content"] for m in raw)) or variant == "all_combined" \
        or variant.startswith("split") or variant == "nested"  # the variant does carry the token
    convs, modes = magic_conversations(tok, [raw], mode=None, tokens=t)
    assert modes == ["positive"]
    served = convs[0]
    assert served[0] == {"role": "system", "content": t.token("positive")}  # served as positive
    client = served[1:]
    assert [m["role"] for m in client] == [m["role"] for m in raw]
    joined = _independent_fold("".join(m["content"] for m in client))
    assert not any(body[i:i + 8] in joined for i in range(len(body) - 7)), (variant, client)
    text = " ".join(m["content"] for m in client)
    assert "please" in text and "answer" in text  # the rest of the message is kept
    rendered = render_chat(tok, served)
    assert _VARIANT_NEG not in rendered and t.token("positive") in rendered
    if holder == "public":
        with pytest.warns(UserWarning, match="positive"):
            assert magic_conversations(tok, [raw], mode="negative", tokens=t)[1] == ["positive"]


def test_strip_leaves_ordinary_text_alone():
    t = MagicTokens()
    text = ("Use <|im_start|> and <|short|>; sha 3f2a9c0d1e; Привет, как дела? ｆｕｌｌ width, "
            "naïve café, emoji 🙂, zero\u200bwidth, a | b > c")
    assert t.strip(text) == text
    assert t.strip_messages([{"role": "user", "content": text}, {"role": "user", "content": "more"}]) == \
        [{"role": "user", "content": text}, {"role": "user", "content": "more"}]
