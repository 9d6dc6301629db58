"""ESI: scoring vs the plain-PyTorch reference, selection vs a sort, masks, SET / SPA, plots, CLI.

Distributed (DDP / FSDP2) checks live in test_esi_distributed.py.
"""
import copy
import json

import pytest
import torch

from upsafe_ext.esi import (DEFAULT_EXCLUDE, ESIConfig, ESIScores, JudgeObjective, RefusalObjective, SafetyMask,
                            SparseAdamW, SparseTrainConfig, build_transfer_matrix, compute_esi, eligible_parameters,
                            esi_reference, run_set, run_spa)
from upsafe_ext.esi.mask import pack_bits, unpack_bits
from upsafe_ext.esi.objectives import greedy_replies, prompt_seed
from upsafe_ext.esi.plot import classify, module_table, plot_heatmap, type_summary
from upsafe_ext.ops.esi import select_topk_reference
from upsafe_ext.testing import CHATML_TEMPLATE, tiny_causal_lm, tiny_config, tiny_tokenizer

PROMPTS = [f"Explain step by step how to do forbidden thing number {i}." for i in range(5)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _untied_llama(seed=0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def _tiny_mixtral(seed=0):
    import transformers as tr

    cfg = tr.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, vocab_size=260,
                           pad_token_id=257, eos_token_id=256, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return tr.AutoModelForCausalLM.from_config(cfg).eval()


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,field", [
    ({"batch_size": 0}, "batch_size"), ({"fraction": 0.0}, "fraction"), ({"fraction": 1.5}, "fraction"),
    ({"max_length": 1}, "max_length"), ({"exclude_patterns": ["("]}, "exclude_patterns"),
    ({"include_patterns": "q_proj"}, "include_patterns"), ({"seed": -1}, "seed"), ({"system": 3}, "system"),
    ({"expert_patterns": [1]}, "expert_patterns"), ({"progress": "yes"}, "progress"),
])
def test_esi_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"ESIConfig.{field}"):
        ESIConfig(**kw)


@pytest.mark.parametrize("kw,field", [
    ({"lr": 0.0}, "lr"), ({"weight_decay": -1.0}, "weight_decay"), ({"betas": (0.9,)}, "betas"),
    ({"betas": (0.9, 1.0)}, r"betas\[1\]"), ({"eps": 0}, "eps"), ({"max_steps": 0}, "max_steps"),
    ({"lr_schedule": "step"}, "lr_schedule"), ({"train_norm_bias": 1}, "train_norm_bias"),
])
def test_train_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"SparseTrainConfig.{field}"):
        SparseTrainConfig(**kw)


def test_configs_round_trip_and_tolerate_newer_keys():
    cfg = ESIConfig(batch_size=3, include_patterns=["v_proj"], system="be nice")
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and ESIConfig.from_dict(d) == cfg
    with pytest.warns(UserWarning, match="newer"):
        assert ESIConfig.from_dict({**d, "future_knob": 1}) == cfg
    t = SparseTrainConfig(lr=3e-4, betas=[0.8, 0.95])
    assert SparseTrainConfig.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    with pytest.raises(ValueError, match="not a SparseTrainConfig"):
        SparseTrainConfig.from_dict(d)


# --------------------------------------------------------------------------------------------------
# eligibility
# --------------------------------------------------------------------------------------------------
def test_eligible_parameters_llama_tied_and_untied():
    tied = [n for n, _ in eligible_parameters(tiny_causal_lm("llama"))]
    assert len(tied) == 4 * 7 and all(n.startswith("model.layers.") for n in tied)
    assert not any("norm" in n or "embed" in n for n in tied)  # the tied lm_head is the embedding
    untied = [n for n, _ in eligible_parameters(_untied_llama())]
    assert untied == tied + ["lm_head.weight"]
    only_v = [n for n, _ in eligible_parameters(_untied_llama(), ESIConfig(include_patterns=["v_proj"]))]
    assert only_v == [f"model.layers.{i}.self_attn.v_proj.weight" for i in range(4)]


