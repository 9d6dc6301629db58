"""Magic-token co-training benchmark: safety alignment margin before/after and per-mode behaviour.

    python benchmarks/bench_magic.py                 # synthetic task on a tiny Llama (CPU, ~1-3 min)
    python benchmarks/bench_magic.py --real          # SmolLM2-135M-Instruct, a short CPU co-training run
                                                     # (~11 min on a loaded 2-core machine, 1 thread)

Synthetic: the task of python_tests/magic_fixtures.py (4 templates x 12 topics, three deterministic
response styles, 12 held-out prompts), co-trained once with the tokens as plain text and once as
added special tokens. Reports the margin on the held-out prompts before and after, exact-match
accuracy of each mode on the training prompts, and the fallback (no token / a wrong token ->
positive).

Real (--real): records from SmolLM2's own answers (`self_distilled_records`: harmful -> refusal for
positive and rejective, own answer for negative; benign -> own answer for positive and negative,
refusal for rejective) on `--n-train` harmful + benign training prompts, a short full-model
co-training run (`--train-layers N` trains only the last N decoder layers and the final norm; text
tokens unless `--special-tokens`), then the margin on `--n-eval` harmful + benign test prompts before
and after and
the refusal rates per mode judged by the package's keyword judge (its accuracy on PyRIT's labels is
reported beside them). Writes benchmarks/results/bench_magic[_real].{json,md} and scatter PNGs.

Measured (--real defaults: 8 harmful + 8 benign training prompts -> 56 examples, 60 steps of 8, full
model, lr 2e-4, text tokens; 10 + 10 held-out test prompts): margin -0.062 -> 0.007 on the test
prompts (per mode after: positive -0.43, negative -0.35, rejective 0.80); harmful / benign refusal
rates after: positive 0.8 / 0.3, negative 0.1 / 0.0, rejective 1.0 / 1.0, no token 1.0 / 0.4.
With 30-40 steps the model only learned "refuse harmful" for every mode (margin unchanged).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python_tests"))
from common import environment, write_results  # noqa: E402

from upsafe_ext.magic import (MODES, MagicConfig, MagicTrainConfig, behaviour_rates, build_examples,  # noqa: E402
                              generate, prepare_model, safety_alignment_margin, self_distilled_records, train_magic)


def _acc(got, want) -> float:
    return sum(g == w for g, w in zip(got, want)) / max(1, len(want))


def run_synthetic(out_dir: str, steps: int) -> list[dict]:
    from magic_fixtures import STYLE, synthetic_records  # the task the tests check (one definition)

    from upsafe_ext.eval.generation import generate_chat
    from upsafe_ext.testing import tiny_causal_lm, tiny_tokenizer

    rows = []
    for special in (False, True):
        torch.manual_seed(0)
        tok = tiny_tokenizer()
        model = tiny_causal_lm("llama", hidden=64, layers=2, intermediate=128)
        # insecure_seed: the same (reproducible, guessable) tokens every run - benchmarks only
        cfg = MagicConfig(insecure_seed=3, token_length=8, special_tokens=special, no_token_fraction=0.5,
                          wrong_token_fraction=1.0)
        tokens = prepare_model(model, tok, cfg)
        train, held = synthetic_records(), synthetic_records(held_out=True)
        data = build_examples(train, tok, tokens, cfg, progress=False)
        held_prompts = [r.prompt for r in held]
        tag = "special" if special else "text"
        before = safety_alignment_margin(model, tok, held_prompts, progress=False,
                                         plot=os.path.join(out_dir, f"magic_synthetic_{tag}_before.png"))
        t0 = time.perf_counter()
        log = train_magic(model, tok, data, config=MagicTrainConfig(learning_rate=3e-3, max_steps=steps,
                                                                    batch_size=16, warmup_ratio=0.05))
        train_s = time.perf_counter() - t0
        after = safety_alignment_margin(model, tok, held_prompts, progress=False,
                                        plot=os.path.join(out_dir, f"magic_synthetic_{tag}_after.png"))
        prompts = [r.prompt for r in train]
        row = {"tokens": tag, "examples": len(data), "steps": steps, "train s": round(train_s, 1),
               "loss": f"{log[0]['loss']:.3f} -> {log[-1]['loss']:.4f}",
               "margin before": round(before.margin, 4), "margin after": round(after.margin, 4),
               "after per mode": " / ".join(f"{after.per_mode[m]:.3f}" for m in MODES)}
        for m in MODES:
            got = generate(model, tok, prompts, mode=m, max_new_tokens=32, progress=False)
            row[f"{m} acc"] = round(_acc(got, [STYLE[m, r.meta["harmful"]] for r in train]), 3)
        want = [STYLE["positive", r.meta["harmful"]] for r in train]
        plain = generate_chat(model, tok, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=32,
                              progress=False)
        rng = random.Random(1234)
        wrong = generate_chat(model, tok, [tokens.place(tok, [{"role": "user", "content": p}], tokens.wrong_token(rng))
                                           for p in prompts], max_new_tokens=32, progress=False)
        row["no-token -> positive"] = round(_acc(plain, want), 3)
        row["wrong-token -> positive"] = round(_acc(wrong, want), 3)
        rows.append(row)
        print(row, flush=True)
    return rows


def run_real(out_dir: str, args) -> list[dict]:
    from upsafe_ext.eval.judge import RefusalJudge, judge_accuracy
    from upsafe_ext.eval.prompts import benign_prompts, harmful_prompts
    from upsafe_ext.eval.real_model import load_smollm2

    torch.manual_seed(0)
    t_all = time.perf_counter()
    model, tok = load_smollm2()
    n_layers = model.config.num_hidden_layers
    judge = RefusalJudge()
    acc = judge_accuracy(judge)
    harm_tr, ben_tr = harmful_prompts("train")[: args.n_train], benign_prompts("train")[: args.n_train]
    harm_ev, ben_ev = harmful_prompts("test")[: args.n_eval], benign_prompts("test")[: args.n_eval]
    t0 = time.perf_counter()
    records = self_distilled_records(model, tok, harm_tr, ben_tr, max_new_tokens=args.answer_tokens,
                                     batch_size=16)
    distill_s = time.perf_counter() - t0
    # insecure_seed + token_length=16: the tokens of the measured runs in the docstring (reproducible,
    # guessable - never for a deployed model)
    cfg = MagicConfig(insecure_seed=7, token_length=16, no_token_fraction=0.25, wrong_token_fraction=0.25,
                      max_length=256, special_tokens=args.special_tokens)
    tokens = prepare_model(model, tok, cfg)
    data = build_examples(records, tok, tokens, cfg, progress=False)
    eval_prompts = harm_ev + ben_ev
    before = safety_alignment_margin(model, tok, eval_prompts, batch_size=8,
                                     plot=os.path.join(out_dir, "magic_smollm2_before.png"))
    train_prompts = [r.prompt for r in records]
    before_train = safety_alignment_margin(model, tok, train_prompts, batch_size=8, progress=False)
    rates_before = behaviour_rates(model, tok, harm_ev, ben_ev, judge=judge, max_new_tokens=args.eval_tokens,
                                   batch_size=16) if args.rates_before else None
    first = n_layers - args.train_layers
    pattern = None if not args.train_layers or args.train_layers >= n_layers else \
        r"(layers\.(" + "|".join(str(i) for i in range(first, n_layers)) + r")\.|^model\.norm\.)"
    tcfg = MagicTrainConfig(learning_rate=args.lr, max_steps=args.steps, batch_size=args.batch_size,
                            warmup_ratio=0.1, lr_schedule=args.schedule, trainable_pattern=pattern)
    t0 = time.perf_counter()
    log = train_magic(model, tok, data, tokens, tcfg)
    train_s = time.perf_counter() - t0
    after = safety_alignment_margin(model, tok, eval_prompts, batch_size=8,
                                    plot=os.path.join(out_dir, "magic_smollm2_after.png"))
    after_train = safety_alignment_margin(model, tok, train_prompts, batch_size=8, progress=False)
    rates = behaviour_rates(model, tok, harm_ev, ben_ev, judge=judge, max_new_tokens=args.eval_tokens,
                            batch_size=16, return_replies=True)
    rows = [{"what": f"margin ({len(eval_prompts)} test prompts)", "before": round(before.margin, 4),
             "after": round(after.margin, 4),
             "detail": "per mode after " + " / ".join(f"{m} {after.per_mode[m]:.3f}" for m in MODES)},
            {"what": f"margin ({len(train_prompts)} training prompts)", "before": round(before_train.margin, 4),
             "after": round(after_train.margin, 4),
             "detail": "per mode after " + " / ".join(f"{m} {after_train.per_mode[m]:.3f}" for m in MODES)}]
    for row, r in rates.items():
        b = rates_before[row] if rates_before else None
        rows.append({"what": f"{row}: harmful refused", "before": round(b["harmful_refusal"], 3) if b else "",
                     "after": round(r["harmful_refusal"], 3), "detail": f"n={r['n_harmful']}"})
        rows.append({"what": f"{row}: benign refused", "before": round(b["benign_refusal"], 3) if b else "",
                     "after": round(r["benign_refusal"], 3), "detail": f"n={r['n_benign']}"})
    rows.append({"what": "run", "before": "", "after": "",
                 "detail": (f"{len(records)} records -> {len(data)} examples; {args.steps} steps x {args.batch_size}, "
                            f"lr {args.lr} ({args.schedule}), {'special' if args.special_tokens else 'text'} tokens, "
                            f"trained: {'all' if pattern is None else f'last {args.train_layers} layers + norm'}, "
                            f"{torch.get_num_threads()} thread(s); "
                            f"loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}; distill {distill_s:.0f}s, "
                            f"train {train_s:.0f}s, total {time.perf_counter() - t_all:.0f}s; judge {judge.name} "
                            f"accuracy {acc['accuracy']:.3f} on {acc['n']} PyRIT-labelled replies")})
    for m in ("positive", "negative", "rejective", "no_token"):
        print(f"--- {m}: first harmful reply: {rates[m]['replies'][0][:160]!r}")
        print(f"--- {m}: first benign reply:  {rates[m]['replies'][len(harm_ev)][:160]!r}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct instead of the synthetic task")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (synthetic 200, real 60)")
    ap.add_argument("--n-train", type=int, default=8, help="real: harmful and benign training prompts each")
    ap.add_argument("--n-eval", type=int, default=10, help="real: harmful and benign test prompts each")
    ap.add_argument("--answer-tokens", type=int, default=16, help="real: length of the model's own answers")
    ap.add_argument("--eval-tokens", type=int, default=16, help="real: reply length for the refusal judge")
    ap.add_argument("--train-layers", type=int, default=0,
                    help="real: train only the last N decoder layers (0: the whole model)")
    ap.add_argument("--special-tokens", action="store_true", help="real: register the tokens as special tokens")
    ap.add_argument("--schedule", default="linear", choices=["linear", "constant"])
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rates-before", action="store_true", help="real: also refusal rates before training")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: on a shared 2-core machine 2 threads ran 3.5x slower, "
                         "16 s vs 55 s per SmolLM2 step of 8x100 tokens)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    env = environment("cpu")
    if args.real:
        args.steps = args.steps or 60
        rows = run_real(args.out, args)
        md = write_results("bench_magic_real", rows, ["what", "before", "after", "detail"], args.out, env,
                           "Magic-token co-training on SmolLM2-135M-Instruct (CPU, short run)")
    else:
        rows = run_synthetic(args.out, args.steps or 200)
        cols = ["tokens", "examples", "steps", "train s", "loss", "margin before", "margin after", "after per mode",
                "positive acc", "negative acc", "rejective acc", "no-token -> positive", "wrong-token -> positive"]
        md = write_results("bench_magic", rows, cols, args.out, env,
                           "Magic-token co-training, synthetic task (tiny Llama, held-out margin)")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
