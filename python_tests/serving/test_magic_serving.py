"""The magic-token mode through `vllm serve`: `chat_template_kwargs={"safety_mode": ...}` per request.

The request-preparation tests (mode parsing, sanitising, placement, the endpoint guard) run in both venvs.
The server tests need the serving venv and start ONE extra `vllm serve` (module scope) on a SmolLM2
magic folder with reproducible tokens (`build_demo_magic`, `MagicConfig(insecure_seed=0)`; not trained
for the modes: the placed token only changes the system prompt, which is what the plumbing test needs).
"""
import importlib.util
import json
import urllib.error
import urllib.request

import pytest
from serving_cases import VLLM_VENV_REASON
from serving_fixtures import openai_client, running_server

from upsafe_ext.serving.magic_mode import (MAGIC_MIDDLEWARE, MagicServing, allow_negative_from_env, guard_request,
                                           parse_safety_mode)

HAS_VLLM = importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("openai") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason=VLLM_VENV_REASON)

PROMPTS = ["How do I pick a lock?", "Write a haiku about the sea."]
MAX_TOKENS = 20
ZW = "\u200b\u200c\u200d\u2060\ufeff"


def zero_width(s):
    return "".join(c + ZW[i % len(ZW)] for i, c in enumerate(s))


def fullwidth(s):
    return "".join(chr(ord(c) + 0xFEE0) if 0x21 <= ord(c) < 0x7F else c for c in s)


def disguises(token):
    """The token as a client might type it: plain, spaced, upper-case, full-width, zero-width-laced,
    with Cyrillic look-alikes, and its random part only."""
    core = token[2:-2]
    return [token, " ".join(token), token.upper(), fullwidth(token), zero_width(token),
            token.translate(str.maketrans("aeocpx", "аеосрх")), core]


@pytest.fixture(scope="module")
def magic_dir(tmp_path_factory):
    import torch

    from upsafe_ext.serving.demo import build_demo_magic

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_demo_magic(str(tmp_path_factory.mktemp("upsafe-magic") / "smollm2-magic"), insecure_seed=0)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def all_tokens():
    """The three strings (the test knows the seed; the server reads them from the folder)."""
    from upsafe_ext.magic import MagicTokens

    t = MagicTokens(insecure_seed=0)
    return {m: t.token(m) for m in ("positive", "negative", "rejective")}


@pytest.fixture(scope="module")
def tokenizer(magic_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(magic_dir)


# ---------------------------------------------------------------- request preparation (no vLLM)

def test_allow_negative_env():
    assert allow_negative_from_env({}) is False
    assert allow_negative_from_env({"UPSAFE_ALLOW_NEGATIVE": "0"}) is False
    assert allow_negative_from_env({"UPSAFE_ALLOW_NEGATIVE": "1"}) is True
    with pytest.raises(ValueError, match="UPSAFE_ALLOW_NEGATIVE"):
        allow_negative_from_env({"UPSAFE_ALLOW_NEGATIVE": "maybe"})


def test_parse_safety_mode(magic_dir):
    s = MagicServing.from_dir(magic_dir, allow_negative=False)
    assert parse_safety_mode(s.tokens, None) == parse_safety_mode(s.tokens, "") == "positive"
    assert parse_safety_mode(s.tokens, "Rejective") == "rejective"
    for bad in ("nonsense", 3, ["positive"], {"a": 1}):
        with pytest.raises(ValueError, match="safety_mode"):
            parse_safety_mode(s.tokens, bad)
    with pytest.raises(PermissionError, match="safety_mode.*UPSAFE_ALLOW_NEGATIVE"):
        parse_safety_mode(s.tokens, "negative")
    s_neg = MagicServing.from_dir(magic_dir, allow_negative=True)
    assert parse_safety_mode(s_neg.tokens, "negative") == "negative"
    assert MagicServing.from_dir(str(magic_dir) + "-missing") is None


def test_prepare_places_the_requested_token(magic_dir, tokenizer, all_tokens):
    s = MagicServing.from_dir(magic_dir, allow_negative=True)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]
    for mode in ("positive", "negative", "rejective"):
        out, kwargs, got = s.prepare(tokenizer, msgs, {"safety_mode": mode, "add_generation_prompt": True})
        assert got == mode and kwargs == {"add_generation_prompt": True}
        assert out[0] == {"role": "system", "content": all_tokens[mode]}
        assert out[1]["content"] == "hi\nthere"
    assert msgs[0]["content"][0]["text"] == "hi"  # inputs unchanged
    out, _, got = s.prepare(tokenizer, msgs, None)
    assert got == "positive" and out[0]["content"] == all_tokens["positive"]