def test_eligible_parameters_gpt2_and_moe():
    g = [n for n, _ in eligible_parameters(tiny_causal_lm("gpt2"))]
    assert {n.split(".", 3)[-1] for n in g} == {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                                "mlp.c_proj.weight"}
    moe = dict(eligible_parameters(_tiny_mixtral()))
    assert "model.layers.0.mlp.experts.gate_up_proj" in moe and moe["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
    assert not any(n.endswith("mlp.gate.weight") for n in moe)  # the router
    assert "lm_head.weight" in moe


# --------------------------------------------------------------------------------------------------
# scoring vs reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_scores_equal_reference_refusal(tok, family):
    model = tiny_causal_lm(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = compute_esi(model, tok, PROMPTS, batch_size=2, progress=False)  # 3 micro-batches (2, 2, 1)
    ref = esi_reference(model, tok, PROMPTS, batch_size=2)
    assert list(scores) == list(ref) and len(scores) > 0
    for n in ref:
        assert scores[n].dtype == torch.float32
        assert torch.equal(scores[n], ref[n]), n  # same fp32 adds and σ·|·|: bit for bit
    assert sum(int((s > 0).sum()) for s in scores.values()) > 0.9 * scores.numel()
    for n, p in model.named_parameters():  # weights, grads and flags left as found
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n]
    assert scores.meta["objective"] == "refusal" and scores.meta["num_prompts"] == len(PROMPTS)


def test_scores_equal_reference_bf16_untied_and_moe(tok):
    m = _untied_llama(dtype=torch.bfloat16)
    s = compute_esi(m, tok, PROMPTS, batch_size=2, progress=False)
    ref = esi_reference(m, tok, PROMPTS, batch_size=2)
    assert "lm_head.weight" in s
    for n in ref:
        assert s[n].dtype == torch.float32 and torch.equal(s[n], ref[n]), n
    moe = _tiny_mixtral()
    s = compute_esi(moe, tok, PROMPTS, batch_size=3, progress=False)
    ref = esi_reference(moe, tok, PROMPTS, batch_size=3)
    for n in ref:
        assert torch.equal(s[n], ref[n]), n
    # σ per expert for fused 3-D expert tensors, checked against autograd (no ESI code): expert e's scores
    # are std(W[e]) · |Σ ∂S/∂W[e]|, not std(W) · |...| of the whole tensor.
    obj = RefusalObjective("I can't help with that.")
    s5 = compute_esi(moe, tok, PROMPTS, obj, batch_size=5, progress=False)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    gu = moe.model.layers[0].mlp.experts.gate_up_proj
    assert gu.shape[0] == 3
    (grad,) = torch.autograd.grad(obj(moe, tok, PROMPTS, ESIConfig()).sum(), [gu])
    for e in range(3):
        want = float(gu[e].detach().double().std()) * grad[e].abs()
        torch.testing.assert_close(s5[name][e], want, rtol=1e-5, atol=1e-9)
        whole = float(gu.detach().double().std()) * grad[e].abs()
        assert not torch.allclose(s5[name][e], whole, rtol=1e-3, atol=0), "σ must be per expert"


def test_scores_formula_by_hand(tok):
    """σ·|Σ ∂S/∂θ| with autograd on the summed objective, no ESI code involved."""
    model = tiny_causal_lm("llama")
    obj = RefusalObjective("I can't help with that.")
    s = compute_esi(model, tok, PROMPTS, obj, batch_size=5, progress=False)
    total = obj(model, tok, PROMPTS, ESIConfig()).sum()
    names = list(s)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(total, [params[n] for n in names])
    for n, g in zip(names, grads):
        want = float(params[n].detach().double().std()) * g.abs()
        torch.testing.assert_close(s[n], want, rtol=1e-5, atol=1e-9)


def test_refusal_objective_is_the_log_likelihood(tok):
    model = tiny_causal_lm("llama")
    obj = RefusalObjective(lambda p: "No. " + p[:5])
    s = obj(model, tok, PROMPTS[:2], ESIConfig())
    for i, p in enumerate(PROMPTS[:2]):
        prefix = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids_p = tok(prefix, add_special_tokens=False)["input_ids"]
        ids_r = tok("No. " + p[:5] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids_p + ids_r])
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0, len(ids_p) - 1: -1]
        want = logp.gather(1, torch.tensor(ids_r)[:, None]).sum()
        torch.testing.assert_close(s[i], want, rtol=1e-5, atol=1e-4)


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


