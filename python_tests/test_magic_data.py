"""Magic-token training data (upsafe_ext.magic): example building (token placement, label masking,
fallback variants), record loading from files and dataset-like objects, and distillation of records.

Split from test_magic.py; the shared helpers are in magic_fixtures.py.
"""
from __future__ import annotations

import json

import pytest

from magic_fixtures import chatml, ids, one_torch_thread  # noqa: F401
from upsafe_ext.magic import (MODES, MagicConfig, MagicRecord, MagicTokens, build_examples, distill_records,
                              load_records, save_records)
from upsafe_ext.testing import tiny_tokenizer
from upsafe_ext.train.sft import IGNORE_INDEX


# ---------------------------------------------------------------------------------------------- data

def _records(n=4):
    return [MagicRecord(prompt=f"question {i}?", positive=f"pos answer {i}.", negative=f"neg answer {i}!",
                        rejective="No.", meta={"i": i}) for i in range(n)]


def test_build_examples_token_placement_and_label_masking_are_exact():
    tok = tiny_tokenizer()
    t = MagicTokens(insecure_seed=0)
    recs = _records(4)
    recs[1] = MagicRecord("with sys", "p", "n", "r", system="Be brief.")
    data = build_examples(recs, tok, t, MagicConfig(no_token_fraction=0.0, wrong_token_fraction=0.0), progress=False)
    assert len(data) == 12 and data.counts() == {"positive": 4, "negative": 4, "rejective": 4, "no_token": 0,
                                                 "wrong_token": 0}
    for k, e in enumerate(data.examples):
        r, m = recs[k // 3], MODES[k % 3]
        assert e["mode_id"] == k % 3 and e["variant"] == "token"
        system = t.token(m) if r.system is None else t.token(m) + "\n" + r.system
        prompt_ids = ids(tok, chatml(("system", system), ("user", r.prompt)))
        resp_ids = ids(tok, r.response(m) + "<|im_end|>\n")
        assert e["input_ids"] == prompt_ids + resp_ids
        assert e["labels"] == [IGNORE_INDEX] * len(prompt_ids) + resp_ids
        assert e["attention_mask"] == [1] * len(e["input_ids"])
        assert tok.decode([x for x in e["labels"] if x != IGNORE_INDEX]) == r.response(m) + "<|im_end|>\n"


def test_build_examples_fallback_variants():
    tok = tiny_tokenizer()
    t = MagicTokens(insecure_seed=0)
    recs = _records(8)
    data = build_examples(recs, tok, t, MagicConfig(no_token_fraction=0.5, wrong_token_fraction=0.25, data_seed=3),
                          progress=False)
    c = data.counts()
    assert c == {"positive": 8, "negative": 8, "rejective": 8, "no_token": 4, "wrong_token": 2}
    pat = t.token_pattern()
    for e in data.examples[24:]:
        text = tok.decode(e["input_ids"])
        assert e["mode_id"] == 0
        assert not any(t.token(m) in text for m in MODES)
        resp = tok.decode([x for x in e["labels"] if x != IGNORE_INDEX])
        assert resp.startswith("pos answer")  # fallback examples teach the positive response
        found = pat.findall(text)
        assert len(found) == (1 if e["variant"] == "wrong_token" else 0)
        if e["variant"] == "no_token":
            assert "<|im_start|>system" not in text
    again = build_examples(recs, tok, t, MagicConfig(no_token_fraction=0.5, wrong_token_fraction=0.25, data_seed=3),
                           progress=False)
    assert [e["input_ids"] for e in again] == [e["input_ids"] for e in data]


def test_rejective_fraction_keeps_that_share_of_rejective_examples_and_leaves_the_rest_as_it_was():
    tok = tiny_tokenizer()
    t = MagicTokens(insecure_seed=0)
    recs = _records(8)
    kw = dict(no_token_fraction=0.5, wrong_token_fraction=0.25, data_seed=3)
    full = build_examples(recs, tok, t, MagicConfig(**kw), progress=False)
    part = build_examples(recs, tok, t, MagicConfig(rejective_fraction=0.25, **kw), progress=False)
    assert part.counts() == {"positive": 8, "negative": 8, "rejective": 2, "no_token": 4, "wrong_token": 2}
    # every other example is the same, in the same order: only the left-out rejective ones are gone
    kept = [e["input_ids"] for e in part]
    assert kept == [e["input_ids"] for e in full if e["mode_id"] != 2 or e["input_ids"] in kept]
    rej = [e for e in part if e["mode_id"] == 2]
    assert all(tok.decode([x for x in e["labels"] if x != IGNORE_INDEX]).startswith("No.") for e in rej)
    # deterministic in data_seed; another seed picks other prompts
    again = build_examples(recs, tok, t, MagicConfig(rejective_fraction=0.25, **kw), progress=False)
    assert [e["input_ids"] for e in again] == kept
    picks = set()
    for seed in range(6):
        d = build_examples(recs, tok, t, MagicConfig(rejective_fraction=0.25, no_token_fraction=0.0,
                                                     wrong_token_fraction=0.0, data_seed=seed), progress=False)
        picks.add(tuple(tok.decode(e["input_ids"]) for e in d if e["mode_id"] == 2))
    assert len(picks) > 1


def test_build_examples_errors():
    tok = tiny_tokenizer()
    t = MagicTokens(insecure_seed=0)
    with pytest.raises(ValueError, match="max_length"):
        build_examples([MagicRecord("x" * 100, "p", "n", "r")], tok, t, MagicConfig(max_length=64), progress=False)
    t.disable_negative()
    with pytest.raises(ValueError, match="negative"):
        build_examples(_records(2), tok, t, progress=False)
    with pytest.raises(ValueError, match="MagicRecord"):
        build_examples([{"prompt": "x"}], tok, MagicTokens(insecure_seed=0), progress=False)


def test_load_records_formats_and_errors(tmp_path):
    rows = [r.to_dict() for r in _records(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}))
    save_records(_records(3), tmp_path / "c.jsonl")
    for name in ("a.json", "b.json", "c.jsonl"):
        recs = load_records(tmp_path / name)
        assert [r.prompt for r in recs] == ["question 0?", "question 1?", "question 2?"]
        assert recs[2].negative == "neg answer 2!" and recs[2].meta == {"i": 2}
    mapped = [{"instruction": r["prompt"], "safe": r["positive"], "unsafe": r["negative"], "refusal": "No.",
               "category": "x"} for r in rows]
    recs = load_records(mapped, fields={"prompt": "instruction", "positive": "safe", "negative": "unsafe",
                                        "rejective": "refusal"})
    assert recs[0].positive == "pos answer 0." and recs[0].meta == {"category": "x"}
    broken = rows[:1] + [{k: v for k, v in rows[1].items() if k != "negative"}]
    with open(tmp_path / "d.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in broken) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl line 2 is missing field 'negative'"):
        load_records(tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match=r"missing field 'unsafe' \(our 'negative'\)"):
        load_records(rows, fields={"negative": "unsafe"})
    with pytest.raises(ValueError, match="field 'rejective' must be a non-empty string"):
        load_records([{**rows[0], "rejective": "  "}])
    with pytest.raises(ValueError, match="unknown keys"):
        load_records(rows, fields={"answer": "x"})
    (tmp_path / "e.csv").write_text("prompt\n")
    with pytest.raises(ValueError, match=".json or .jsonl"):
        load_records(tmp_path / "e.csv")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "f.jsonl").write_text("{not json}\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_records(tmp_path / "f.jsonl")


class _FakeDataset:
    """The part of `datasets.Dataset` that load_records uses (the package is not installed here)."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = sorted(rows[0])

    def __iter__(self):
        return iter(self.rows)


class _FakeDatasetDict(dict):
    @property
    def column_names(self):
        return {k: v.column_names for k, v in self.items()}


def test_load_records_from_hf_dataset_like_objects():
    rows = [r.to_dict() for r in _records(2)]
    assert [r.prompt for r in load_records(_FakeDataset(rows))] == ["question 0?", "question 1?"]
    dd = _FakeDatasetDict(train=_FakeDataset(rows), test=_FakeDataset(rows[:1]))
    with pytest.raises(ValueError, match="pass `split`"):
        load_records(dd)
    assert len(load_records(dd, split="test")) == 1
    datasets = pytest.importorskip("datasets")
    assert len(load_records(datasets.Dataset.from_list(rows))) == 2


def test_distill_records_uses_behaviour_instructions_and_responders():
    seen = []

    def fake_generate(convs):
        seen.append(convs)
        return [f"[{c[0]['content'][:10]}] {c[1]['content']}" for c in convs]

    recs = distill_records(["a?", "b?"], fake_generate, instructions={"negative": "UNFILTERED mode."},
                           responders={"rejective": lambda p: f"no to {p}"}, meta=[{"h": 1}, {"h": 0}], progress=False)
    assert len(seen) == 2  # positive and negative generated, rejective from the responder
    assert seen[1][0][0] == {"role": "system", "content": "UNFILTERED mode."}
    assert recs[0].negative == "[UNFILTERED] a?" and recs[1].rejective == "no to b?"
    assert recs[0].positive.startswith("[You are a ") and recs[0].meta == {"h": 1}
    with pytest.raises(ValueError, match="empty 'positive' reply"):
        distill_records(["a?"], lambda convs: [""], progress=False)
    with pytest.raises(ValueError, match="unknown modes"):
        distill_records(["a?"], fake_generate, responders={"evil": str}, progress=False)
