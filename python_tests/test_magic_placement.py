"""Magic-token configuration, mode resolution, placement, special-token registration and save/load
(upsafe_ext.magic), on tiny random models and the byte-level ChatML tokenizer from upsafe_ext.testing;
plus the slow SmolLM2 placement / registration / baseline-margin check.
The token-security tests are in test_magic_tokens.py.

Split from test_magic.py; the shared helpers are in magic_fixtures.py.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from magic_fixtures import chatml, ids, one_torch_thread  # noqa: F401
from upsafe_ext.magic import (MODES, MagicConfig, MagicRecord, MagicTokens, MagicTrainConfig, build_examples,
                              load_magic_model,
                              magic_conversations, prepare_model, safety_alignment_margin, save_magic_model,
                              supports_system_role)
from upsafe_ext.magic.tokens import TOKENS_FILE
from upsafe_ext.testing import tiny_causal_lm, tiny_tokenizer
from upsafe_ext.train.sft import render_chat


NO_SYSTEM_RAISES = (  # Gemma-style: refuses a system message
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start>' + message['role'] + '\n' + message['content'] + '<end>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start>assistant\n' }}{% endif %}"
)
NO_SYSTEM_DROPS = (  # silently drops system messages
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<start>' + message['role'] + '\n' + message['content'] + '<end>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value", [
    ("insecure_seed", 1.5), ("token_length", 4), ("token_length", 65), ("token_format", "<|x|>"),
    ("token_format", "{}{}"),
    ("special_tokens", 1), ("placement", "user"), ("separator", None), ("no_system_role", "ignore"),
    ("no_token_fraction", -0.1), ("wrong_token_fraction", 1.5), ("wrong_token_fraction", float("nan")),
    ("max_length", 4), ("data_seed", None), ("rejective_fraction", 0.0), ("rejective_fraction", 1.01),
    ("token_repeat", 0), ("token_repeat", 17), ("token_repeat", 2.0),
])
def test_magic_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"MagicConfig.{field}"):
        MagicConfig(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("learning_rate", 0.0), ("learning_rate", float("inf")), ("weight_decay", -1), ("warmup_ratio", 1.0),
    ("lr_schedule", "cosine"), ("epochs", 0), ("max_steps", 0), ("batch_size", 0), ("grad_accum", 1.5),
    ("max_grad_norm", 0), ("autocast", "fp8"), ("save_steps", 0), ("train_embeddings_only", "yes"),
    ("trainable_pattern", "("), ("trainable_pattern", ""),
])
def test_train_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"MagicTrainConfig.{field}"):
        MagicTrainConfig(**{field: value})


def test_configs_round_trip_and_tolerate_newer_keys():
    cfg = MagicConfig(insecure_seed=3, token_length=12, special_tokens=True, default_system="Be nice.")
    assert MagicConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert MagicConfig().token_length == 22 and MagicConfig().insecure_seed is None
    tc = MagicTrainConfig(learning_rate=1e-4, max_steps=7, output_dir="x", save_steps=2)
    assert MagicTrainConfig.from_dict(tc.to_dict()) == tc
    with pytest.warns(UserWarning, match="unknown keys"):
        assert MagicConfig.from_dict({**cfg.to_dict(), "from_the_future": 1}) == cfg
    with pytest.raises(ValueError, match="not a MagicConfig"):
        MagicConfig.from_dict(tc.to_dict())
    with pytest.raises(ValueError, match="output_dir"):
        MagicTrainConfig(save_steps=10)
    assert MagicTrainConfig(batch_size=4, grad_accum=2, epochs=2.0).total_steps(17) == 6  # ceil(17/8)=3 x 2


# ---------------------------------------------------------------------------------------------- tokens
# (drawing, seeds, hashes, secret-keeping saves and client-text cleaning: test_magic_tokens.py)

@pytest.mark.parametrize("asked,expected", [
    ("positive", "positive"), ("negative", "negative"), ("rejective", "rejective"), ("Rejective ", "rejective"),
    (None, "positive"), ("", "positive"), ("jailbreak", "positive"), (3, "positive"),
])
def test_resolve_mode_falls_back_to_positive(asked, expected):
    assert MagicTokens(insecure_seed=0).resolve_mode(asked) == expected


def test_resolve_mode_strict_and_disabled_negative():
    t = MagicTokens(insecure_seed=0)
    with pytest.raises(ValueError, match="unknown"):
        t.resolve_mode("jailbreak", strict=True)
    neg = t.token("negative")
    t.disable_negative()
    assert t.resolve_mode("negative") == "positive"
    with pytest.raises(PermissionError):
        t.resolve_mode("negative", strict=True)
    with pytest.raises(PermissionError):
        t.token("negative")
    assert t.modes == ("positive", "rejective") and t.insecure_seed is None
    assert t.matches("negative", neg) and not t.matches("negative", neg + "x")  # via its salted hash
    assert neg not in repr(vars(t)) and t.salted_hash("negative")["salt"]


def test_placement_through_chatml_template():
    tok = tiny_tokenizer()
    t = MagicTokens(insecure_seed=0)
    pos = t.token("positive")
    user = [{"role": "user", "content": "Hi"}]
    assert supports_system_role(tok)
    assert render_chat(tok, t.apply(tok, user, "positive")) == chatml(("system", pos), ("user", "Hi"))
    sys_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(tok, t.apply(tok, sys_user, "positive")) == chatml(("system", pos + "\nBe brief."), ("user", "Hi"))
    suf = MagicTokens(insecure_seed=0, placement="system_suffix", separator=" ")
    assert suf.apply(tok, sys_user, "rejective")[0]["content"] == "Be brief. " + suf.token("rejective")
    dflt = MagicTokens(insecure_seed=0, default_system="You are helpful.")
    assert dflt.apply(tok, user, "negative")[0] == {"role": "system",
                                                    "content": dflt.token("negative") + "\nYou are helpful."}
    assert t.apply(tok, user, None) == user
    assert user == [{"role": "user", "content": "Hi"}]  # the input is not modified


def test_token_repeat_places_k_copies_everywhere_a_token_goes(tmp_path):
    """MagicConfig(token_repeat=k): the mode token stands k times side by side (prefix, suffix, the
    user-prefix fallback, the wrong-token examples), is one id per copy when registered, and the
    setting travels with the saved tokens; a client's copy of the token is still stripped."""
    tok = tiny_tokenizer()
    user = [{"role": "user", "content": "Hi"}]
    tokens = prepare_model(tiny_causal_lm("llama"), tok, MagicConfig(insecure_seed=0, special_tokens=True,
                                                                     token_repeat=3))
    pos = tokens.token("positive")
    assert tokens.repeat == 3 and tokens.apply(tok, user, "positive")[0]["content"] == pos * 3
    assert render_chat(tok, tokens.apply(tok, user, "positive")) == chatml(("system", pos * 3), ("user", "Hi"))
    placed = tok(render_chat(tok, tokens.apply(tok, user, "negative")))["input_ids"]
    assert placed.count(tokens.token_ids(tok)["negative"]) == 3
    suf = MagicTokens(insecure_seed=0, placement="system_suffix", repeat=2)
    sys_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert suf.apply(tok, sys_user, "rejective")[0]["content"] == "Be brief.\n" + suf.token("rejective") * 2
    plain = tiny_tokenizer(chat_template=NO_SYSTEM_DROPS)
    assert suf.apply(plain, user, "positive")[0]["content"] == suf.token("positive") * 2 + "\nHi"
    assert tokens.apply(tok, user, None) == user
    assert tokens.strip_messages([{"role": "user", "content": "x" + pos * 3}])[0]["content"] == "x"
    data = build_examples([MagicRecord("q?", "p", "n", "r")], tok, tokens,
                          MagicConfig(no_token_fraction=0.0, wrong_token_fraction=1.0), progress=False)
    wrong = [e for e in data.examples if e["variant"] == "wrong_token"]
    assert len(wrong) == 1 and len(tokens.token_pattern().findall(tok.decode(wrong[0]["input_ids"]))) == 3
    tokens.save(tmp_path)
    back = MagicTokens.load(tmp_path, allow_negative=True)
    assert back.repeat == 3 and back == tokens
    assert json.load(open(tmp_path / TOKENS_FILE))["repeat"] == 3
    one = MagicTokens(tokens={m: tokens.token(m) for m in MODES}, repeat=1)
    one.special = True
    assert one != back  # the number of copies is part of the tokens' identity
    assert MagicTokens(insecure_seed=0).repeat == 1  # the default places one copy, as before
    with pytest.raises(ValueError, match="`repeat`"):
        MagicTokens(insecure_seed=0, repeat=0)