# --------------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_scores(tok):
    return compute_esi(tiny_causal_lm("llama"), tok, PROMPTS, batch_size=5, progress=False)


@pytest.mark.parametrize("fraction", [0.01, 0.0137, 0.5, 1.0])
@pytest.mark.parametrize("largest", [True, False])
def test_select_equals_sort_reference(llama_scores, fraction, largest):
    mask = llama_scores.select(fraction, largest=largest)
    k = round(fraction * llama_scores.numel())
    assert mask.count() == k
    want = select_topk_reference(list(llama_scores.values()), k, largest=largest)
    for n, w in zip(llama_scores, want):
        assert torch.equal(mask.dense(n), w)
    assert mask.meta["selection"] == ("top" if largest else "bottom")


def test_select_ties_and_never_sorts_everything(monkeypatch):
    shapes = {"a": (37, 13), "b": (100,), "c": (8, 8)}
    g = torch.Generator().manual_seed(0)
    scores = ESIScores({n: (torch.rand(s, generator=g) * 5).floor() for n, s in shapes.items()})  # heavy ties
    total = scores.numel()
    real_sort = torch.sort

    def guarded_sort(x, *a, **kw):
        assert x.numel() < total, "select must not sort all scores"
        return real_sort(x, *a, **kw)

    def forbidden(*a, **kw):
        raise AssertionError("kthvalue / topk must not be used")

    monkeypatch.setattr(torch, "sort", guarded_sort)
    monkeypatch.setattr(torch, "kthvalue", forbidden)
    monkeypatch.setattr(torch, "topk", forbidden)
    masks = {k: scores.select(k=k) for k in (1, 50, 300, total - 3)}
    monkeypatch.undo()
    for k, m in masks.items():
        want = select_topk_reference(list(scores.values()), k)
        assert all(torch.equal(m.dense(n), w) for n, w in zip(shapes, want))
    # documented tie order: equal scores go to the lower global index (tensor order, then flat index)
    flat = torch.ones(10)
    m = ESIScores({"x": flat.clone(), "y": flat.clone()}).select(k=12)
    assert m.indices("x").tolist() == list(range(10)) and m.indices("y").tolist() == [0, 1]


def test_random_mask_is_seeded_and_same_size(llama_scores):
    top = llama_scores.select(0.02)
    r1, r2 = llama_scores.random_mask(0.02, seed=1), llama_scores.random_mask(0.02, seed=1)
    r3 = llama_scores.random_mask(0.02, seed=2)
    assert r1 == r2 and r1 != r3 and r1.count() == top.count() == r3.count()
    assert SafetyMask.random_like(top, seed=1) == r1
    assert SafetyMask.random_like(llama_scores.shapes, fraction=0.02, seed=1) == r1
    # a random mask spreads over tensors roughly by size; ESI concentrates
    assert sum(1 for n in r1 if r1.count(n) > 0) > sum(1 for n in top if top.count(n) > 0)


def test_select_errors(llama_scores):
    with pytest.raises(ValueError, match="`fraction`"):
        llama_scores.select(1.5)
    with pytest.raises(ValueError, match="`k`"):
        llama_scores.select(k=llama_scores.numel() + 1)
    with pytest.raises(ValueError, match="exactly one"):
        llama_scores.select(0.1, k=3)
    with pytest.raises(ValueError, match="fp32"):
        ESIScores({"w": torch.zeros(3, dtype=torch.float64)})


def test_scores_save_load_safetensors(llama_scores, tmp_path):
    p = llama_scores.save(str(tmp_path / "s.safetensors"))
    with open(p, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    assert header["__metadata__"]["format"] == "upsafe_esi_scores"
    back = ESIScores.load(p)
    assert list(back) == list(llama_scores)
    assert all(torch.equal(back[n], llama_scores[n]) for n in back)
    assert back.meta["objective"] == "refusal" and back.select(0.01) == llama_scores.select(0.01)
    with pytest.raises(ValueError, match="not an ESI scores file"):
        ESIScores.load(llama_scores.select(0.01).save(str(tmp_path / "m.safetensors")))


# --------------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_pack_bits_round_trip(n):
    x = torch.rand(n) < 0.3
    p = pack_bits(x)
    assert p.dtype == torch.uint8 and p.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(p, n), x)
    if n >= 8:
        y = torch.zeros(n, dtype=torch.bool)
        y[[0, 3]] = True
        assert pack_bits(y)[0].item() == 0b1001


