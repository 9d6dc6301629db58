"""ESI's judge objective: greedy replies, the guard logit, the vocabulary transfer, errors."""
from __future__ import annotations

import copy

import pytest
import torch

from upsafe_ext.esi import ESIConfig, JudgeObjective, build_transfer_matrix, compute_esi, esi_reference
from upsafe_ext.esi.objectives import greedy_replies, prompt_seed
from upsafe_ext.testing import CHATML_TEMPLATE, tiny_causal_lm, tiny_tokenizer
from esi_fixtures import PROMPTS, tok  # noqa: F401  (fixtures)


# --------------------------------------------------------------------------------------------------
# judge objective
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_greedy_replies_match_hf_generate(tok, family):
    model = tiny_causal_lm(family)
    from upsafe_ext.eval.generation import encode_prompts

    ids = encode_prompts(tok, [[{"role": "user", "content": p}] for p in PROMPTS])
    got = greedy_replies(model, ids, 12, [256], 257, stop_early=False)
    for p, r in zip(ids, got):
        out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=257,
                             eos_token_id=256)[0, len(p):].tolist()
        want = out[: out.index(256)] if 256 in out else out
        assert r == want


def _splice_reference(model, guard, tok, prompt, safe_id, max_new=8):
    """The guard's safe logit on prefix + the model's greedy reply tokens + suffix, as plain ids."""
    from upsafe_ext.eval.generation import encode_prompts

    p = encode_prompts(tok, [[{"role": "user", "content": prompt}]])[0]
    r = greedy_replies(model, [p], max_new, [256], 257)[0]
    text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": "\x00"}],
                                   tokenize=False, add_generation_prompt=True)
    head, tail = text.split("\x00")
    ids = tok(head, add_special_tokens=False)["input_ids"] + r + tok(tail, add_special_tokens=False)["input_ids"]
    return guard(input_ids=torch.tensor([ids])).logits[0, -1, safe_id].float(), r


def test_judge_objective_value_is_the_guard_logit_on_the_reply(tok):
    model, guard = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    obj = JudgeObjective(guard, tok, safe_token="s", max_new_tokens=8)
    s = obj(model, tok, PROMPTS[:3], ESIConfig())
    safe_id = tok("s", add_special_tokens=False)["input_ids"][0]
    for i, p in enumerate(PROMPTS[:3]):
        want, reply = _splice_reference(model, guard, tok, p, safe_id)
        assert len(reply) > 0
        torch.testing.assert_close(s[i], want, rtol=1e-5, atol=1e-5)
    # safe - unsafe margin
    obj2 = JudgeObjective(guard, tok, safe_token="s", unsafe_token="u", max_new_tokens=8)
    unsafe_id = tok("u", add_special_tokens=False)["input_ids"][0]
    s2 = obj2(model, tok, PROMPTS[:1], ESIConfig())
    want_u, _ = _splice_reference(model, guard, tok, PROMPTS[0], unsafe_id)
    torch.testing.assert_close(s2[0], s[0] - want_u, rtol=1e-5, atol=1e-5)


def test_judge_scores_equal_reference_and_gradient_flows(tok):
    model, guard = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    obj = JudgeObjective(guard, tok, safe_token="s", max_new_tokens=6)
    s = compute_esi(model, tok, PROMPTS, obj, batch_size=2, progress=False)
    ref = esi_reference(model, tok, PROMPTS, obj, batch_size=2)
    for n in ref:
        assert torch.equal(s[n], ref[n]), n
    assert all(float(t.max()) > 0 for t in s.values())  # the relaxation reaches every layer
    assert all(p.grad is None for p in guard.parameters()) and not any(p.requires_grad for p in guard.parameters())
    # the Gumbel noise is per prompt: scoring in another batch order gives the same sums
    s_rev = compute_esi(model, tok, PROMPTS, obj, batch_size=5, progress=False)
    for n in s:
        torch.testing.assert_close(s_rev[n], s[n], rtol=1e-4, atol=1e-9)
    soft = compute_esi(model, tok, PROMPTS, JudgeObjective(guard, tok, safe_token="s", max_new_tokens=6,
                                                           straight_through=False), batch_size=5, progress=False)
    assert any(not torch.allclose(soft[n], s[n]) for n in s)
    assert prompt_seed("a", 0) != prompt_seed("a", 1) != prompt_seed("b", 0)