WITH_DEFAULT_SYSTEM = (  # SmolLM2 / Qwen2 style: a system message of its own when there is none
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '<|im_start|>system\nYou are Tiny, a helper.<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_template_system_keeps_the_templates_own_system_text(tmp_path):
    """MagicConfig(template_system=True): the token goes with the text the template would have added
    (found by `template_default_system`), so the token is the only change; templates without one
    (or without a system role) give None, and the token stands alone as before."""
    from upsafe_ext.magic.placement import template_default_system

    tok = tiny_tokenizer(chat_template=WITH_DEFAULT_SYSTEM)
    assert template_default_system(tok) == "You are Tiny, a helper."
    for plain in (tiny_tokenizer(), tiny_tokenizer(chat_template=NO_SYSTEM_DROPS)):
        assert template_default_system(plain) is None
    user = [{"role": "user", "content": "Hi"}]
    tokens = prepare_model(tiny_causal_lm("llama"), tok, MagicConfig(insecure_seed=0, template_system=True))
    pos = tokens.token("positive")
    assert tokens.default_system == "You are Tiny, a helper."
    assert render_chat(tok, tokens.apply(tok, user, "positive")) == \
        render_chat(tok, user).replace("You are Tiny", pos + "\nYou are Tiny")
    tokens.save(tmp_path)
    assert MagicTokens.load(tmp_path).default_system == "You are Tiny, a helper."  # saved with the tokens
    alone = prepare_model(tiny_causal_lm("llama"), tok, MagicConfig(insecure_seed=0))
    assert "You are Tiny" not in render_chat(tok, alone.apply(tok, user, "positive"))
    with pytest.raises(ValueError, match="template_system"):
        MagicConfig(template_system=True, default_system="Be brief.")


@pytest.mark.parametrize("template", [NO_SYSTEM_RAISES, NO_SYSTEM_DROPS], ids=["raises", "drops"])
def test_placement_fallback_without_system_role(template):
    tok = tiny_tokenizer(chat_template=template)
    assert not supports_system_role(tok)
    t = MagicTokens(insecure_seed=0)
    msgs = t.apply(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                         {"role": "user", "content": "Again"}], "rejective")
    assert msgs[0] == {"role": "user", "content": t.token("rejective") + "\nHi"}
    assert msgs[2]["content"] == "Again"
    assert t.token("rejective") in render_chat(tok, msgs)
    strict = MagicTokens(insecure_seed=0, no_system_role="error")
    with pytest.raises(ValueError, match="no system role"):
        strict.apply(tok, [{"role": "user", "content": "Hi"}], "positive")