def test_mask_storage_picks_the_smaller_form(tmp_path):
    sparse = torch.zeros(64, 64, dtype=torch.bool)
    sparse.view(-1)[[5, 77, 4000]] = True
    dense = torch.rand(40, 40) < 0.5
    m = SafetyMask.from_dense({"s": sparse, "d": dense, "e": torch.zeros(3, 3, dtype=torch.bool)})
    assert m.storage("s") == "idx" and m.storage("d") == "bits"
    assert m.nbytes() == 3 * 4 + (1600 + 7) // 8 + 0
    assert m.count() == 3 + int(dense.sum()) and m.count("e") == 0
    assert torch.equal(m.dense("s"), sparse) and torch.equal(m.dense("d"), dense)
    assert m.indices("s").tolist() == [5, 77, 4000]
    p = m.save(str(tmp_path / "m.safetensors"))
    back = SafetyMask.load(p)
    assert back == m and back.storage("d") == "bits" and back.names == ["s", "d", "e"]
    g = SafetyMask.from_global_indices(m.shapes, torch.tensor([4096 + 1600 + 2, 5, 4096 + 3]))
    assert g.indices("s").tolist() == [5] and g.indices("d").tolist() == [3] and g.indices("e").tolist() == [2]


def test_mask_load_onto_a_mismatched_model_is_a_clear_error(llama_scores, tmp_path):
    p = llama_scores.select(0.01).save(str(tmp_path / "m.safetensors"))
    SafetyMask.load(p, model=tiny_causal_lm("llama"))  # fits
    with pytest.raises(ValueError, match=r"q_proj.weight' has shape \(64, 64\) in the model but \(32, 32\)"):
        SafetyMask.load(p, model=tiny_causal_lm("llama", hidden=64, heads=4, kv_heads=2))
    with pytest.raises(ValueError, match="is not in the model"):
        SafetyMask.load(p, model=tiny_causal_lm("gpt2"))
    with pytest.raises(ValueError, match="must be in"):
        SafetyMask({"w": (2, 2)}, {"w": torch.tensor([4])})
    with pytest.raises(KeyError, match="no parameter"):
        SafetyMask({"w": (2, 2)}).dense("v")


# --------------------------------------------------------------------------------------------------
# SET / SPA
# --------------------------------------------------------------------------------------------------
def _train_steps(model, opt, tok, steps=3, prompts=PROMPTS):
    obj = RefusalObjective("I can't help with that.")
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (-obj(model, tok, prompts, ESIConfig()).mean()).backward()
        opt.step()


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_set_changes_only_the_mask_and_equals_masked_dense_adamw(tok, llama_scores):
    mask = llama_scores.select(0.05)
    model = tiny_causal_lm("llama")
    before = _snapshot(model)
    opt = SparseAdamW(model, mask, mode="set", lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    # reference: torch's AdamW on every weight, then everything outside the mask put back
    ref = tiny_causal_lm("llama")
    ref_opt = torch.optim.AdamW([p for n, p in ref.named_parameters() if n in mask], lr=1e-2, weight_decay=0.1,
                                betas=(0.9, 0.99), eps=1e-8)
    for _ in range(3):
        _train_steps(model, opt, tok, steps=1)
        _train_steps(ref, ref_opt, tok, steps=1)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n in mask:
                    keep = ~mask.dense(n)
                    p[keep] = before[n][keep]
    after = _snapshot(model)
    changed = 0
    for n, p in after.items():
        if n in mask:
            sel = mask.dense(n)
            assert torch.equal(p[~sel], before[n][~sel]), n  # nothing outside the mask
            changed += int((p[sel] != before[n][sel]).sum())
            torch.testing.assert_close(p, dict(ref.named_parameters())[n].detach(), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(p, before[n]), n  # embeddings, norms
    assert changed == mask.count()
    # compact state: moments only for the selected weights
    st = [opt.state[p] for p in opt.param_groups[0]["params"]]
    assert sum(s["exp_avg"].numel() for s in st) == mask.count() and all("master" not in s for s in st)
    assert sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in st) * 4 == 8 * mask.count()
    ratio = (8 * mask.count()) / opt.dense_adamw_nbytes()
    assert ratio == pytest.approx(mask.count() / sum(mask.numel(n) for n in mask if mask.count(n)), rel=1e-9)
    assert not model.model.norm.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad


def test_set_bf16_keeps_fp32_master(tok, llama_scores):
    mask = llama_scores.select(0.05)
    model = tiny_causal_lm("llama", dtype=torch.bfloat16)
    before = _snapshot(model)
    opt = SparseAdamW(model, mask, mode="set", lr=1e-3)
    _train_steps(model, opt, tok, steps=2)
    for p in opt.param_groups[0]["params"]:
        st = opt.state[p]
        assert st["master"].dtype == torch.float32 and st["exp_avg"].dtype == torch.float32
        assert torch.equal(p.detach().reshape(-1)[st["idx"].long()], st["master"].to(torch.bfloat16))
    for n, p in _snapshot(model).items():
        keep = ~mask.dense(n) if n in mask else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p[keep], before[n][keep]), n
    # the fp32 master moves by less than a bf16 ulp in places: that progress is kept, not rounded away
    sd = opt.state_dict()
    opt2 = SparseAdamW(model, mask, mode="set", lr=1e-3)
    opt2.load_state_dict(sd)
    for p in opt2.param_groups[0]["params"]:
        assert opt2.state[p]["master"].dtype == torch.float32
        assert torch.equal(opt2.state[p]["master"], opt.state[p]["master"])


