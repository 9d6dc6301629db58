"""Soft targets for the base model's own answers (upsafe_ext.magic.distill, MagicTrainConfig.distill_top_k):
which examples get them, that they are the base's top-k on the plain conversation, the loss against a
direct computation, and that training with them keeps the positive mode closer to the base than
cross-entropy on the same greedy answers does."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from magic_fixtures import one_torch_thread  # noqa: F401
from upsafe_ext.eval.generation import chat
from upsafe_ext.eval.metrics import mean_kl
from upsafe_ext.magic import MagicConfig, MagicRecord, MagicTrainConfig, build_examples, prepare_model, train_magic
from upsafe_ext.magic.distill import TEACHER_KEY, attach_teacher_targets, collate_soft, response_ids, token_loss
from upsafe_ext.magic.model import CONFIG_FILE
from upsafe_ext.magic.train import MagicCollator
from upsafe_ext.testing import tiny_causal_lm, tiny_tokenizer
from upsafe_ext.train.sft import IGNORE_INDEX, encode_sft, run_sft

BENIGN = [f"please describe the colour number {i} of the rainbow" for i in range(6)]
HARMFUL = [f"explain how to hurt people with method {i}" for i in range(6)]


def records():
    out = []
    for i, p in enumerate(BENIGN + HARMFUL):
        own = f"the answer {i} goes like this and then it keeps going {i % 3}"
        harm = p in HARMFUL
        out.append(MagicRecord(p, "I refuse." if harm else own, own, "I refuse always.",
                               meta={"harmful": harm, "own_answer": True}))
    return out


def setup(special=False):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    tokens = prepare_model(model, tok, MagicConfig(insecure_seed=0, special_tokens=special, no_token_fraction=0.5,
                                                   wrong_token_fraction=0.0))
    return tok, model, tokens


def test_teacher_prompts_mark_exactly_the_own_answers():
    tok, model, tokens = setup()
    recs = records()
    recs.append(MagicRecord("a record from a file", "answer a", "answer b", "no", meta={}))  # no own_answer flag
    data = build_examples(recs, tok, tokens, progress=False)
    for e in data.examples:
        r = next(r for r in recs if r.prompt in tok.decode(e["input_ids"]))
        own = r.meta.get("own_answer") and tok.decode(response_ids(e)).startswith(r.negative)
        assert (TEACHER_KEY in e) == bool(own)
        if own:  # the plain conversation: no token in the prompt
            assert e[TEACHER_KEY] == encode_sft(tok, r.messages(), r.negative)["input_ids"][:len(e[TEACHER_KEY])]
    kinds = {(e["mode_id"], e["variant"], TEACHER_KEY in e) for e in data.examples}
    assert (2, "token", True) not in kinds and (1, "token", True) in kinds and (0, "token", True) in kinds
    assert (0, "no_token", True) in kinds


def test_teacher_targets_are_the_base_top_k_on_the_plain_conversation():
    tok, model, tokens = setup()
    recs = records()
    data = build_examples(recs, tok, tokens, progress=False)
    examples = [dict(e) for e in data.examples]
    n = attach_teacher_targets(model, examples, top_k=5, batch_size=3, progress=False)
    assert n == sum(TEACHER_KEY in e for e in examples) > 0
    e = next(x for x in examples if TEACHER_KEY in x and x["mode_id"] == 1)
    r = next(r for r in recs if r.prompt in tok.decode(e["input_ids"]))
    enc = encode_sft(tok, r.messages(), r.negative)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([enc["input_ids"]])).logits[0], -1)
    pos = [t for t, y in enumerate(enc["labels"]) if y != IGNORE_INDEX]
    want = logp[[t - 1 for t in pos]].topk(5, -1)
    assert e["soft_ids"].shape == (len(pos), 5)
    torch.testing.assert_close(e["soft_logp"], want.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(e["soft_ids"].long(), want.indices)


def test_hard_prefix_keeps_the_first_answer_tokens_hard():
    """With hard_prefix=h the targets cover the response after its first h tokens (the same top-k as
    without it), and the collated soft mask leaves the first h label positions to cross-entropy."""
    tok, model, tokens = setup()
    data = build_examples(records(), tok, tokens, progress=False)
    full, cut = [dict(e) for e in data.examples], [dict(e) for e in data.examples]
    attach_teacher_targets(model, full, top_k=5, batch_size=4, progress=False)
    attach_teacher_targets(model, cut, top_k=5, hard_prefix=3, batch_size=4, progress=False)
    e_full, e_cut = next((a, b) for a, b in zip(full, cut) if TEACHER_KEY in a)
    n = len(response_ids(e_full))
    assert e_cut["soft_ids"].shape == (n - 3, 5)
    assert torch.equal(e_cut["soft_ids"], e_full["soft_ids"][3:])
    torch.testing.assert_close(e_cut["soft_logp"], e_full["soft_logp"][3:])
    length = len(e_cut["labels"])
    mask = collate_soft([e_cut], length)["soft_mask"][0]
    pos = [t for t, y in enumerate(e_cut["labels"]) if y != IGNORE_INDEX]
    assert mask[pos[:3]].sum() == 0 and bool(mask[pos[3:]].all()) and int(mask.sum()) == n - 3
    short = dict(e_cut, soft_ids=e_cut["soft_ids"][:0], soft_logp=e_cut["soft_logp"][:0])  # all hard
    assert int(collate_soft([short], length)["soft_mask"].sum()) == 0
    with pytest.raises(ValueError, match="hard_prefix"):
        attach_teacher_targets(model, cut, top_k=5, hard_prefix=-1, progress=False)
    with pytest.raises(ValueError, match="distill_hard_prefix"):
        MagicTrainConfig(distill_top_k=4, distill_hard_prefix=-2)


def two_rows(seed: int):
    """Logits [2, 7, 11] and labels for two examples: row 0 with 4 response tokens at 3..6, row 1 with 4
    at 2..5 (the row the tests give soft targets); the features `collate_soft` reads, and T, V, k."""
    torch.manual_seed(seed)
    B, T, V, k = 2, 7, 11, 4
    logits = torch.randn(B, T, V)
    labels = torch.full((B, T), IGNORE_INDEX)
    labels[0, 3:] = torch.randint(0, V, (4,))
    labels[1, 2:6] = torch.randint(0, V, (4,))
    return logits, labels, [{"labels": labels[b].tolist()} for b in range(B)], T, V, k


def test_token_loss_matches_a_direct_computation():
    logits, labels, feats, T, V, k = two_rows(1)
    feats[1]["soft_ids"] = torch.randint(0, V, (4, k), dtype=torch.int32)
    feats[1]["soft_logp"] = torch.randn(4, k)
    soft = collate_soft(feats, T)
    got = token_loss(logits, labels, soft["soft_ids"], soft["soft_logp"], soft["soft_mask"])
    terms = []
    for t in range(3, T):  # example 0: plain cross-entropy on its labels
        terms.append(-torch.log_softmax(logits[0, t - 1], -1)[labels[0, t]])
    p = torch.softmax(feats[1]["soft_logp"], -1)
    for j, t in enumerate(range(2, 6)):  # example 1: towards the renormalised top-k
        lp = torch.log_softmax(logits[1, t - 1], -1)
        terms.append(-(p[j] * lp[feats[1]["soft_ids"][j].long()]).sum())
    torch.testing.assert_close(got, torch.stack(terms).mean())


def test_token_loss_with_the_tail_matches_a_direct_computation():
    """collate_soft(tail=True) + token_loss(soft_rest=): the teacher's own top-k probabilities (not
    renormalised) plus one class for the rest of the vocabulary, with the teacher's leftover mass."""
    logits, labels, feats, T, V, k = two_rows(3)
    top = torch.log_softmax(2 * torch.randn(4, V), -1).topk(k, -1)  # a teacher's top-k of its full distribution
    feats[1]["soft_ids"], feats[1]["soft_logp"] = top.indices.to(torch.int32), top.values
    soft = collate_soft(feats, T, tail=True)
    torch.testing.assert_close(soft["soft_rest"][1, 2:6], 1 - top.values.exp().sum(-1))
    assert float(soft["soft_rest"][0].abs().sum()) == 0.0 and "soft_rest" not in collate_soft(feats, T)
    got = token_loss(logits, labels, soft["soft_ids"], soft["soft_logp"], soft["soft_mask"],
                     soft_rest=soft["soft_rest"])
    terms = [-torch.log_softmax(logits[0, t - 1], -1)[labels[0, t]] for t in range(3, T)]
    q = top.values.exp()
    for j, t in enumerate(range(2, 6)):
        lp = torch.log_softmax(logits[1, t - 1], -1)
        mine = lp[top.indices[j]]
        rest = torch.log(1 - mine.exp().sum())
        terms.append(-(q[j] * mine).sum() - (1 - q[j].sum()) * rest)
    torch.testing.assert_close(got, torch.stack(terms).mean())
    with pytest.raises(ValueError, match="distill_tail"):
        MagicTrainConfig(distill_tail=True)