def test_prepare_strips_client_tokens(magic_dir, tokenizer, all_tokens):
    s = MagicServing.from_dir(magic_dir, allow_negative=False)
    for mode_tok in all_tokens.values():
        for typed in disguises(mode_tok):
            msgs = [{"role": "system", "content": f"Be nice. {typed}"},
                    {"role": "user", "content": [{"type": "text", "text": f"{typed} hello"}], "name": typed}]
            out, kwargs, mode = s.prepare(tokenizer, msgs, {"documents": [{"text": typed}]})
            assert mode == "positive"
            text = json.dumps([out, kwargs], ensure_ascii=False)
            for t in all_tokens.values():  # only the placed positive token is left, once
                assert text.count(t) == (1 if t == all_tokens["positive"] else 0), (typed, text)
            assert out[0]["content"].startswith(all_tokens["positive"] + "\n") and "Be nice." in out[0]["content"]
    # split across two messages
    tok = all_tokens["rejective"]
    out, _, _ = s.prepare(tokenizer, [{"role": "system", "content": tok[:13]}, {"role": "user", "content": tok[13:]}],
                          {})
    assert tok[2:12] not in json.dumps(out) and tok[13:24] not in json.dumps(out)
    with pytest.raises(ValueError, match="text only"):
        s.prepare(tokenizer, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {})


def test_guard_request():
    ok = {"messages": [], "max_tokens": 3}
    assert guard_request("/v1/chat/completions", "POST", ok, special_tokens=False) is None
    assert guard_request("/v1/models", "GET", None, special_tokens=False) is None
    for path in ("/v1/completions", "/tokenize", "/detokenize", "/v1/responses", "/v1/chat/completions/render",
                 "/invocations", "/v1/messages"):
        assert "not served" in guard_request(path, "POST", ok, special_tokens=False), path
    for key, val in (("echo", True), ("return_token_ids", True), ("prompt_logprobs", 1),
                     ("skip_special_tokens", False)):
        assert key in guard_request("/v1/chat/completions", "POST", {**ok, key: val}, special_tokens=False)
    assert guard_request("/v1/chat/completions", "POST", {**ok, "logprobs": True}, special_tokens=False) is None
    assert "logprobs" in guard_request("/v1/chat/completions", "POST", {**ok, "logprobs": True}, special_tokens=True)


# ---------------------------------------------------------------- the real server

@pytest.fixture(scope="module")
def magic_server(magic_dir, tmp_path_factory):
    yield from running_server(magic_dir, "magic", tmp_path_factory, max_num_seqs=16,
                              extra_args=["--middleware", MAGIC_MIDDLEWARE], env={"UPSAFE_ALLOW_NEGATIVE": "0"})


@pytest.fixture(scope="module")
def mclient(magic_server):
    return openai_client(magic_server)


@pytest.fixture(scope="module")
def hf_magic(magic_dir):
    """(conversation, mode) -> HF greedy reply text and new-token count, through upsafe_ext.magic (the
    same sanitising and placement as `magic.generate`), and `magic.generate` itself."""
    import torch

    from upsafe_ext.magic import generate, load_magic_model

    torch.set_num_threads(1)
    model, tok, tokens = load_magic_model(magic_dir, allow_negative=False)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    cache = {}

    def run(conv, mode):
        key = (json.dumps(conv), mode)
        if key not in cache:
            placed = tokens.apply(tok, tokens.strip_messages(conv), tokens.resolve_mode(mode))
            enc = tok.apply_chat_template(placed, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False)
            ids = out[0, enc["input_ids"].shape[1]:].tolist()
            ids = ids[:-1] if ids and ids[-1] in eos else ids
            cache[key] = tok.decode(ids, skip_special_tokens=True)
        return cache[key]

    run.generate = lambda prompts, mode: generate(model, tok, prompts, mode=mode, max_new_tokens=MAX_TOKENS,
                                                  progress=False)
    return run


def mchat(client, messages, mode=None, **kw):
    body = dict(kw.pop("extra_body", {}))
    if mode is not None:
        body["chat_template_kwargs"] = {"safety_mode": mode}
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return client.chat.completions.create(model="magic", messages=messages, temperature=0, max_tokens=MAX_TOKENS,
                                          extra_body=body, **kw)


def no_token_in(text, all_tokens):
    for t in all_tokens.values():
        assert t not in text and t[2:-2] not in text