def test_set_norm_bias_training_is_opt_in(tok, llama_scores):
    mask = llama_scores.select(0.05)
    model = tiny_causal_lm("llama")
    before = _snapshot(model)
    opt = SparseAdamW(model, mask, mode="set", lr=1e-2, train_norm_bias=True)
    _train_steps(model, opt, tok, steps=2)
    after = _snapshot(model)
    assert not torch.equal(after["model.norm.weight"], before["model.norm.weight"])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spa_protected_weights_bitwise_unchanged(tok, llama_scores, dtype):
    mask = llama_scores.select(0.05)
    model = tiny_causal_lm("llama", dtype=dtype)
    before = _snapshot(model)
    opt = SparseAdamW(model, mask, mode="spa", lr=1e-2, weight_decay=0.5)
    _train_steps(model, opt, tok, steps=3)
    after = _snapshot(model)
    free_changed = 0
    for n in mask:
        sel = mask.dense(n)
        assert torch.equal(after[n][sel], before[n][sel]), n
        free_changed += int((after[n][~sel] != before[n][~sel]).sum())
    assert free_changed > 0.5 * (mask.numel() - mask.count())
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # norms off by default


def test_sparse_adamw_argument_errors(llama_scores):
    mask = llama_scores.select(0.01)
    m = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="`mode`"):
        SparseAdamW(m, mask, mode="both")
    with pytest.raises(ValueError, match="`lr`"):
        SparseAdamW(m, mask, lr=-1.0)
    with pytest.raises(ValueError, match=r"`betas\[1\]`"):
        SparseAdamW(m, mask, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="`mask`"):
        SparseAdamW(m, {"a": 1})
    with pytest.raises(ValueError, match="selects no weights"):
        SparseAdamW(m, SafetyMask(mask.shapes))
    with pytest.raises(ValueError, match="does not fit"):
        SparseAdamW(tiny_causal_lm("gpt2"), mask)


def test_set_with_hf_trainer(tok, llama_scores, tmp_path):
    from transformers import Trainer, TrainingArguments

    from upsafe_ext.esi.train import refusal_examples
    from upsafe_ext.train import SFTCollator

    mask = llama_scores.select(0.05)
    model = tiny_causal_lm("llama", dtype=torch.bfloat16)
    before = _snapshot(model)
    opt = SparseAdamW(model, mask, mode="set", lr=1e-2)
    data = refusal_examples(tok, PROMPTS * 2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, remove_unused_columns=False,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, data_collator=SFTCollator(tok.pad_token_id),
            optimizers=(opt, None)).train()
    after = _snapshot(model)
    changed = 0
    for n, p in after.items():
        keep = ~mask.dense(n) if n in mask else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p[keep], before[n][keep]), n
        if n in mask:
            changed += int((p[~keep] != before[n][~keep]).sum())
    assert changed > 0.5 * mask.count()
    for p in opt.param_groups[0]["params"]:
        assert opt.state[p]["master"].dtype == torch.float32 and opt.state[p]["exp_avg"].dtype == torch.float32