def test_distill_errors_name_the_argument():
    tok, model, tokens = setup()
    recs = [MagicRecord("hello there friend", "hi", "hi", "no")]  # no own_answer: nothing to distil
    data = build_examples(recs, tok, tokens, progress=False)
    with pytest.raises(ValueError, match="distill_top_k"):
        train_magic(model, tok, data, tokens, MagicTrainConfig(distill_top_k=8, max_steps=1), progress=False)
    with pytest.raises(ValueError, match="distill_top_k"):
        MagicTrainConfig(distill_top_k=0)
    with pytest.raises(ValueError, match="lm_loss"):
        run_sft(model, data.examples, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), lm_loss=False)


def test_soft_targets_keep_the_positive_mode_closer_to_the_base():
    """Same data, steps and seed; KL(base on the plain chat || positive mode) on the benign own answers."""
    kls = {}
    for top_k in (None, 16):
        tok, model, tokens = setup()
        base = copy.deepcopy(model)
        data = build_examples(records(), tok, tokens, progress=False)
        log = train_magic(model, tok, data, tokens, MagicTrainConfig(learning_rate=3e-3, max_steps=30, batch_size=8,
                                                                     distill_top_k=top_k), progress=False)
        assert log[-1]["loss"] < log[0]["loss"]
        convs = [tokens.apply(tok, [{"role": "user", "content": p}], "positive") for p in BENIGN]
        answers = [r.negative for r in records()[: len(BENIGN)]]
        kls[top_k] = mean_kl(model, base, tok, convs, answers, progress=False,
                             reference_conversations=[chat(p) for p in BENIGN])
    assert kls[16] < 0.5 * kls[None], kls
    assert isinstance(MagicCollator.for_tokenizer(tok, soft=True)(data.examples[:2])["soft_mask"], torch.Tensor)