def test_register_special_tokens_resizes_and_mean_initialises():
    tok = tiny_tokenizer()
    model = tiny_causal_lm("gpt_neox")  # untied input / output embeddings
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    t = MagicTokens(insecure_seed=0)
    new_ids = t.register(tok, model)
    assert new_ids == [260, 261, 262] and t.special
    for m, i in zip(MODES, new_ids):
        assert ids(tok, t.token(m)) == [i]
        assert ids(tok, "a" + t.token(m) + "b") == [ids(tok, "a")[0], i, ids(tok, "b")[0]]
    w_in, w_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert w_in.shape[0] == 263 and w_out.shape[0] == 263 and model.config.vocab_size == 263
    torch.testing.assert_close(w_in[:260], old_in, rtol=0, atol=0)
    torch.testing.assert_close(w_out[:260], old_out, rtol=0, atol=0)
    for i in new_ids:
        torch.testing.assert_close(w_in[i], old_in.mean(0))
        torch.testing.assert_close(w_out[i], old_out.mean(0))
    assert tok.decode(ids(tok, "h") + [260] + ids(tok, "i"), skip_special_tokens=True) == "hi"
    with torch.no_grad():
        w_in[260] += 1.0
    trained = w_in[260].clone()
    assert t.register(tok, model) == new_ids  # again: no-op, trained rows kept
    torch.testing.assert_close(model.get_input_embeddings().weight[260], trained, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- save / load

def test_save_load_round_trip_is_safetensors_and_exact(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    tokens = prepare_model(model, tok, MagicConfig(insecure_seed=11, special_tokens=True))
    with torch.no_grad():
        model.get_input_embeddings().weight[-3:] += torch.randn(3, model.config.hidden_size)  # "trained" rows
    out = save_magic_model(model, tok, tokens, tmp_path / "m",
                           config=MagicConfig(insecure_seed=11, special_tokens=True))
    files = os.listdir(out)
    assert "model.safetensors" in files and TOKENS_FILE in files and "magic_config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    m2, tok2, t2 = load_magic_model(out, allow_negative=True)  # the operator's explicit choice
    assert t2 == tokens and m2.magic_tokens is t2
    assert not load_magic_model(out)[2].allow_negative  # off by default
    convs, _ = magic_conversations(tok, ["hello"], "negative", tokens=tokens)
    x = torch.tensor([ids(tok, render_chat(tok, convs[0]))])
    assert ids(tok2, render_chat(tok2, convs[0])) == x[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- real model (slow)

@pytest.mark.slow
def test_smollm2_placement_registration_and_baseline_margin():
    """SmolLM2-135M-Instruct: the token goes through its own ChatML template (replacing the default
    system prompt the template injects), special-token registration grows the vocabulary with
    mean-initialised rows, and the untrained model's margin is the "ignores the token" value: exactly
    -1/N with identical (mean) token rows, and near it with text tokens. The co-training run at real
    scale is `python benchmarks/bench_magic_protocol.py` (an hour or more of CPU)."""
    from upsafe_ext.eval.prompts import benign_prompts, harmful_prompts
    from upsafe_ext.eval.real_model import load_smollm2

    model, tok = load_smollm2(verbose=False)  # a model that cannot load fails the test (no skip)
    prompts = harmful_prompts("test")[:4] + benign_prompts("test")[:4]
    text_tokens = MagicTokens(insecure_seed=21)
    assert supports_system_role(tok)
    msgs = text_tokens.apply(tok, [{"role": "user", "content": "hi"}], "rejective")
    assert render_chat(tok, msgs) == chatml(("system", text_tokens.token("rejective")), ("user", "hi"))
    assert "SmolLM" in render_chat(tok, [{"role": "user", "content": "hi"}])  # the template's default system
    base = safety_alignment_margin(model, tok, prompts, batch_size=8, progress=False, tokens=text_tokens)
    assert -0.3 < base.margin < 0.2, base.margin
    emb = model.get_input_embeddings().weight.detach().clone()
    special = MagicTokens(insecure_seed=21)
    new_ids = special.register(tok, model)
    assert new_ids == [49152, 49153, 49154] and model.get_input_embeddings().weight.shape[0] == 49155
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    for i in new_ids:
        torch.testing.assert_close(model.get_input_embeddings().weight[i], emb.mean(0))
    res = safety_alignment_margin(model, tok, prompts, batch_size=8, progress=False, tokens=special)
    assert res.margin == pytest.approx(-1 / len(prompts), abs=1e-4)
    print(f"\nSmolLM2 untrained margin on {len(prompts)} prompts: text tokens {base.margin:.4f}, "
          f"special tokens (mean rows) {res.margin:.4f} (= -1/N)")


@pytest.mark.slow
def test_smollm2_template_system_leaves_the_untrained_model_near_the_base():
    """SmolLM2's template adds its own system text when there is none; a token that replaces it moves
    the untrained model away from the base before any training (measured on 8 ShareGPT val prompts:
    KL 0.05-0.06 nats/token), one that keeps it (template_system=True) barely does (under 0.01)."""
    from upsafe_ext.eval.generation import chat, generate_chat
    from upsafe_ext.eval.metrics import mean_kl
    from upsafe_ext.eval.protocol import protocol_sets
    from upsafe_ext.eval.real_model import load_smollm2

    base, tok = load_smollm2(verbose=False)
    sets = {s.name: s for s in protocol_sets("val", n=4, n_benign=4)}
    prompts = sets["benign imperative"].prompts[:4] + sets["benign question"].prompts[:4]
    answers = generate_chat(base, tok, [chat(p) for p in prompts], max_new_tokens=24, progress=False)
    kl = {}
    for keep in (False, True):
        model, mtok = load_smollm2(verbose=False)
        tokens = prepare_model(model, mtok, MagicConfig(insecure_seed=3, special_tokens=True, template_system=keep))
        assert (tokens.default_system is not None) == keep
        convs = [tokens.apply(mtok, [{"role": "user", "content": p}], "positive") for p in prompts]
        kl[keep] = mean_kl(model, base, mtok, convs, answers, progress=False,
                           reference_conversations=[chat(p) for p in prompts])
    print(f"\nSmolLM2 untrained KL(base || positive) on {len(prompts)} val prompts: token alone {kl[False]:.4f}, "
          f"with the template's system text {kl[True]:.4f}")
    assert kl[True] < 0.02 and kl[False] > 2 * kl[True], kl