def test_run_set_and_run_spa(tok, llama_scores):
    mask = llama_scores.select(0.1)
    model = tiny_causal_lm("llama")
    before = _snapshot(model)
    res = run_set(model, tok, mask, PROMPTS, max_steps=12, lr=2e-2, batch_size=5, progress=False,
                  refusal="I can't help with that.")
    assert len(res.log) == 12 and res.final_loss < res.log[0]["loss"] - 0.1
    for n, p in _snapshot(model).items():
        keep = ~mask.dense(n) if n in mask else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p[keep], before[n][keep])
    from upsafe_ext.esi import own_replies

    pairs = own_replies(model, tok, ["Tell me about bread."], max_new_tokens=6, progress=False)
    assert len(pairs) == 1 and pairs[0][0] == "Tell me about bread." and isinstance(pairs[0][1], str)
    res = run_set(model, tok, mask, PROMPTS, max_steps=2, lr=1e-3, batch_size=6, progress=False,
                  retain=[("Tell me about bread.", "Flour, water, salt and yeast.")])
    assert len(res.log) == 2
    mid = _snapshot(model)
    for n, p in mid.items():
        keep = ~mask.dense(n) if n in mask else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p[keep], before[n][keep])
    res2 = run_spa(model, tok, mask, [(p, "Sure, here is an answer.") for p in PROMPTS], max_steps=3, lr=1e-3,
                   progress=False)
    assert len(res2.log) == 3
    for n in mask:
        assert torch.equal(_snapshot(model)[n][mask.dense(n)], mid[n][mask.dense(n)])
    with pytest.raises(ValueError, match="unknown keyword"):
        run_set(model, tok, mask, PROMPTS, steps=3)
    with pytest.raises(ValueError, match=r"data\[0\]"):
        run_spa(model, tok, mask, [42])