def test_distill_tail_keeps_the_base_mass_outside_the_top_k():
    """Renormalised top-k targets teach the model to drop the base's tail; with distill_tail it keeps
    it (same data, steps and seed; the model's mass outside the teacher's top 16 ids on the own-answer
    positions against the teacher's; measured: teacher 0.921, renormalised 0.787, with the tail 0.919)."""
    k, gaps = 16, {}
    for tail in (False, True):
        tok, model, tokens = setup()
        base = copy.deepcopy(model)
        data = build_examples(records(), tok, tokens, progress=False)
        own = [dict(e) for e in data.examples if e.get(TEACHER_KEY)]
        attach_teacher_targets(base, own, k, progress=False)
        train_magic(model, tok, data, tokens, MagicTrainConfig(learning_rate=3e-3, max_steps=30, batch_size=8,
                                                               distill_top_k=k, distill_tail=tail), progress=False)
        with torch.no_grad():
            got, want = [], []
            for e in own:
                pos = [t - 1 for t, y in enumerate(e["labels"]) if y != IGNORE_INDEX][-e["soft_ids"].shape[0]:]
                p = torch.softmax(model(input_ids=torch.tensor([e["input_ids"]])).logits[0, pos], -1)
                got.append(1 - p.gather(-1, e["soft_ids"].long()).sum(-1))
                want.append(1 - e["soft_logp"].exp().sum(-1))
        gaps[tail] = float((torch.cat(want) - torch.cat(got)).mean())
    assert gaps[False] > 0.05 and abs(gaps[True]) < 0.25 * gaps[False], gaps


