"""``upsafe esi {score, select, heatmap, set, spa}``.

    upsafe esi score --model smollm2 --prompts harmful-train --num-prompts 32 --out runs/esi
    upsafe esi select --scores runs/esi/esi_scores.safetensors --fraction 0.01 --random --out rnd.safetensors
    upsafe esi heatmap --mask runs/esi/safety_mask.safetensors --out heat.png
    upsafe esi set --model smollm2 --mask runs/esi/safety_mask.safetensors --steps 40 --eval 48 --out runs/set
    upsafe esi spa --model runs/set --mask runs/esi/safety_mask.safetensors --steps 200 --out runs/spa

``--model`` (with ``--device``, ``--dtype``, ``--cache-dir``): anything ``upsafe_ext.models.load`` takes:
``smollm2``, ``tiny[-family]``, a folder saved by any upsafe method (upcycled, magic, SET/SPA) or Hugging Face.
Every output folder is written atomically and never over ``--model`` (``upsafe_ext.saving.atomic_dir``);
``set`` / ``spa`` save to ``upsafe_out/esi-set`` / ``upsafe_out/esi-spa`` unless ``--out`` is given.
``--prompts``: ``harmful-train`` / ``benign-train`` (the style-balanced training mix of
``upsafe_ext.eval.protocol``: training sources only, so the protocol's unseen-source sets stay unseen),
``harmful-val`` / ``harmful-test`` / ``benign-<split>`` (the fixed offline hash splits), or a file
(.txt one prompt per line, .jsonl with a "prompt" field).
"""
from __future__ import annotations

import json
import os
import time
import warnings

import torch

from ..models import add_model_args, check_out_arg, load, load_from_args
from ..saving import atomic_dir


def load_model(spec: str, dtype: str = "float32", cache_dir: str | None = None):
    """Deprecated: use ``upsafe_ext.models.load(spec, dtype=dtype, cache_dir=cache_dir)``."""
    warnings.warn("upsafe_ext.esi.cli.load_model is deprecated; use upsafe_ext.models.load", DeprecationWarning,
                  stacklevel=2)
    return load(spec, dtype=dtype, cache_dir=cache_dir)


def load_prompts(spec: str, n: int | None = None) -> list[str]:
    """Prompts for a CLI ``--prompts`` value (first `n`)."""
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            if spec.endswith(".jsonl"):
                out = [json.loads(line)["prompt"] for line in f if line.strip()]
            else:
                out = [line.rstrip("\n") for line in f if line.strip()]
    else:
        kind, _, split = spec.partition("-")
        from .. import eval as ev
        from ..eval.protocol import training_mix

        if kind in ("harmful", "benign") and split in ("", "train"):  # the protocol's training sources only
            out = training_mix()[0 if kind == "harmful" else 1]
        elif kind == "harmful":
            out = ev.harmful_prompts(split)
        elif kind == "benign":
            out = ev.benign_prompts(split)
        else:
            raise SystemExit(f"upsafe esi: --prompts {spec!r} is neither a file nor harmful-/benign-<split>")
    if not out:
        raise SystemExit(f"upsafe esi: --prompts {spec!r} has no prompts")
    return out[:n] if n else out


def _threads(args):
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)


def _evaluate(model, tok, n: int, max_new_tokens: int, label: str) -> dict:
    from .. import eval as ev

    t0 = time.time()
    res = ev.evaluate_safety(model, tok, ev.harmful_prompts("test")[:n], ev.benign_prompts("test")[:n],
                             max_new_tokens=max_new_tokens, batch_size=16)
    print(f"[{label}] safety rate on {n} harmful-test prompts: {res['safety_rate']:.3f}   over-refusal on {n} "
          f"benign-test prompts: {res['over_refusal_rate']:.3f}   (judge {res['judge']}, {time.time() - t0:.0f}s)")
    return {k: res[k] for k in ("safety_rate", "over_refusal_rate", "n_harmful", "n_benign", "judge")}


def _judge_accuracy_line() -> dict:
    from ..eval import judge_accuracy

    acc = judge_accuracy()
    print(f"refusal judge accuracy on PyRIT's {acc['n']} labelled replies: {acc['accuracy']:.3f} "
          f"(precision {acc['precision']:.3f}, recall {acc['recall']:.3f})")
    return {k: acc[k] for k in ("accuracy", "precision", "recall", "n")}


def _objective(args, model, tok):
    from .objectives import JudgeObjective, RefusalObjective

    if args.objective == "refusal":
        return RefusalObjective()
    if not args.guard:
        raise SystemExit("upsafe esi score: --objective judge needs --guard (a model directory, 'self' or 'tiny')")
    guard, gtok = load_from_args(args, args.model if args.guard == "self" else args.guard)
    template = args.guard_template
    if template and os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            template = f.read()
    return JudgeObjective(guard, gtok, safe_token=args.safe_token, unsafe_token=args.unsafe_token,
                          max_new_tokens=args.max_new_tokens, template=template, tau=args.tau)


