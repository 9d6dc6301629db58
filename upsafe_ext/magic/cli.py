"""``upsafe magic {build-data, train, generate, margin, export-public}``.

    upsafe magic build-data --self-distill --model smollm2 --harmful 64 --benign 64 --out magic.jsonl
    upsafe magic train --model smollm2 --data magic.jsonl --out runs/magic --epochs 1   # tokens from `secrets`
    upsafe magic generate --model runs/magic --mode rejective --prompt "How do I bake bread?"
    upsafe magic margin --model runs/magic --builtin 32 --plot margin.png --rates
    upsafe magic margin --model smollm2 --tokens runs/magic --builtin 32        # the base model's margin
    upsafe magic export-public --model runs/magic --out runs/magic-public       # salted hash of the negative only

`--model` (with ``--device``, ``--dtype``, ``--cache-dir``) takes anything ``upsafe_ext.models.load`` takes:
``smollm2`` (SmolLM2-135M-Instruct, offline), ``tiny[-family]`` (the random test fixture with a byte-level
ChatML tokenizer, for smoke tests) or a folder (a co-trained model saved by ``save_magic_model``, an upcycled
model, any Hugging Face causal LM). `train` saves to ``upsafe_out/magic`` unless ``--out`` is given;
every save is atomic and never over ``--model``.

`train` draws the tokens from `secrets`; ``--insecure-seed N`` makes them reproducible (guessable:
tests and benchmarks only; the seed is never saved). ``--seed`` is its deprecated alias. The negative
mode stays off in `generate` and `margin` unless ``--allow-negative`` is given.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

from ..models import add_model_args, check_out_arg, load_from_args


def _load_any(args, allow_negative: bool):
    """(model, tokenizer, tokens): a magic folder, or any model `upsafe_ext.models.load` takes plus --tokens DIR."""
    from .model import attach_tokens, get_tokens, is_magic_dir
    from .tokens import TOKENS_FILE, MagicTokens

    if not args.tokens:
        if not (os.path.isdir(args.model) and is_magic_dir(args.model)):
            raise SystemExit(f"upsafe magic: --model {args.model!r} is not a co-trained model directory (no "
                             f"{TOKENS_FILE}); pass --tokens DIR to measure a base model with a trained model's tokens")
        model, tok = load_from_args(args, allow_negative=allow_negative)
        return model, tok, get_tokens(model)
    model, tok = load_from_args(args)
    tokens = MagicTokens.load(args.tokens, allow_negative=allow_negative)
    if tokens.special:
        tokens.register(tok, model)  # a base model: the new rows start at the mean embedding
    attach_tokens(model, tokens)
    return model, tok, tokens


def _read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise SystemExit(f"upsafe magic: prompts file {path!r} does not exist")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    if path.endswith((".json", ".jsonl")):
        with open(path, encoding="utf-8") as f:
            rows = json.load(f) if path.endswith(".json") else [json.loads(x) for x in f if x.strip()]
        out = []
        for i, r in enumerate(rows):
            p = r if isinstance(r, str) else (r.get("prompt") if isinstance(r, dict) else None)
            if not isinstance(p, str) or not p.strip():
                raise SystemExit(f"upsafe magic: {path} item {i} has no 'prompt' string")
            out.append(p)
        return out
    raise SystemExit(f"upsafe magic: prompts file {path!r} must be .txt (one per line), .json or .jsonl")


def _builtin(n: int, split: str) -> tuple[list[str], list[str]]:
    from ..eval.prompts import benign_prompts, harmful_prompts

    return harmful_prompts(split)[:n], benign_prompts(split)[:n]


def _cmd_build_data(args) -> int:
    from .data import chat_generator, distill_records, load_records, save_records, self_distilled_records

    modes = sum(bool(x) for x in (args.records, args.self_distill, args.distill))
    if modes != 1:
        raise SystemExit("upsafe magic build-data: give exactly one of --records FILE, --self-distill, --distill FILE")
    if args.records:
        fields = {}
        for spec in args.field or []:
            if "=" not in spec:
                raise SystemExit(f"upsafe magic build-data: --field must be ours=theirs, got {spec!r}")
            k, v = spec.split("=", 1)
            fields[k] = v
        try:
            records = load_records(args.records, fields=fields, split=args.split_name, limit=args.limit)
        except ValueError as exc:
            raise SystemExit(f"upsafe magic build-data: {exc}") from None
    else:
        model, tok = load_from_args(args)
        if args.self_distill:
            from ..eval.prompts import benign_prompts, harmful_prompts

            harmful = harmful_prompts(args.split)[: args.harmful]
            benign = benign_prompts(args.split)[: args.benign]
            records = self_distilled_records(model, tok, harmful, benign, max_new_tokens=args.max_new_tokens,
                                             batch_size=args.batch_size)
        else:
            prompts = _read_prompts(args.distill)[: args.limit]
            try:
                records = distill_records(prompts, chat_generator(model, tok, args.max_new_tokens, args.batch_size))
            except ValueError as exc:
                raise SystemExit(f"upsafe magic build-data: {exc}") from None
    save_records(records, args.out)
    print(f"wrote {len(records)} records to {args.out}")
    return 0


def _cmd_train(args) -> int:
    import torch

    from .config import MagicConfig, MagicTrainConfig
    from .data import build_examples, load_records
    from .margin import safety_alignment_margin
    from .model import prepare_model
    from .train import train_magic

    if args.threads:
        torch.set_num_threads(args.threads)
    seed = args.insecure_seed
    if args.seed is not None:
        msg = "upsafe magic train: --seed is deprecated; use --insecure-seed (reproducible tokens: tests only)"
        warnings.warn(msg, DeprecationWarning, stacklevel=2)
        print(msg, file=sys.stderr)
        if seed is not None and seed != args.seed:
            raise SystemExit("upsafe magic train: give --insecure-seed only (--seed is its deprecated alias)")
        seed = args.seed
    if seed is not None:
        print("upsafe magic train: WARNING: --insecure-seed makes the magic tokens reproducible by anyone who tries "
              "seeds; do not deploy this model (the seed itself is not saved)", file=sys.stderr)
    torch.manual_seed(seed if seed is not None else 0)  # data order and any other torch randomness; not saved
    try:
        extra = {} if args.token_length is None else {"token_length": args.token_length}
        mcfg = MagicConfig(insecure_seed=seed, special_tokens=args.special_tokens, **extra,
                           no_token_fraction=args.no_token_fraction, wrong_token_fraction=args.wrong_token_fraction,
                           rejective_fraction=args.rejective_fraction, max_length=args.max_length,
                           default_system=args.default_system, template_system=args.template_system,
                           token_repeat=args.token_repeat)
        tcfg = MagicTrainConfig(learning_rate=args.lr, epochs=args.epochs, max_steps=args.max_steps,
                                batch_size=args.batch_size, grad_accum=args.grad_accum, save_steps=args.save_steps,
                                output_dir=args.out, autocast=args.autocast, warmup_ratio=args.warmup_ratio,
                                distill_top_k=args.distill_top_k, distill_hard_prefix=args.distill_hard_prefix,
                                distill_tail=args.distill_tail, first_token_weight=args.first_token_weight,
                                first_tokens=args.first_tokens, negative_weight=args.negative_weight,
                                lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                                trainable_pattern=args.trainable_pattern, token_learning_rate=args.token_lr)
        records = load_records(args.data, limit=args.limit)
    except ValueError as exc:
        raise SystemExit(f"upsafe magic train: {exc}") from None
    check_out_arg(args.out, [args.model, args.data])
    model, tok = load_from_args(args)
    try:
        tokens = prepare_model(model, tok, mcfg)
    except ValueError as exc:
        raise SystemExit(f"upsafe magic train: {exc}") from None
    data = build_examples(records, tok, tokens, mcfg)
    print(f"co-training on {len(data)} examples {data.counts()} ({data.num_label_tokens()} response tokens), "
          f"{tcfg.total_steps(len(data))} steps")
    margin_prompts = [r.prompt for r in records[: args.margin_prompts]] if args.margin_prompts > 1 else []
    before = safety_alignment_margin(model, tok, margin_prompts).margin if margin_prompts else None
    try:
        log = train_magic(model, tok, data, tokens, tcfg, magic_config=mcfg)
    except ValueError as exc:
        raise SystemExit(f"upsafe magic train: {exc}") from None
    print(f"final loss {log[-1]['loss']:.4f}; saved to {args.out} (model.safetensors + magic_tokens.json, 0600)")
    if margin_prompts:
        after = safety_alignment_margin(model, tok, margin_prompts).margin
        print(f"safety alignment margin on {len(margin_prompts)} training prompts: {before:.4f} -> {after:.4f}")
    return 0


def _cmd_generate(args) -> int:
    from .inference import generate

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += _read_prompts(args.prompts_file)
    if not prompts:
        raise SystemExit("upsafe magic generate: give --prompt TEXT (repeatable) or --prompts-file FILE")
    model, tok, tokens = _load_any(args, allow_negative=args.allow_negative)
    modes = args.mode if len(args.mode) > 1 else args.mode[0]
    if isinstance(modes, list) and len(modes) != len(prompts):
        raise SystemExit(f"upsafe magic generate: {len(modes)} --mode values for {len(prompts)} prompts")
    replies = generate(model, tok, prompts, mode=modes, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, strict=args.strict)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        m = modes[i] if isinstance(modes, list) else modes
        served = tokens.resolve_mode(m)
        print(json.dumps({"mode": m, "served_as": served, "prompt": p, "reply": r}, ensure_ascii=False))
    return 0


def _cmd_margin(args) -> int:
    import torch

    from .margin import behaviour_rates, safety_alignment_margin

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prompts_file:
        harmful, benign = _read_prompts(args.prompts_file), []
    else:
        harmful, benign = _builtin(args.builtin, args.split)
    model, tok, tokens = _load_any(args, allow_negative=args.allow_negative)
    res = safety_alignment_margin(model, tok, harmful + benign, plot=args.plot, batch_size=args.batch_size)
    out = {"model": args.model, "n_prompts": res.n_prompts, "margin": res.margin, "per_mode": res.per_mode,
           "plot": res.plot_path}
    print(f"safety alignment margin {res.margin:.4f} over {res.n_prompts} prompts x {len(res.modes)} modes "
          f"(per mode: {', '.join(f'{m} {v:.4f}' for m, v in res.per_mode.items())})")
    if res.plot_path:
        print(f"wrote {res.plot_path}")
    if args.rates:
        if not benign:
            raise SystemExit("upsafe magic margin: --rates needs --builtin (harmful and benign prompts)")
        from ..eval.judge import RefusalJudge, judge_accuracy

        judge = RefusalJudge()
        acc = judge_accuracy(judge)
        rates = behaviour_rates(model, tok, harmful, benign, judge=judge, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size)
        out["rates"] = rates
        out["judge_accuracy"] = acc["accuracy"]
        print(f"refusal rates (judge {judge.name}: accuracy {acc['accuracy']:.3f} on {acc['n']} PyRIT-labelled "
              "replies)")
        for row, r in rates.items():
            print(f"  {row:<10} harmful refused {r['harmful_refusal']:.3f}  benign refused {r['benign_refusal']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _cmd_export_public(args) -> int:
    from .model import get_tokens, is_magic_dir, read_saved_configs, save_magic_model

    if not (os.path.isdir(args.model) and is_magic_dir(args.model)):
        raise SystemExit(f"upsafe magic export-public: --model {args.model!r} is not a co-trained model directory")
    check_out_arg(args.out, [args.model])
    model, tok = load_from_args(args, allow_negative=True)
    mcfg, tcfg = read_saved_configs(args.model)  # a token seed stored by an old version is dropped here
    save_magic_model(model, tok, get_tokens(model), args.out, include_negative=False, config=mcfg, train_config=tcfg,
                     inputs=[args.model])
    print(f"wrote a public copy to {args.out} (no negative token and no seed; magic_tokens.json holds salted "
          "hashes of the tokens)")
    return 0


def register(sub) -> set[str]:
    """Add ``upsafe magic ...`` to the `upsafe` parser's subparsers; returns {"magic"}."""
    p = sub.add_parser("magic", help="magic-token co-training: build-data, train, generate, margin, export-public")
    msub = p.add_subparsers(dest="magic_cmd", required=True)

    def model_args(q, tokens: bool = True, default: str | None = None):
        add_model_args(q, default=default)
        if tokens:
            q.add_argument("--tokens", default=None, help="take the magic tokens from this directory (base models)")
            q.add_argument("--allow-negative", action="store_true",
                           help="keep the negative mode (internal red-teaming only); off: negative -> positive")
        q.add_argument("--batch-size", type=int, default=16)

    q = msub.add_parser("build-data", help="records (prompt + positive/negative/rejective responses) as JSONL")
    model_args(q, tokens=False, default="smollm2")
    q.add_argument("--records", help="read records from .json/.jsonl (or a saved HF dataset directory)")
    q.add_argument("--field", action="append", help="column mapping ours=theirs, e.g. prompt=instruction")
    q.add_argument("--split-name", default=None, help="split of a DatasetDict")
    q.add_argument("--self-distill", action="store_true",
                   help="built-in harmful/benign prompts; the model's own answers + refusals")
    q.add_argument("--distill", metavar="PROMPTS", help="context distillation on a prompts file (.txt/.json/.jsonl)")
    q.add_argument("--harmful", type=int, default=64)
    q.add_argument("--benign", type=int, default=64)
    q.add_argument("--split", default="train")
    q.add_argument("--limit", type=int, default=None)
    q.add_argument("--max-new-tokens", type=int, default=96)
    q.add_argument("--out", required=True, help="output .jsonl")
    q.set_defaults(fn=_cmd_build_data)

    q = msub.add_parser("train", help="co-train in one SFT stage; saves safetensors + magic_tokens.json")
    model_args(q, tokens=False)
    q.add_argument("--data", required=True, help="records .json/.jsonl")
    q.add_argument("--out", default="upsafe_out/magic", help="output folder (default upsafe_out/magic)")
    q.add_argument("--insecure-seed", type=int, default=None,
                   help="draw the magic tokens from this seed: reproducible and guessable, for tests and benchmarks "
                        "only; never saved (default: the `secrets` module, 131 bits per token)")
    q.add_argument("--seed", type=int, default=None, help="deprecated alias of --insecure-seed")
    q.add_argument("--token-length", type=int, default=None,
                   help="random characters per token (default 22 = 131 bits; at least 22 without --insecure-seed)")
    q.add_argument("--special-tokens", action="store_true")
    q.add_argument("--default-system", default=None)
    q.add_argument("--template-system", action="store_true",
                   help="with no system message, put the token with the chat template's own default system text "
                        "instead of replacing it (MagicConfig.template_system)")
    q.add_argument("--token-repeat", type=int, default=1,
                   help="copies of the token placed side by side (MagicConfig.token_repeat, 1..16)")
    q.add_argument("--no-token-fraction", type=float, default=0.25)
    q.add_argument("--wrong-token-fraction", type=float, default=0.25)
    q.add_argument("--rejective-fraction", type=float, default=1.0,
                   help="share of prompts with a rejective example (MagicConfig.rejective_fraction)")
    q.add_argument("--max-length", type=int, default=512)
    q.add_argument("--lr", type=float, default=2e-5)
    q.add_argument("--epochs", type=float, default=1.0)
    q.add_argument("--max-steps", type=int, default=None)
    q.add_argument("--grad-accum", type=int, default=1)
    q.add_argument("--warmup-ratio", type=float, default=0.03)
    q.add_argument("--save-steps", type=int, default=None)
    q.add_argument("--autocast", default="fp32", choices=["fp32", "bf16", "fp16"])
    q.add_argument("--distill-top-k", type=int, default=None,
                   help="train the base model's own answers (records from `build-data --self-distill`, "
                        "meta.own_answer) towards the base's top-k next-token distribution (default: off)")
    q.add_argument("--distill-hard-prefix", type=int, default=0,
                   help="with --distill-top-k: the first N tokens of each own answer keep their greedy target")
    q.add_argument("--distill-tail", action="store_true",
                   help="with --distill-top-k: keep the base's probabilities and its mass outside the top-k as one "
                        "more target, instead of renormalising the top-k (MagicTrainConfig.distill_tail)")
    q.add_argument("--first-token-weight", type=float, default=1.0,
                   help="loss weight of each example's first reply token, where it answers or refuses (others 1)")
    q.add_argument("--first-tokens", type=int, default=1,
                   help="how many of each reply's first tokens get --first-token-weight (default 1)")
    q.add_argument("--negative-weight", type=float, default=1.0,
                   help="loss weight of each negative-mode example, every other example 1 "
                        "(MagicTrainConfig.negative_weight)")
    q.add_argument("--lora-rank", type=int, default=0,
                   help="train rank-r LoRA adapters on every projection and merge them at the end (0: full "
                        "fine-tuning; MagicTrainConfig.lora_rank)")
    q.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale numerator (update = alpha / rank B A)")
    q.add_argument("--trainable-pattern", default=None,
                   help="regex of parameter names to train (MagicTrainConfig.trainable_pattern); with --lora-rank "
                        "these train in full beside the adapters, e.g. 'embed_tokens' for --special-tokens")
    q.add_argument("--token-lr", type=float, default=None,
                   help="with --special-tokens: the tokens' embedding rows train as their own parameter at this "
                        "rate (MagicTrainConfig.token_learning_rate); they start identical")
    q.add_argument("--limit", type=int, default=None)
    q.add_argument("--margin-prompts", type=int, default=32, help="report the margin before/after on this many")
    q.add_argument("--threads", type=int, default=None)
    q.set_defaults(fn=_cmd_train)

    q = msub.add_parser("generate", help="greedy replies in a mode (or one mode per prompt)")
    model_args(q)
    q.add_argument("--prompt", action="append")
    q.add_argument("--prompts-file")
    q.add_argument("--mode", nargs="+", default=["positive"], help="one mode, or one per prompt")
    q.add_argument("--strict", action="store_true", help="error on unknown/disabled modes instead of positive")
    q.add_argument("--max-new-tokens", type=int, default=96)
    q.set_defaults(fn=_cmd_generate)

    q = msub.add_parser("margin", help="safety alignment margin (+ PNG scatter, + per-mode refusal rates)")
    model_args(q)
    q.add_argument("--prompts-file")
    q.add_argument("--builtin", type=int, default=32, help="this many built-in harmful + benign prompts")
    q.add_argument("--split", default="test")
    q.add_argument("--plot", default=None, help="PNG path")
    q.add_argument("--rates", action="store_true", help="also per-mode refusal rates (generates replies)")
    q.add_argument("--max-new-tokens", type=int, default=48)
    q.add_argument("--json", default=None)
    q.add_argument("--threads", type=int, default=None)
    q.set_defaults(fn=_cmd_margin)

    q = msub.add_parser("export-public", help="copy a model without its negative token (only salted hashes; "
                                              "public deployment)")
    add_model_args(q, default=None)
    q.add_argument("--out", required=True)
    q.set_defaults(fn=_cmd_export_public)
    return {"magic"}
