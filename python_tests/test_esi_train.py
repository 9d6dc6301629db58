"""ESI SET / SPA (SparseAdamW), plots, argument errors, the CLI, and the real-model slow test."""
from __future__ import annotations

import json

import pytest
import torch

from upsafe_ext.esi import (DEFAULT_EXCLUDE, ESIConfig, RefusalObjective, SafetyMask, SparseAdamW, compute_esi,
                            run_set, run_spa)
from upsafe_ext.esi.plot import classify, module_table, plot_heatmap, type_summary
from upsafe_ext.testing import tiny_causal_lm
from esi_fixtures import PROMPTS, llama_scores, tok  # noqa: F401  (fixtures)


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


def test_weighted_lm_loss_is_the_model_loss_at_weight_1_and_weighs_the_first_reply_tokens(tok):
    """train.sft.weighted_lm_loss: at weight 1 it is the model's own ``out.loss``; with weight w on the
    first f response tokens it is the weighted mean of the per-token NLLs computed here by hand."""
    from upsafe_ext.train import SFTCollator, chat, encode_sft
    from upsafe_ext.train.sft import IGNORE_INDEX, first_token_weights, weighted_lm_loss

    model = tiny_causal_lm("llama")
    batch = SFTCollator(0)([encode_sft(tok, chat(p), r) for p, r in
                            zip(PROMPTS[:3], ["No.", "I can't help with that request at all.", "Sure: step one"])])
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(weighted_lm_loss(out.logits, batch["labels"]), out.loss)
    y = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), y.clamp_min(0), reduction="none")
    for w, f in ((8.0, 1), (3.0, 4)):
        weights = []
        for row in y:
            pos = (row != IGNORE_INDEX).nonzero().flatten().tolist()
            r = torch.zeros(len(row))
            r[pos] = 1.0
            r[pos[:f]] = w
            weights.append(r)
        ref = torch.stack(weights)
        torch.testing.assert_close(first_token_weights(y != IGNORE_INDEX, w, f), ref)
        torch.testing.assert_close(weighted_lm_loss(out.logits, batch["labels"], w, f), (nll * ref).sum() / ref.sum())
    with pytest.raises(ValueError, match="first_tokens"):
        first_token_weights(y != IGNORE_INDEX, 2.0, 0)


def test_run_set_first_token_weight_trains_the_first_reply_token_harder(tok, llama_scores):
    """SparseTrainConfig.first_token_weight: same mask, data, steps, seed and rate; with weight 8 on the
    first reply token its NLL under the trained model ends lower than with the plain loss (measured 5.02
    against 5.33 nats; the tiny model's loss falls only 5.59 -> 5.31 in these steps), and the logged loss
    is the weighted one (lm_loss 0)."""
    from upsafe_ext.esi import SparseTrainConfig
    from upsafe_ext.train import SFTCollator, chat, encode_sft
    from upsafe_ext.train.sft import IGNORE_INDEX

    mask = llama_scores.select(0.1)
    refusal = "I can't help with that."
    ex = [encode_sft(tok, chat(p), refusal) for p in PROMPTS]
    first = torch.tensor([next(i for i, y in enumerate(e["labels"]) if y != IGNORE_INDEX) for e in ex])
    rows = torch.arange(len(ex))
    nll = {}
    for w in (1.0, 8.0):
        model = tiny_causal_lm("llama")
        res = run_set(model, tok, mask, PROMPTS, max_steps=12, lr=2e-2, batch_size=5, progress=False, refusal=refusal,
                      first_token_weight=w)
        assert (res.log[0]["lm_loss"] == 0.0) == (w != 1.0)
        with torch.no_grad():
            b = SFTCollator(0)(ex)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            logp = torch.log_softmax(logits[rows, first - 1].float(), -1)
            nll[w] = float(-logp[rows, b["labels"][rows, first]].mean())
    assert nll[8.0] < nll[1.0] - 0.15, nll
    with pytest.raises(ValueError, match="first_token_weight"):
        SparseTrainConfig(first_token_weight=0.0)
    with pytest.raises(ValueError, match="first_tokens"):
        SparseTrainConfig(first_tokens=0)


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
                 "--data", str(data), "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "spa")]) == 0
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