def _cmd_score(args) -> int:
    from .config import ESIConfig
    from .plot import depth_summary, format_summary, plot_heatmap, type_summary
    from .scores import compute_esi

    _threads(args)
    check_out_arg(args.out, [args.model])
    model, tok = load_from_args(args)
    prompts = load_prompts(args.prompts, args.num_prompts)
    cfg = ESIConfig(batch_size=args.batch_size, max_length=args.max_length, fraction=args.fraction, seed=args.seed)
    t0 = time.time()
    scores = compute_esi(model, tok, prompts, _objective(args, model, tok), config=cfg)
    t_score = time.time() - t0
    t0 = time.time()
    mask = scores.select(args.fraction)
    t_sel = time.time() - t0
    names = ("esi_scores.safetensors", "safety_mask.safetensors", "esi_heatmap.png", "esi_summary.json")
    with atomic_dir(args.out, inputs=[args.model]) as tmp:
        scores.save(os.path.join(tmp, names[0]))
        mask.save(os.path.join(tmp, names[1]))
        plot_heatmap(mask, os.path.join(tmp, names[2]))
        with open(os.path.join(tmp, names[3]), "w") as f:
            json.dump({"meta": scores.meta, "config": cfg.to_dict(), "count": mask.count(), "numel": mask.numel(),
                       "seconds": t_score, "types": type_summary(mask), "depth": depth_summary(mask)}, f,
                      indent=2, default=float)
    print(f"scored {scores.numel()} weights in {len(scores.names)} tensors on {len(prompts)} prompts in {t_score:.1f}s "
          f"(mean S = {scores.meta['mean_objective']:.3f}); selected {mask.count()} in {t_sel * 1000:.0f} ms")
    print(format_summary(mask, args.top))
    print(f"wrote {', '.join(os.path.join(args.out, n) for n in names)}")
    return 0


def _cmd_select(args) -> int:
    from .plot import format_summary, plot_heatmap
    from .scores import ESIScores

    if os.path.realpath(args.out) == os.path.realpath(args.scores):
        raise SystemExit(f"upsafe esi select: --out {args.out!r} would overwrite --scores; choose another file")
    scores = ESIScores.load(args.scores)
    if args.random:
        mask = scores.random_mask(args.fraction, seed=args.seed)
    else:
        mask = scores.select(args.fraction, largest=not args.smallest)
    mask.save(args.out)
    print(format_summary(mask, args.top))
    if args.heatmap:
        plot_heatmap(mask, args.heatmap)
    print(f"wrote {args.out}" + (f", {args.heatmap}" if args.heatmap else ""))
    return 0


def _cmd_heatmap(args) -> int:
    from .mask import SafetyMask
    from .plot import format_summary, plot_heatmap

    mask = SafetyMask.load(args.mask)
    plot_heatmap(mask, args.out, value=args.value)
    print(format_summary(mask, args.top))
    print(f"wrote {args.out}")
    return 0


def _train_cmd(args, mode: str) -> int:
    from .config import SparseTrainConfig
    from .mask import SafetyMask
    from .train import own_replies, run_set, run_spa

    _threads(args)
    out = args.out or os.path.join("upsafe_out", f"esi-{mode}")
    check_out_arg(out, [args.model, args.mask])
    model, tok = load_from_args(args)
    mask = SafetyMask.load(args.mask, model=model)
    cfg = SparseTrainConfig(lr=args.lr, weight_decay=args.weight_decay, max_steps=args.steps,
                            batch_size=args.batch_size, max_length=args.max_length, lr_schedule=args.lr_schedule,
                            train_norm_bias=args.train_norm_bias, seed=args.seed,
                            first_token_weight=args.first_token_weight, first_tokens=args.first_tokens)
    report: dict = {"mode": mode, "mask": args.mask, "mask_count": mask.count(), "config": cfg.to_dict()}
    if args.eval:
        report["judge"] = _judge_accuracy_line()
        report["before"] = _evaluate(model, tok, args.eval, args.max_new_tokens, "before")
    t0 = time.time()
    if mode == "set":
        prompts = load_prompts(args.prompts, args.num_prompts)
        retain = None
        if args.retain:  # benign-train prompts with the model's own replies, collected before training
            retain = own_replies(model, tok, load_prompts("benign-train", args.retain),
                                 max_new_tokens=args.max_new_tokens)
            report["retain"] = len(retain)
        res = run_set(model, tok, mask, prompts, config=cfg, retain=retain)
    else:
        if args.data:
            with open(args.data, encoding="utf-8") as f:
                data = [json.loads(line) for line in f if line.strip()]
        else:  # self-distillation: the model's own replies to benign prompts (a utility-preserving default)
            data = own_replies(model, tok, load_prompts(args.prompts, args.num_prompts),
                               max_new_tokens=args.max_new_tokens)
        res = run_spa(model, tok, mask, data, config=cfg)
    report["train_seconds"] = time.time() - t0
    report["loss_first"], report["loss_last"] = res.log[0]["loss"], res.log[-1]["loss"]
    report["optimizer_state_bytes"] = res.optimizer.state_nbytes()
    report["dense_adamw_moment_bytes"] = res.optimizer.dense_adamw_nbytes()
    print(f"{mode.upper()}: {len(res.log)} steps in {report['train_seconds']:.0f}s, loss {report['loss_first']:.3f} -> "
          f"{report['loss_last']:.3f}; optimizer state {report['optimizer_state_bytes'] / 1e6:.2f} MB "
          f"(dense AdamW moments would be {report['dense_adamw_moment_bytes'] / 1e6:.1f} MB)")
    if args.eval:
        report["after"] = _evaluate(model, tok, args.eval, args.max_new_tokens, "after")
    with atomic_dir(out, inputs=[args.model, args.mask]) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, f"{mode}_report.json"), "w") as f:
            json.dump(report, f, indent=2, default=float)
    print(f"wrote {out} (model, tokenizer, {mode}_report.json with the SparseTrainConfig)")
    return 0


