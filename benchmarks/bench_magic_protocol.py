"""Magic-token co-training on SmolLM2-135M-Instruct at real scale, measured with the source-disjoint protocol.

    python benchmarks/bench_magic_protocol.py --split val     # choices (lr, epochs): read val only
    python benchmarks/bench_magic_protocol.py --split test    # the reported numbers: test read once
    python benchmarks/bench_magic_protocol.py --split test --eval-only OUT/model --epochs 2 ...  # the same, on a
                                                              # val run's saved model (same flags; no training)
    python benchmarks/bench_magic_protocol.py --split val --eval-only OUT/model --n-eval 80 --rows positive \
        --out OUT2 ...                                        # every kept val prompt, one row (n=24 saturates)

Training prompts: `eval.protocol.training_mix` (AdvBench + rho harmful, both styles; ShareGPT + rho
benign, both styles; train-template rewrites on both sides). Targets without a hub model
(`magic.self_distilled_records`): positive = refusal for harmful, the base model's own answer for
benign; negative = the base model's own answer; rejective = a refusal for every prompt; plus the
no-token and wrong-token fallback examples (positive). One SFT stage (`magic.train_magic`), full model;
with ``--distill-top-k K`` the base's own answers are trained towards the base's top-K next-token
distribution instead of its greedy tokens (`magic.distill`).

Evaluation (`eval.protocol.protocol_sets(split)`, sources never trained on, both styles, held-out
rephrasing templates; greedy; keyword judge; 95% Wilson intervals) once per mode: positive, negative,
rejective, no token, an unknown token of the same shape. The safety alignment margin (cosine
silhouette of first-token logits) on held-out benign + harmful prompts, before and after, with the
scatter PNG; KL(base || positive mode) per response token on held-out benign prompts and the base
model's own answers (`mean_kl(..., reference_conversations=)`: each model on its own rendering).
After each epoch the model is evaluated on `--split` (epoch choice on val). Every epoch starts a fresh
optimizer (constant rate, warm-up in epoch 1 only, shuffling seed = epoch), so `--resume DIR
--first-epoch N` continues a run from the model it saved after epoch N-1 (DIR = its `--out`/model)
as if it had not stopped (the base model's answers are regenerated: greedy, the same). `--epoch-lr`
sets the rate per epoch (e.g. a lower second epoch); OUT/model is the last epoch's model and
OUT/model_ep<N> keeps each earlier one (for `--eval-only` or `--resume`). Writes
benchmarks/results/magic_protocol_<split>.{json,md} and magic_margin_<split>_{before,after}.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import environment  # noqa: E402

from upsafe_ext.eval.generation import chat, generate_chat  # noqa: E402
from upsafe_ext.eval.metrics import mean_kl  # noqa: E402
from upsafe_ext.eval.protocol import evaluate_sets, format_sets_table, protocol_sets, training_mix  # noqa: E402
from upsafe_ext.eval.real_model import load_smollm2  # noqa: E402
from upsafe_ext.magic import (MagicConfig, MagicTrainConfig, build_examples, load_magic_model,  # noqa: E402
                              magic_conversations, prepare_model, safety_alignment_margin, save_magic_model,
                              self_distilled_records, train_magic)

SETS = ("harmful imperative", "harmful question", "harmful question (natural)", "harmful past tense",
        "harmful role-play", "harmful suffix", "benign imperative", "benign question", "edgy benign")
ROWS = ("positive", "negative", "rejective", "no token", "unknown token")


def render(tok, tokens, row: str, rng_seed: int = 1):
    """prompts -> conversations for one evaluation row (a mode, no token, or an unknown token)."""
    def fn(prompts):
        if row in ("positive", "negative", "rejective"):
            return magic_conversations(tok, prompts, row, tokens=tokens, strict=True)[0]
        if row == "no token":
            return [tokens.place(tok, [{"role": "user", "content": p}], None) for p in prompts]
        rng = random.Random(rng_seed)
        return [tokens.place(tok, [{"role": "user", "content": p}], tokens.wrong_token(rng)) for p in prompts]
    return fn


def evaluate(model, tok, tokens, sets, args) -> dict:
    out = {}
    for row in dict.fromkeys(args.rows):  # in the order given, each once
        rows = evaluate_sets(model, tok, sets, conversations=render(tok, tokens, row),
                             max_new_tokens=args.eval_tokens, batch_size=32, progress=False)
        out[row] = rows
        print(f"  {row}: " + " | ".join(f"{r['name']} {r['rate']:.2f}" for r in rows), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", choices=["val", "test"], default="val")
    ap.add_argument("--n-harmful", type=int, default=256)
    ap.add_argument("--n-benign", type=int, default=256)
    ap.add_argument("--answer-tokens", type=int, default=48, help="length of the base model's own answers")
    ap.add_argument("--eval-tokens", type=int, default=32)
    ap.add_argument("--n-eval", type=int, default=32, help="prompts per evaluation set")
    ap.add_argument("--n-margin", type=int, default=32, help="held-out harmful and benign prompts for the margin")
    ap.add_argument("--epochs", type=int, default=2, help="evaluated after each epoch")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--epoch-lr", type=float, nargs="+", default=None, metavar="LR",
                    help="the model's learning rate for each epoch of this run, in order (one per --epochs; "
                         "default --lr for every epoch); --token-lr is kept for all")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--special-tokens", action="store_true")
    ap.add_argument("--template-system", action="store_true", help="MagicConfig.template_system")
    ap.add_argument("--token-repeat", type=int, default=1, help="MagicConfig.token_repeat")
    ap.add_argument("--placement", default="system_prefix", help="MagicConfig.placement")
    ap.add_argument("--rejective-fraction", type=float, default=1.0, help="MagicConfig.rejective_fraction")
    ap.add_argument("--distill-top-k", type=int, default=None, help="MagicTrainConfig.distill_top_k (None: off)")
    ap.add_argument("--distill-hard-prefix", type=int, default=0, help="MagicTrainConfig.distill_hard_prefix")
    ap.add_argument("--distill-tail", action="store_true", help="MagicTrainConfig.distill_tail")
    ap.add_argument("--first-token-weight", type=float, default=1.0, help="MagicTrainConfig.first_token_weight")
    ap.add_argument("--first-tokens", type=int, default=1, help="MagicTrainConfig.first_tokens")
    ap.add_argument("--negative-weight", type=float, default=1.0, help="MagicTrainConfig.negative_weight")
    ap.add_argument("--lora-rank", type=int, default=0, help="MagicTrainConfig.lora_rank (0: full fine-tuning)")
    ap.add_argument("--lora-alpha", type=float, default=32.0, help="MagicTrainConfig.lora_alpha")
    ap.add_argument("--trainable-pattern", default=None, help="MagicTrainConfig.trainable_pattern")
    ap.add_argument("--token-lr", type=float, default=None, help="MagicTrainConfig.token_learning_rate")
    ap.add_argument("--resume", default=None, help="continue from this saved model (a run's OUT/model)")
    ap.add_argument("--first-epoch", type=int, default=1, help="with --resume: the epoch it starts at")
    ap.add_argument("--eval-only", default=None,
                    help="evaluate this saved model (a run's OUT/model, trained for --epochs) on --split without "
                         "training: a val choice read on test once (a run's training does not depend on --split)")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), metavar="ROW",
                    help=f"evaluation rows (default all: {', '.join(ROWS)}); e.g. `--rows positive` with a larger "
                         "--n-eval to compare saved models on val where n=24 saturates")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if (args.resume is None) != (args.first_epoch == 1):
        ap.error("--resume DIR and --first-epoch N (> 1) go together")
    if args.epoch_lr is not None and len(args.epoch_lr) != args.epochs:
        ap.error(f"--epoch-lr gives {len(args.epoch_lr)} rates for --epochs {args.epochs}: give one per epoch")
    if args.eval_only and args.resume:
        ap.error("--eval-only DIR evaluates a saved model; it does not train, so it takes no --resume")
    if args.eval_only and os.path.abspath(args.out) == os.path.dirname(os.path.abspath(args.eval_only)):
        ap.error(f"--out {args.out!r} is the folder of the run that saved --eval-only {args.eval_only!r}: its "
                 "records would be overwritten; give --eval-only its own --out")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    model, tok = load_smollm2(verbose=False)
    model.eval()
    base = copy.deepcopy(model)
    h_tr, b_tr = training_mix(args.n_harmful, args.n_benign)
    sets = [s for s in protocol_sets(args.split, n=args.n_eval, n_benign=args.n_eval) if s.name in SETS]
    held = protocol_sets(args.split, n=args.n_margin, n_benign=args.n_margin)
    by = {s.name: s for s in held}
    margin_prompts = by["harmful imperative"].prompts[: args.n_margin // 2] + \
        by["harmful question"].prompts[: args.n_margin // 2] + \
        by["benign imperative"].prompts[: args.n_margin // 2] + by["benign question"].prompts[: args.n_margin // 2]
    kl_prompts = by["benign imperative"].prompts[:16] + by["benign question"].prompts[:16]
    kl_answers = generate_chat(base, tok, [chat(p) for p in kl_prompts], max_new_tokens=args.answer_tokens,
                               batch_size=32, progress=False)

    def report(model, tok, tokens, ep, extra: dict) -> None:
        """Margin, KL and every mode on `--split` for the model as it is after epoch `ep`; writes the
        json (all epochs so far) and the markdown (this epoch)."""
        after = safety_alignment_margin(model, tok, margin_prompts, tokens=tokens, progress=False,
                                        plot=os.path.join(args.out, f"magic_margin_{args.split}_after_ep{ep}.png"))
        kl = mean_kl(model, base, tok, render(tok, tokens, "positive")(kl_prompts), kl_answers, progress=False,
                     reference_conversations=[chat(p) for p in kl_prompts])
        print(f"epoch {ep}: margin {after.margin:.3f}, KL {kl:.4f}", flush=True)
        rows = evaluate(model, tok, tokens, sets, args)
        result["epochs"].append({"epoch": ep, **extra, "margin": after.to_dict(), "kl_positive_vs_base": kl,
                                 "rows": {k: [{x: r[x] for x in r if x != "replies"} for r in v]
                                          for k, v in rows.items()},
                                 "replies": {k: [r["replies"] for r in v] for k, v in rows.items()}})
        md = format_sets_table({k: v for k, v in rows.items()})
        with open(os.path.join(args.out, f"magic_protocol_{args.split}.md"), "w") as f:
            f.write(f"# Magic co-training, SmolLM2-135M-Instruct (Q4_1 GGUF dequantised), {args.split} split, "
                    f"epoch {ep}\n\nmargin {before.margin:.3f} -> {after.margin:.3f} (n={len(margin_prompts)} "
                    f"held-out prompts); KL(base || positive) {kl:.4f} nats/token (n={len(kl_prompts)})\n\n"
                    f"{md}\n")
        with open(os.path.join(args.out, f"magic_protocol_{args.split}.json"), "w") as f:
            json.dump(result, f, indent=1)

    mcfg = MagicConfig(special_tokens=args.special_tokens, rejective_fraction=args.rejective_fraction,
                       template_system=args.template_system, insecure_seed=1234, token_repeat=args.token_repeat,
                       placement=args.placement)
    if args.eval_only:  # the untrained baseline (fresh tokens), then the saved model
        before = safety_alignment_margin(model, tok, margin_prompts, tokens=prepare_model(model, tok, mcfg),
                                         progress=False,
                                         plot=os.path.join(args.out, f"magic_margin_{args.split}_before.png"))
        result = {"args": vars(args), "env": environment("cpu"), "margin_before": before.to_dict(), "epochs": []}
        model, tok, tokens = load_magic_model(args.eval_only, allow_negative=True)
        print(f"margin before: {before.margin:.3f}; evaluating {args.eval_only} (trained for {args.epochs} epochs)",
              flush=True)
        report(model, tok, tokens, args.epochs, {"model": os.path.abspath(args.eval_only)})
        print(f"total {time.time() - t0:.0f} s", flush=True)
        return 0
    records = self_distilled_records(model, tok, h_tr, b_tr, max_new_tokens=args.answer_tokens, batch_size=32,
                                     progress=False)
    t_data = time.time() - t0
    tokens = prepare_model(model, tok, mcfg)
    before = safety_alignment_margin(model, tok, margin_prompts, tokens=tokens, progress=False,
                                     plot=os.path.join(args.out, f"magic_margin_{args.split}_before.png"))
    print(f"margin before: {before.margin:.3f}", flush=True)
    if args.resume:  # the saved model, its tokenizer and tokens (the same insecure seed)
        model, tok, tokens = load_magic_model(args.resume, allow_negative=True)
        print(f"resumed from {args.resume} at epoch {args.first_epoch}", flush=True)
    data = build_examples(records, tok, tokens, mcfg, progress=False)
    print(f"data: {len(h_tr)} harmful + {len(b_tr)} benign prompts -> {len(data)} examples "
          f"({t_data:.0f} s)", flush=True)
    result = {"args": vars(args), "env": environment("cpu"), "n_examples": len(data), "counts": data.counts(),
              "margin_before": before.to_dict(), "epochs": []}
    train_s = 0.0
    for ep in range(args.first_epoch, args.first_epoch + args.epochs):
        t1 = time.time()
        lr = args.lr if args.epoch_lr is None else args.epoch_lr[ep - args.first_epoch]
        cfg = MagicTrainConfig(learning_rate=lr, epochs=1.0, batch_size=args.batch_size,
                               lr_schedule="constant", warmup_ratio=0.03 if ep == 1 else 0.0, seed=ep,
                               distill_top_k=args.distill_top_k, distill_hard_prefix=args.distill_hard_prefix,
                               distill_tail=args.distill_tail, first_token_weight=args.first_token_weight,
                               first_tokens=args.first_tokens, negative_weight=args.negative_weight,
                               lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                               trainable_pattern=args.trainable_pattern, token_learning_rate=args.token_lr)
        log = train_magic(model, tok, data, tokens, cfg, magic_config=mcfg, teacher=base, progress=False)
        train_s += time.time() - t1
        print(f"epoch {ep}: {len(log)} steps, loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}, "
              f"train {train_s:.0f} s", flush=True)
        saved = save_magic_model(model, tok, tokens, os.path.join(args.out, "model"), config=mcfg, train_config=cfg)
        if ep < args.first_epoch + args.epochs - 1:  # kept, so an earlier epoch can be chosen or resumed
            save_magic_model(model, tok, tokens, os.path.join(args.out, f"model_ep{ep}"), config=mcfg,
                             train_config=cfg)
        print(f"epoch {ep}: model saved to {saved} (evaluated next)", flush=True)  # kept if the evaluation fails
        report(model, tok, tokens, ep, {"steps": len(log), "lr": lr, "loss_last": log[-1]["loss"],
                                        "train_s": train_s})
    print(f"total {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