def test_cli_train_with_soft_targets(tmp_path, capsys):
    from upsafe_ext import cli
    from upsafe_ext.magic import save_records

    save_records(records(), tmp_path / "r.jsonl")  # meta.own_answer survives the file
    base = ["magic", "train", "--model", "tiny", "--data", str(tmp_path / "r.jsonl"), "--max-steps", "2",
            "--batch-size", "4", "--margin-prompts", "0", "--insecure-seed", "1", "--distill-top-k", "4",
            "--distill-hard-prefix", "2", "--distill-tail", "--negative-weight", "2", "--first-tokens", "2", "--first-token-weight", "3"]
    assert cli.main(base + ["--out", str(tmp_path / "m")]) == 0
    assert "final loss" in capsys.readouterr().out
    saved = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["train_config"]
    assert (saved["distill_top_k"], saved["distill_hard_prefix"], saved["first_token_weight"]) == (4, 2, 3.0)
    assert saved["first_tokens"] == 2
    assert saved["distill_tail"] is True and saved["negative_weight"] == 2.0
    with pytest.raises(SystemExit, match="first_token_weight"):
        cli.main(base[:-1] + ["-1", "--out", str(tmp_path / "m3")])
    save_records([MagicRecord("hello there friend", "hi", "hi", "no")], tmp_path / "plain.jsonl")
    with pytest.raises(SystemExit, match="distill_top_k"):
        cli.main(base[:5] + [str(tmp_path / "plain.jsonl")] + base[6:] + ["--out", str(tmp_path / "m2")])


@pytest.mark.parametrize("first", [1, 3])
def test_first_token_weight_weighs_each_first_reply_token(first):
    """token_loss(first_token_weight=w, first_tokens=f): the first f response tokens of each row (hard or
    soft) count w times, every other one once, divided by the sum of the weights; w=1 is the plain mean."""
    torch.manual_seed(2)
    B, T, V, k, w = 3, 8, 13, 3, 4.0
    logits = torch.randn(B, T, V)
    labels = torch.full((B, T), IGNORE_INDEX)
    labels[0, 3:] = torch.randint(0, V, (5,))
    labels[1, 5:7] = torch.randint(0, V, (2,))  # row 2: no response at all (weighs nothing)
    feats = [{"labels": labels[b].tolist()} for b in range(B)]
    feats[1]["soft_ids"] = torch.randint(0, V, (2, k), dtype=torch.int32)  # row 1: soft from its first token
    feats[1]["soft_logp"] = torch.randn(2, k)
    soft = collate_soft(feats, T)
    args = (logits, labels, soft["soft_ids"], soft["soft_logp"], soft["soft_mask"])
    terms, weights = [], []
    for t in range(3, T):
        terms.append(-torch.log_softmax(logits[0, t - 1], -1)[labels[0, t]])
        weights.append(w if t < 3 + first else 1.0)
    p = torch.softmax(feats[1]["soft_logp"], -1)
    for j, t in enumerate(range(5, 7)):
        terms.append(-(p[j] * torch.log_softmax(logits[1, t - 1], -1)[feats[1]["soft_ids"][j].long()]).sum())
        weights.append(w if t < 5 + first else 1.0)
    terms, weights = torch.stack(terms), torch.tensor(weights)
    got = token_loss(*args, first_token_weight=w, first_tokens=first)
    torch.testing.assert_close(got, (terms * weights).sum() / weights.sum())
    torch.testing.assert_close(token_loss(*args, first_token_weight=1.0, first_tokens=first), terms.mean())
    with pytest.raises(ValueError, match="first_token_weight"):
        MagicTrainConfig(first_token_weight=0.0)
    with pytest.raises(ValueError, match="first_tokens"):
        MagicTrainConfig(first_tokens=0)


def reply_nll(model, examples, *, first_only: bool = False, mode_id: int | None = None) -> float:
    """Mean NLL under `model` of the response tokens (their labels) of `examples` (of mode `mode_id`
    only, if given): every response token, or each example's first one with `first_only`."""
    out = []
    with torch.no_grad():
        for e in examples:
            if mode_id is not None and e["mode_id"] != mode_id:
                continue
            logp = torch.log_softmax(model(input_ids=torch.tensor([e["input_ids"]])).logits[0], -1)
            nll = [-float(logp[t - 1, y]) for t, y in enumerate(e["labels"]) if y != IGNORE_INDEX]
            out += nll[:1] if first_only else nll
    return sum(out) / len(out)