def _common(p):
    add_model_args(p, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=10, help="list this many top parameters")


def register(sub) -> set[str]:
    """Add ``upsafe esi ...`` to the `upsafe` parser; returns the command names."""
    esi = sub.add_parser("esi", help="ESI: score safety-critical weights, select them, SET / SPA training")
    esub = esi.add_subparsers(dest="esi_cmd", required=True)

    p = esub.add_parser("score", help="ESI scores of every eligible weight + the top-fraction mask + heatmap")
    _common(p)
    p.add_argument("--prompts", default="harmful-train")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--objective", default="refusal", choices=["refusal", "judge"])
    p.add_argument("--guard", default=None, help="judge: guard model directory, 'self' or 'tiny'")
    p.add_argument("--guard-template", default=None, help="judge: format string/file with {prompt} and {response}")
    p.add_argument("--safe-token", default="safe")
    p.add_argument("--unsafe-token", default=None)
    p.add_argument("--tau", type=float, default=0.3, help="judge: Gumbel-softmax temperature")
    p.add_argument("--max-new-tokens", type=int, default=32, help="judge: greedy reply length")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(fn=_cmd_score)

    p = esub.add_parser("select", help="a mask from saved scores: top / bottom / seeded random")
    p.add_argument("--scores", required=True)
    p.add_argument("--fraction", type=float, default=0.01)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--smallest", action="store_true", help="the lowest scores instead (control)")
    g.add_argument("--random", action="store_true", help="a seeded random mask of the same size (control)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--heatmap", default=None, help="also write this PNG")
    p.add_argument("--out", required=True, help="mask .safetensors")
    p.set_defaults(fn=_cmd_select)

    p = esub.add_parser("heatmap", help="PNG heatmap (layer × q/k/v/o/gate/up/down) of a mask")
    p.add_argument("--mask", required=True)
    p.add_argument("--value", default="density", choices=["density", "share"])
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_cmd_heatmap)

    for mode, help_ in (("set", "SET: train only the masked weights on harmful -> refusal"),
                        ("spa", "SPA: fine-tune with the masked weights frozen bit for bit")):
        p = esub.add_parser(mode, help=help_)
        _common(p)
        p.add_argument("--mask", required=True)
        p.add_argument("--prompts", default="harmful-train" if mode == "set" else "benign-train")
        p.add_argument("--num-prompts", type=int, default=None)
        if mode == "set":
            p.add_argument("--retain", type=int, default=0, help="mix in N benign-train prompts with the model's own "
                                                                "replies (ours; holds over-refusal down)")
        if mode == "spa":
            p.add_argument("--data", default=None, help="JSONL with prompt/response (default: the model's own "
                                                        "replies to --prompts)")
        p.add_argument("--steps", type=int, default=100 if mode == "set" else 1000)
        p.add_argument("--lr", type=float, default=1e-4)
        p.add_argument("--weight-decay", type=float, default=0.0)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--lr-schedule", default="constant", choices=["constant", "linear", "cosine"])
        p.add_argument("--train-norm-bias", action="store_true")
        p.add_argument("--first-token-weight", type=float, default=1.0,
                       help="loss weight of each reply's first --first-tokens tokens (ours; 1.0: the plain LM loss)")
        p.add_argument("--first-tokens", type=int, default=1, help="reply tokens that get --first-token-weight")
        p.add_argument("--eval", type=int, default=0, help="judge N harmful-test + N benign-test replies before/after")
        p.add_argument("--max-new-tokens", type=int, default=48)
        p.add_argument("--out", default=None, help=f"save the trained model + report here (default upsafe_out/esi-{mode})")
        p.set_defaults(fn=lambda a, m=mode: _train_cmd(a, m))
    return {"esi"}