def _permuted_tokenizer(perm):
    """tiny_tokenizer's byte tokens under other ids (guard id perm[i] for model byte id i) + other specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tiny_tokenizer().get_vocab()
    byte_tokens = sorted((t for t in base if base[t] < 256), key=lambda t: base[t])
    vocab = {t: int(perm[i]) for i, t in enumerate(byte_tokens)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    gt = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<pad>",
                                 additional_special_tokens=["<guard>", "<|im_start|>", "<|im_end|>", "<pad>",
                                                                "<|endoftext|>"])
    gt.chat_template = CHATML_TEMPLATE
    return gt


def test_judge_with_a_different_vocabulary_and_built_transfer(tok):
    """A guard whose vocabulary is a permutation of the model's (plus an extra special token), with its
    embedding rows permuted to match, must give the same S and scores as the identity guard."""
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(256, generator=g)
    gtok = _permuted_tokenizer(perm)
    model, guard = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    T = build_transfer_matrix(tok, gtok, model_vocab_size=260)
    assert T.shape[0] == 260 and T.is_sparse
    dense = T.to_dense()
    for i in range(256):
        assert dense[i, perm[i]] == 1.0 and dense[i].sum() == 1.0
    for s in ("<|im_start|>", "<|im_end|>", "<pad>"):
        assert dense[tok.convert_tokens_to_ids(s), gtok.convert_tokens_to_ids(s)] == 1.0
    # the permuted guard: row gtok_id(x) of the new embedding = row tok_id(x) of the old one
    guard2 = copy.deepcopy(guard)
    old = guard.get_input_embeddings().weight.detach()
    new = torch.zeros(len(gtok), old.shape[1])
    for t, gid in gtok.get_vocab().items():
        mid = tok.convert_tokens_to_ids(t)
        new[gid] = old[mid] if mid is not None else torch.randn(old.shape[1])  # "<guard>": guard-only
    guard2.resize_token_embeddings(len(gtok))
    with torch.no_grad():
        guard2.get_input_embeddings().weight.copy_(new)  # tied: the LM head follows
    a = JudgeObjective(guard, tok, safe_token="s", max_new_tokens=6)
    b = JudgeObjective(guard2, gtok, safe_token="s", max_new_tokens=6)  # transfer built automatically
    sa, sb = a(model, tok, PROMPTS[:3], ESIConfig()), b(model, tok, PROMPTS[:3], ESIConfig())
    torch.testing.assert_close(sb, sa, rtol=1e-5, atol=1e-5)
    ea = compute_esi(model, tok, PROMPTS[:3], a, batch_size=3, progress=False)
    eb = compute_esi(model, tok, PROMPTS[:3], b, batch_size=3, progress=False)
    for n in ea:  # the gradient paths differ in rounding only (sparse T @ E vs a row gather)
        torch.testing.assert_close(eb[n], ea[n], rtol=1e-5, atol=1e-6 * float(ea[n].max()))
    # an explicit 1-D map gives the same
    c = JudgeObjective(guard2, gtok, safe_token="s", max_new_tokens=6,
                       transfer=torch.cat([perm, torch.tensor([gtok.convert_tokens_to_ids(s) for s in
                                                               ("<|im_end|>", "<pad>", "<|endoftext|>", "<|im_start|>")])]))
    torch.testing.assert_close(c(model, tok, PROMPTS[:3], ESIConfig()), sa, rtol=1e-5, atol=1e-5)


def test_transfer_matrix_to_a_character_tokenizer(tok):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz .,!?"))
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    gtok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    T = build_transfer_matrix(tok, gtok).to_dense()
    a_model = tok("a", add_special_tokens=False)["input_ids"][0]
    sp_model = tok(" ", add_special_tokens=False)["input_ids"][0]
    assert T[a_model, vocab["a"]] == 1.0 and T[sp_model, vocab[" "]] == 1.0
    assert T[tok.convert_tokens_to_ids("<|im_end|>")].sum() == 0  # no such guard token


def test_judge_objective_errors(tok):
    guard = tiny_causal_lm("llama", seed=1)
    with pytest.raises(ValueError, match="`tau`"):
        JudgeObjective(guard, tok, tau=0)
    with pytest.raises(ValueError, match="`template`"):
        JudgeObjective(guard, tok, template="no placeholder")
    with pytest.raises(ValueError, match="`guard_model`"):
        JudgeObjective("guard", tok)
    with pytest.raises(ValueError, match="`safe_token`"):
        JudgeObjective(guard, tok, safe_token=10_000)(tiny_causal_lm(), tok, PROMPTS[:1], ESIConfig())
    with pytest.raises(ValueError, match="needs a guard"):
        compute_esi(tiny_causal_lm(), tok, PROMPTS, "judge")


def test_judge_template_string(tok):
    model, guard = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    obj = JudgeObjective(guard, tok, safe_token="s", max_new_tokens=4, template="User: {prompt}\nAgent: {response}\nok?")
    head, tail = obj.guard_text("hi", tok)
    assert head == "User: hi\nAgent: " and tail == "\nok?"
    assert obj(model, tok, PROMPTS[:2], ESIConfig()).shape == (2,)