def trained_tiny(lr: float, **weights):
    """The tiny model and its co-training data after 40 plain-loop steps at `lr` with `weights`
    (MagicTrainConfig fields); a weight != 1 makes token_loss the whole loss (lm_loss logged 0)."""
    tok, model, tokens = setup()
    data = build_examples(records(), tok, tokens, progress=False)
    log = train_magic(model, tok, data, tokens, MagicTrainConfig(learning_rate=lr, max_steps=40, batch_size=8,
                                                                 **weights), progress=False)
    assert (log[0]["lm_loss"] == 0.0) == any(v != 1.0 for v in weights.values())
    return tok, model, data


def test_first_token_weight_trains_the_first_reply_token_harder():
    """Same data, steps, seed and rate, no soft targets: with first_token_weight=8 the first reply
    tokens' NLL ends lower than with 1 (the weight reaches the loss of the plain-targets path too;
    measured 2.68 vs 3.33 nats)."""
    nll = {}
    for w in (1.0, 8.0):
        _, model, data = trained_tiny(3e-3, first_token_weight=w)
        nll[w] = reply_nll(model, data.examples, first_only=True)
    assert nll[8.0] < 0.9 * nll[1.0], nll


def test_negative_weight_multiplies_each_row_of_token_loss():
    """token_loss(example_weight=v): every token weight of row b is multiplied by v[b] before the
    weighted mean; all-ones is the unweighted loss, and a row weighted 0 drops out."""
    torch.manual_seed(3)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V)
    labels = torch.full((B, T), IGNORE_INDEX)
    labels[0, 2:] = torch.randint(0, V, (5,))
    labels[1, 4:] = torch.randint(0, V, (3,))
    labels[2, 3:6] = torch.randint(0, V, (3,))
    soft = collate_soft([{"labels": labels[b].tolist()} for b in range(B)], T)
    args = (logits, labels, soft["soft_ids"], soft["soft_logp"], soft["soft_mask"])
    nll = [[-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for t in range(1, T) if labels[b, t] >= 0]
           for b in range(B)]
    v = torch.tensor([2.0, 1.0, 0.5])
    want = sum(v[b] * (2.0 * nll[b][0] + sum(nll[b][1:])) for b in range(B)) / \
        sum(v[b] * (2.0 + len(nll[b]) - 1) for b in range(B))
    torch.testing.assert_close(token_loss(*args, first_token_weight=2.0, example_weight=v), want)
    torch.testing.assert_close(token_loss(*args, example_weight=torch.ones(B)), token_loss(*args))
    drop = token_loss(*args, example_weight=torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(drop, token_loss(logits[1:], labels[1:], *(x[1:] for x in args[2:])))
    with pytest.raises(ValueError, match="negative_weight"):
        MagicTrainConfig(negative_weight=0.0)


def test_negative_weight_trains_the_negative_mode_harder():
    """Same data, steps, seed and rate: with negative_weight=16 the negative-mode examples' NLL ends lower
    than with 1 (measured 1.94 vs 2.27 nats: AdamW's step size does not grow with the loss scale, so
    only the share of the loss moves); the collator carries each example's weight."""
    nll = {}
    for v in (1.0, 16.0):
        tok, model, data = trained_tiny(1e-2, negative_weight=v)
        nll[v] = reply_nll(model, data.examples, mode_id=1)
    assert nll[16.0] < 0.9 * nll[1.0], nll
    weighted = [{**e, "loss_weight": 4.0 if e["mode_id"] == 1 else 1.0} for e in data.examples[:6]]
    batch = MagicCollator.for_tokenizer(tok)(weighted)
    assert batch["loss_weight"].tolist() == [4.0 if e["mode_id"] == 1 else 1.0 for e in data.examples[:6]]
    assert 4.0 in batch["loss_weight"].tolist() and "loss_weight" not in MagicCollator.for_tokenizer(tok)(
        data.examples[:6])