# --------------------------------------------------------------------------------------------------
# plots, errors, CLI
# --------------------------------------------------------------------------------------------------
def test_classify_and_tables(llama_scores, tmp_path):
    assert classify("model.layers.12.self_attn.v_proj.weight") == (12, "v")
    assert classify("transformer.h.3.mlp.c_proj.weight") == (3, "down")
    assert classify("transformer.h.3.attn.c_proj.weight") == (3, "o")
    assert classify("gpt_neox.layers.1.mlp.dense_4h_to_h.weight") == (1, "down")
    assert classify("model.layers.2.mlp.experts.gate_up_proj") == (2, "gate_up")
    assert classify("lm_head.weight") == (None, "lm_head")
    mask = llama_scores.select(0.05)
    tab = module_table(mask)
    assert tab["layers"] == [0, 1, 2, 3] and tab["types"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert int(tab["selected"].sum()) == mask.count() and int(tab["numel"].sum()) == mask.numel()
    assert sum(d["selected"] for d in type_summary(mask).values()) == mask.count()
    p = plot_heatmap(mask, str(tmp_path / "h.png"))
    with open(p, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compute_esi_argument_errors(tok):
    m = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="harmful_prompts"):
        compute_esi(m, tok, "one prompt")
    with pytest.raises(ValueError, match=r"harmful_prompts\[1\]"):
        compute_esi(m, tok, ["a", ""])
    with pytest.raises(ValueError, match="unknown keyword"):
        compute_esi(m, tok, PROMPTS, batchsize=2)
    with pytest.raises(ValueError, match="no eligible parameters"):
        compute_esi(m, tok, PROMPTS, include_patterns=["nothing_matches"])
    with pytest.raises(ValueError, match="one S per prompt"):
        compute_esi(m, tok, PROMPTS, lambda model, t, ps, cfg: torch.zeros(()), progress=False)
    with pytest.raises(ValueError, match="`objective`"):
        compute_esi(m, tok, PROMPTS, "fisher")
    assert DEFAULT_EXCLUDE and all(p.requires_grad for p in m.parameters())


def test_cli_score_select_heatmap_set_spa(tmp_path, capsys):
    from upsafe_ext.cli import build_parser, main

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "score"
    assert main(["esi", "score", "--model", "tiny", "--prompts", str(prompts), "--out", str(out),
                 "--batch-size", "3", "--fraction", "0.02"]) == 0
    for f in ("esi_scores.safetensors", "safety_mask.safetensors", "esi_heatmap.png", "esi_summary.json"):
        assert (out / f).exists(), f
    mask = SafetyMask.load(str(out / "safety_mask.safetensors"))
    assert mask.count() == round(0.02 * 36864)
    assert main(["esi", "select", "--scores", str(out / "esi_scores.safetensors"), "--random", "--fraction", "0.02",
                 "--out", str(tmp_path / "rnd.safetensors"), "--heatmap", str(tmp_path / "rnd.png")]) == 0
    assert SafetyMask.load(str(tmp_path / "rnd.safetensors")).count() == mask.count()
    assert main(["esi", "heatmap", "--mask", str(out / "safety_mask.safetensors"), "--out", str(tmp_path / "h.png")]) == 0
    assert main(["esi", "set", "--model", "tiny", "--mask", str(out / "safety_mask.safetensors"), "--prompts",
                 str(prompts), "--steps", "2", "--batch-size", "2", "--retain", "2", "--max-new-tokens", "8",
                 "--out", str(tmp_path / "set")]) == 0
    report = json.loads((tmp_path / "set" / "set_report.json").read_text())
    assert report["mask_count"] == mask.count() and "retain" in report  # (a random model may say nothing)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": "Sure."}) for p in PROMPTS))
    assert main(["esi", "spa", "--model", str(tmp_path / "set"), "--mask", str(out / "safety_mask.safetensors"),
                 "--data", str(data), "--steps", "2", "--batch-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "top parameters" in text and "SPA: 2 steps" in text
    sub = build_parser()._subparsers._group_actions[0].choices
    assert "esi" in sub


# --------------------------------------------------------------------------------------------------
# real model (slow tier)
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """One intra-op thread for the real-model test (on a shared 2-core box two spinning OpenMP threads
    run 5-10x slower, see test_real_model.py); the previous count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_smollm2_esi_then_set(one_thread):
    """SmolLM2-135M-Instruct on CPU: ESI on 32 harmful-train prompts, the top-1% weights' map, then SET
    (those weights only, 30 steps, harmful -> refusal plus benign retain data) and the refusal rates on
    held-out harmful-test / benign-test prompts before and after (keyword judge). ~15-25 min on 2 cores."""
    from upsafe_ext import eval as ev
    from upsafe_ext.esi import own_replies
    from upsafe_ext.esi.plot import format_summary

    model, tok = ev.load_smollm2(verbose=False)  # no asset = a failure of the slow tier, never a skip
    torch.manual_seed(0)
    scores = compute_esi(model, tok, ev.harmful_prompts("train")[:32], batch_size=8, progress=False)
    mask = scores.select(0.01)
    assert mask.count() == round(0.01 * scores.numel()) == 1061683
    print(format_summary(mask))
    types = type_summary(mask)
    # what we measured: value projections are the densest (~4.4% of v weights vs 1% overall)
    assert types["v"]["density"] > 2 * mask.fraction and types["v"]["density"] == max(
        d["density"] for d in types.values())
    harm, ben = ev.harmful_prompts("test")[:16], ev.benign_prompts("test")[:16]
    before = ev.evaluate_safety(model, tok, harm, ben, max_new_tokens=32, progress=False)
    retain = own_replies(model, tok, ev.benign_prompts("train")[:48], max_new_tokens=48, progress=False)
    res = run_set(model, tok, mask, ev.harmful_prompts("train")[32:160], retain=retain, max_steps=30, lr=5e-5,
                  batch_size=8, progress=False)
    after = ev.evaluate_safety(model, tok, harm, ben, max_new_tokens=32, progress=False)
    print(f"SET loss {res.log[0]['loss']:.3f} -> {res.final_loss:.3f}; refusal on {len(harm)} harmful-test: "
          f"{before['safety_rate']:.3f} -> {after['safety_rate']:.3f}; on {len(ben)} benign-test: "
          f"{before['over_refusal_rate']:.3f} -> {after['over_refusal_rate']:.3f}")
    assert after["safety_rate"] >= before["safety_rate"] + 0.5
