"""Where KL(base || positive mode) comes from: the base's top-k tokens or the rest of the vocabulary.

    python benchmarks/magic_kl_tail.py --model OUT/model             # a co-trained model (bench_magic_protocol)
    python benchmarks/magic_kl_tail.py --model untrained [--template-system]   # SmolLM2 + fresh special tokens

The same prompts and answers as `bench_magic_protocol.py`'s KL (val: 16 ShareGPT imperatives + 16
questions, the base model's own 48-token greedy answers; `--prompts train`: the first 32 benign
prompts of its training mix), the positive-mode rendering against the base on the plain chat. Per
response token, KL over the whole vocabulary is split into the base's top-k tokens and the rest;
also the base's and the model's mass outside the top-k, and the first response token's KL. Appends
one JSON line to `--out`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_magic_protocol import render  # noqa: E402
from common import environment  # noqa: E402

from upsafe_ext.eval.generation import chat, generate_chat  # noqa: E402
from upsafe_ext.eval.metrics import token_kl  # noqa: E402
from upsafe_ext.eval.protocol import protocol_sets, training_mix  # noqa: E402
from upsafe_ext.eval.real_model import load_smollm2  # noqa: E402
from upsafe_ext.magic import MagicConfig, load_magic_model, prepare_model  # noqa: E402
from upsafe_ext.train.sft import IGNORE_INDEX, encode_sft  # noqa: E402


@torch.no_grad()
def response_logp(model, tok, conversation, answer) -> torch.Tensor:
    """Log-probabilities [n_response, V] predicting each response token (end of turn included)."""
    e = encode_sft(tok, conversation, answer)
    pos = [t - 1 for t, y in enumerate(e["labels"]) if y != IGNORE_INDEX]
    return torch.log_softmax(model(input_ids=torch.tensor([e["input_ids"]])).logits[0, pos].float(), -1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a saved magic model folder, or 'untrained'")
    ap.add_argument("--template-system", action="store_true", help="untrained: MagicConfig.template_system")
    ap.add_argument("--prompts", choices=["val", "train"], default="val")
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "magic_kl_tail.jsonl"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tok0 = load_smollm2(verbose=False)
    base.eval()
    if args.model == "untrained":
        model, tok = copy.deepcopy(base), tok0
        tokens = prepare_model(model, tok, MagicConfig(special_tokens=True, template_system=args.template_system,
                                                       insecure_seed=1234))
    else:
        model, tok, tokens = load_magic_model(args.model, allow_negative=True)
    model.eval()
    if args.prompts == "train":
        prompts = training_mix(192, 384)[1][:32]
    else:
        by = {s.name: s for s in protocol_sets("val", n=32, n_benign=32)}
        prompts = by["benign imperative"].prompts[:16] + by["benign question"].prompts[:16]
    answers = generate_chat(base, tok0, [chat(p) for p in prompts], max_new_tokens=48, batch_size=32, progress=False)
    parts = {"kl": [], "kl_top": [], "tail_base": [], "tail_model": []}
    first = []
    for conv, p, a in zip(render(tok, tokens, "positive")(prompts), prompts, answers):
        lb = response_logp(base, tok0, chat(p), a)
        lm_all = response_logp(model, tok, conv, a)
        lm = lm_all[:, : lb.shape[-1]]  # the base's ids (the mass on added tokens counts as lost, as in token_kl)
        pb = lb.exp()
        top = torch.zeros_like(lb, dtype=torch.bool).scatter_(-1, lb.topk(args.top_k, -1).indices, True)
        kl = token_kl(lb, lm_all)  # the same KL as mean_kl; its parts below
        parts["kl"].append(kl)
        parts["kl_top"].append((pb * (lb - lm) * top).sum(-1))
        parts["tail_base"].append((pb * ~top).sum(-1))
        parts["tail_model"].append((lm.exp() * ~top).sum(-1))
        first.append(float(kl[0]))
    res = {k: float(torch.cat(v).mean()) for k, v in parts.items()}
    res["kl_rest"] = res["kl"] - res["kl_top"]
    res["kl_first_token"] = sum(first) / len(first)
    res |= {"model": args.model, "template_system": tokens.default_system is not None, "prompts": args.prompts,
            "n_prompts": len(prompts), "n_tokens": int(sum(x.numel() for x in parts["kl"])), "top_k": args.top_k,
            "env": environment("cpu")}
    print(json.dumps(res, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