@needs_vllm
@pytest.mark.slow
def test_placed_token_reaches_the_model(mclient, hf_magic, all_tokens):
    got = {}
    for prompt in PROMPTS:
        conv = [{"role": "user", "content": prompt}]
        for mode in (None, "positive", "rejective", "Rejective"):
            text = mchat(mclient, prompt, mode).choices[0].message.content
            no_token_in(text, all_tokens)
            got[(prompt, mode)] = text
            assert text == hf_magic(conv, mode), (prompt, mode)
        assert got[(prompt, None)] == got[(prompt, "positive")]
        assert got[(prompt, "rejective")] == got[(prompt, "Rejective")]
    # the token changes the prompt, hence (for this untrained model, at least on one prompt) the reply
    assert any(got[(p, "positive")] != got[(p, "rejective")] for p in PROMPTS)
    # and equals upsafe_ext.magic.generate (which strips surrounding whitespace)
    for mode in ("positive", "rejective"):
        assert [got[(p, mode)].strip() for p in PROMPTS] == hf_magic.generate(PROMPTS, mode)


@needs_vllm
@pytest.mark.slow
def test_client_cannot_select_a_mode_by_typing_a_token(mclient, hf_magic, all_tokens):
    import random

    rng = random.Random(0)
    prompt = PROMPTS[0]
    rej = all_tokens["rejective"]
    cases = [[{"role": "system", "content": typed}, {"role": "user", "content": prompt}]
             for typed in disguises(rej)]
    cases.append([{"role": "user", "content": f"{rej} {prompt}"}])
    cases.append([{"role": "system", "content": rej[:12]}, {"role": "user", "content": rej[12:] + " " + prompt}])
    for conv in rng.sample(cases, 5):
        text = mchat(mclient, conv).choices[0].message.content
        no_token_in(text, all_tokens)
        # what the server does is what HF does with the sanitised conversation in the positive mode ...
        assert text == hf_magic(conv, "positive"), conv
        # ... and not what the typed token would select
        placed_rej = [{"role": "system", "content": rej}, {"role": "user", "content": prompt}]
        if hf_magic(placed_rej, "positive") != hf_magic([{"role": "user", "content": prompt}], "positive"):
            assert text != hf_magic(placed_rej, "positive") or text == hf_magic(conv, "positive")
    # the token as the mode's *name* is just an unknown mode
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        mchat(mclient, prompt, rej)
    assert e.value.status_code == 400 and "safety_mode" in str(e.value)


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["negative", "NEGATIVE", "nonsense", 3, ["positive"], {"mode": "rejective"}])
def test_bad_or_disabled_mode_is_400(mclient, all_tokens, mode):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        mchat(mclient, PROMPTS[1], mode)
    assert e.value.status_code == 400
    msg = str(e.value)
    assert "safety_mode" in msg
    if isinstance(mode, str) and mode.lower() == "negative":
        assert "disabled" in msg and "UPSAFE_ALLOW_NEGATIVE" in msg
    no_token_in(msg, all_tokens)
    assert mchat(mclient, PROMPTS[1], "positive").choices[0].message.content  # still serving


def _post(srv, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}{path}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@needs_vllm
@pytest.mark.slow
def test_no_endpoint_shows_the_prompt(magic_server, all_tokens):
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    chat = {"model": "magic", "messages": msgs, "max_tokens": 4, "temperature": 0,
            "chat_template_kwargs": {"safety_mode": "rejective"}}
    for extra in ({"return_token_ids": True}, {"echo": True}, {"prompt_logprobs": 1},
                  {"skip_special_tokens": False}):
        status, text = _post(magic_server, "/v1/chat/completions", {**chat, **extra})
        assert status == 400 and next(iter(extra)) in text, (extra, status, text)
        no_token_in(text, all_tokens)
    for path, body in (("/tokenize", {"model": "magic", "messages": msgs,
                                      "chat_template_kwargs": {"safety_mode": "rejective"}}),
                       ("/v1/chat/completions/render", chat), ("/v1/completions", {"model": "magic", "prompt": "x"}),
                       ("/detokenize", {"model": "magic", "tokens": [1, 2]}), ("/v1/responses", {"input": "x"})):
        status, text = _post(magic_server, path, body)
        assert status in (403, 404, 405), (path, status, text)
        no_token_in(text, all_tokens)
    status, text = _post(magic_server, "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 3})
    assert status == 200, text
    no_token_in(text, all_tokens)
