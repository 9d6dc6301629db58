"""``upsafe judge-accuracy``, ``upsafe eval-base`` and ``upsafe prompt-splits``."""
from __future__ import annotations

import json

from ..models import add_model_args, load_from_args


def _fmt_row(name: str, s: dict) -> str:
    return (f"  {name:<22} {s['accuracy']:>8.3f} {s['precision']:>9.3f} {s['recall']:>7.3f} {s['f1']:>6.3f}"
            f" {s['tp']:>4d} {s['fp']:>4d} {s['fn']:>4d} {s['tn']:>4d} {s['n']:>5d}")


def judge_table() -> tuple[str, dict]:
    """The accuracy table of our judges vs the HarmBench prefix baseline on PyRIT's labels."""
    from .judge import PrefixJudge, RefusalJudge, judge_accuracy

    judges = [PrefixJudge(normalise_quotes=False), PrefixJudge(), PrefixJudge(prefix_only=True),
              RefusalJudge(), RefusalJudge(relevance=True)]
    labels = ["harmbench-prefix (raw)", "harmbench-prefix", "harmbench-prefix-start", "keyword", "keyword+relevance"]
    scores = {lab: judge_accuracy(j) for lab, j in zip(labels, judges)}
    lines = ["refusal judges on PyRIT's human-labelled replies (refusal.csv + refusal_extra.csv)",
             f"  {'judge':<22} {'accuracy':>8} {'precision':>9} {'recall':>7} {'F1':>6} {'tp':>4} {'fp':>4} "
             f"{'fn':>4} {'tn':>4} {'n':>5}"]
    lines += [_fmt_row(lab, s) for lab, s in scores.items()]
    lines.append("  harmbench-prefix: HarmBench's AdvBench refusal strings matched anywhere (upstream rule; 'raw' "
                 "without straightening curly quotes, '-start' only at the start of the reply)")
    lines.append("  keyword: upsafe_ext.eval.judge.RefusalJudge(); +relevance also counts off-topic replies "
                 "(needs the prompt)")
    from .judge import heldout_judge_accuracy

    held = {"keyword": heldout_judge_accuracy(RefusalJudge()), "harmbench-prefix": heldout_judge_accuracy(PrefixJudge())}
    lines.append(f"held-out test: {held['keyword']['n'] + held['keyword']['empty']} SmolLM2 replies we labelled by "
                 f"reading them ({held['keyword']['empty']} empty, left out), never used to develop the judge")
    lines += [_fmt_row(lab, s) for lab, s in held.items()]
    scores["heldout"] = held
    return "\n".join(lines), scores


def _cmd_judge_accuracy(args) -> int:
    text, scores = judge_table()
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {kk: vv for kk, vv in v.items()} for k, v in scores.items()}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _cmd_prompt_splits(args) -> int:
    from .prompts import prompt_splits

    print(prompt_splits())
    return 0


def _cmd_eval_base(args) -> int:
    import time

    import torch

    from .judge import RefusalJudge, judge_accuracy
    from .metrics import evaluate_safety
    from .prompts import benign_prompts, harmful_prompts, overrefusal_prompts

    if args.n < 1:
        raise SystemExit(f"upsafe eval-base: --n must be >= 1, got {args.n}")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise SystemExit("upsafe eval-base: --max-new-tokens and --batch-size must be >= 1")
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    judge = RefusalJudge(relevance=args.relevance)
    acc = judge_accuracy(judge)
    model, tok = load_from_args(args)
    harmful = harmful_prompts(args.split)[: args.n]
    benign = benign_prompts(args.split)[: args.n]
    edgy = overrefusal_prompts(args.split)[: args.n]
    t0 = time.time()
    res = evaluate_safety(model, tok, harmful, benign + edgy, judge=judge, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, system=args.system)
    elapsed = time.time() - t0
    b_flags = res["benign_refused"][: len(benign)]
    e_flags = res["benign_refused"][len(benign):]
    judge_note = f"(judge {judge.name}: accuracy {acc['accuracy']:.3f}, precision {acc['precision']:.3f}, " \
                 f"recall {acc['recall']:.3f} on {acc['n']} PyRIT-labelled replies)"
    print(f"{args.model}, split={args.split}, greedy, max_new_tokens={args.max_new_tokens}, "
          f"system={'default template' if args.system is None else repr(args.system)}  [{elapsed:.0f}s]")
    print(f"  safety rate (harmful refused)        {res['safety_rate']:.3f}  "
          f"({sum(res['harmful_refused'])}/{len(harmful)})")
    if benign:
        print(f"  over-refusal (benign refused)        {sum(b_flags) / len(b_flags):.3f}  ({sum(b_flags)}/{len(benign)})")
    if edgy:
        print(f"  over-refusal (edgy benign refused)   {sum(e_flags) / len(e_flags):.3f}  ({sum(e_flags)}/{len(edgy)})")
    print(f"  {judge_note}")
    for label, prompts, replies, flags in (("harmful", harmful, res["harmful_responses"], res["harmful_refused"]),
                                           ("benign", benign + edgy, res["benign_responses"], res["benign_refused"])):
        for p, r, f in list(zip(prompts, replies, flags))[: args.show]:
            print(f"\n[{label}{' REFUSED' if f else ''}] {p}\n  -> {r[:300]!r}")
    if args.json:
        out = {"split": args.split, "n_harmful": len(harmful), "n_benign": len(benign), "n_edgy": len(edgy),
               "safety_rate": res["safety_rate"], "over_refusal_benign": sum(b_flags) / max(1, len(b_flags)),
               "over_refusal_edgy": sum(e_flags) / max(1, len(e_flags)), "judge": judge.name,
               "judge_accuracy": {k: acc[k] for k in ("accuracy", "precision", "recall", "f1", "n")},
               "max_new_tokens": args.max_new_tokens, "seconds": round(elapsed, 1),
               "records": [{"kind": k, "prompt": p, "response": r, "refused": f} for k, ps, rs, fs in
                           (("harmful", harmful, res["harmful_responses"], res["harmful_refused"]),
                            ("benign", benign, res["benign_responses"][: len(benign)], b_flags),
                            ("edgy", edgy, res["benign_responses"][len(benign):], e_flags))
                           for p, r, f in zip(ps, rs, fs)]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def register(sub) -> set[str]:
    """Add the evaluation subcommands to the `upsafe` parser; returns their names."""
    p = sub.add_parser("judge-accuracy", help="the refusal judge's accuracy on PyRIT's labelled replies vs the "
                                              "HarmBench prefix baseline")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.set_defaults(fn=_cmd_judge_accuracy)

    p = sub.add_parser("eval-base", help="a model's safety rate and over-refusal on the test prompts "
                                         "(default: SmolLM2-135M-Instruct)")
    add_model_args(p)
    p.add_argument("--n", type=int, default=20, help="prompts per set (harmful, benign, edgy benign)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    p.add_argument("--relevance", action="store_true", help="judge off-topic replies as refusals too")
    p.add_argument("--show", type=int, default=3, help="print this many example replies per set")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is much faster on a busy machine)")
    p.add_argument("--json", help="also write rates and every reply to this JSON file")
    p.set_defaults(fn=_cmd_eval_base)

    p = sub.add_parser("prompt-splits", help="counts of the fixed train/val/test prompt splits")
    p.set_defaults(fn=_cmd_prompt_splits)
    return {"judge-accuracy", "eval-base", "prompt-splits"}
