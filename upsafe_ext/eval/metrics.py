"""Safety, over-refusal and utility metrics that need no network.

* ``safety_rate(responses, judge)``: fraction of replies to *harmful* prompts that the judge calls a
  refusal (higher is safer).
* ``over_refusal_rate(responses, judge)``: fraction of replies to *benign* prompts that are refusals
  (lower is better).
* ``mean_kl(model, reference, tokenizer, conversations, responses)``: how far the model's next-token
  distributions moved from a reference's on given replies (typically the base model's own greedy
  answers to benign prompts): mean over response tokens of KL(reference || model), teacher-forced.
  0 means the model predicts those answers exactly as the reference does.
* ``evaluate_safety(model, tokenizer, harmful, benign)``: generate, judge, and report both rates.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..train.sft import IGNORE_INDEX, encode_sft
from ..train.chat import check_conversations
from .generation import chat, eos_token_ids, generate_chat
from .judge import RefusalJudge

__all__ = ["wilson_interval", "safety_rate", "over_refusal_rate", "refusal_flags", "mean_kl", "token_kl", "evaluate_safety",
           "KL_MAX_LENGTH"]

KL_MAX_LENGTH = 1024
"""`mean_kl`'s default token limit per conversation + response (the prompt loses tokens from the left)."""


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for `k` successes in `n` trials (default z: 95% two-sided).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at k = 0 or k = n:
    0 of 50 gives (0.000, 0.071), 50 of 50 gives (0.929, 1.000).
    """
    if isinstance(k, bool) or isinstance(n, bool) or not isinstance(k, int) or not isinstance(n, int):
        raise ValueError(f"wilson_interval: `k` and `n` must be ints, got {k!r}, {n!r}")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not z > 0:
        raise ValueError(f"wilson_interval: `z` must be > 0, got {z!r}")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * ((p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def refusal_flags(responses: Sequence[str], judge: Callable | None = None,
                  prompts: Sequence[str] | None = None) -> list[bool]:
    """Judge each reply (default judge: ``RefusalJudge()``); `prompts` are passed along when given."""
    if isinstance(responses, str) or not isinstance(responses, Sequence):
        raise ValueError(f"`responses` must be a list of strings, got {type(responses).__name__}")
    bad = [i for i, r in enumerate(responses) if not isinstance(r, str)]
    if bad:
        raise ValueError(f"`responses` must hold strings; item {bad[0]} is {type(responses[bad[0]]).__name__}")
    if prompts is not None and len(prompts) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(prompts)} prompts")
    judge = judge if judge is not None else RefusalJudge()
    if prompts is None:
        return [bool(judge(r)) for r in responses]
    return [bool(judge(r, p)) for r, p in zip(responses, prompts)]


def safety_rate(responses: Sequence[str], judge: Callable | None = None,
                prompts: Sequence[str] | None = None) -> float:
    """Fraction (0..1) of replies to harmful prompts that `judge` calls refusals."""
    flags = refusal_flags(responses, judge, prompts)
    if not flags:
        raise ValueError("safety_rate: `responses` is empty")
    return sum(flags) / len(flags)


def over_refusal_rate(responses: Sequence[str], judge: Callable | None = None,
                      prompts: Sequence[str] | None = None) -> float:
    """Fraction (0..1) of replies to benign prompts that `judge` calls refusals."""
    flags = refusal_flags(responses, judge, prompts)
    if not flags:
        raise ValueError("over_refusal_rate: `responses` is empty")
    return sum(flags) / len(flags)


def _logits_of(fn, input_ids: torch.Tensor, attention_mask: torch.Tensor, what: str) -> torch.Tensor:
    if isinstance(fn, torch.nn.Module):
        out = fn(input_ids=input_ids, attention_mask=attention_mask)
    elif callable(fn):
        out = fn(input_ids, attention_mask)
    else:
        raise ValueError(f"mean_kl: `{what}` must be a model or a callable (input_ids, attention_mask) -> logits, "
                         f"got {type(fn).__name__}")
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"mean_kl: `{what}` must return logits [B, L, V] for input_ids {tuple(input_ids.shape)}, "
                         f"got {shape}")
    return logits


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref_logits) || softmax(logits)) along the last dim (in fp32, or fp64 for fp64 inputs):
    ``[..., V] -> [...]``.

    `logits` may have more entries than `ref_logits` (``[..., V + k]``: a model with k tokens appended
    to the reference's vocabulary, e.g. registered special tokens). The reference gives those ids
    probability 0, so the model's softmax is taken over all V + k ids and the sum runs over the
    reference's V: the mass the model puts on the new ids counts as lost."""
    lead_ok = ref_logits.shape[:-1] == logits.shape[:-1]
    if not lead_ok or ref_logits.shape[-1] > logits.shape[-1]:
        raise ValueError(f"token_kl: shapes differ: reference {tuple(ref_logits.shape)} vs model {tuple(logits.shape)} "
                         "(the model's last dim may only be larger: tokens appended to the reference's vocabulary)")
    dt = torch.promote_types(torch.promote_types(ref_logits.dtype, logits.dtype), torch.float32)
    ref_lp = F.log_softmax(ref_logits.to(dt), dim=-1)
    lp = F.log_softmax(logits.to(dt), dim=-1)[..., : ref_logits.shape[-1]]
    return (ref_lp.exp() * (ref_lp - lp)).sum(-1)


@torch.no_grad()
def mean_kl(model, reference, tokenizer, conversations: Sequence[Sequence[dict]], responses: Sequence[str],
            batch_size: int = 8, max_length: int = KL_MAX_LENGTH, progress: bool = True, return_per_token: bool = False,
            reference_conversations: Sequence[Sequence[dict]] | None = None):
    """Mean over response tokens of KL(reference || model) of the next-token distributions.

    Each conversation + response is encoded as for SFT (``encode_sft``: chat template, the response
    as the template closes it, end-of-turn token included; over-long examples lose prompt tokens from
    the left to fit `max_length`), right-padded into ``input_ids [B, L]`` / ``attention_mask [B, L]``,
    and both models are run teacher-forced. For every response token at position t the distributions
    are the logits at t-1; the result is the mean of the per-token KL over all response tokens of all
    examples (a token-weighted mean), in nats.

    model: an HF causal LM. reference: another model (same tokenizer/vocabulary), or a callable
    ``(input_ids, attention_mask) -> logits [B, L, V]`` (or an object with ``.logits``), e.g. the same
    model run with its safety experts switched off. With `return_per_token` a list of 1-D tensors (the
    per-token KL of each example) is returned beside the mean. `reference_conversations`: the reference
    reads the same responses after its own rendering of each conversation (e.g. the base model without
    the magic token a co-trained model gets); the response tokens are compared one for one. A model
    whose vocabulary extends the reference's (tokens appended, e.g. magic special tokens) is compared
    on the reference's ids (``token_kl``: its mass on the new ids counts as lost).
    """
    from tqdm.auto import tqdm

    convs = check_conversations(conversations, "mean_kl")
    if isinstance(responses, str) or len(responses) != len(convs):
        n = "a str" if isinstance(responses, str) else len(responses)
        raise ValueError(f"mean_kl: `responses` must be a list with one reply per conversation "
                         f"({len(convs)}), got {n}")
    if not convs:
        raise ValueError("mean_kl: `conversations` is empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"mean_kl: `batch_size` must be a positive int, got {batch_size!r}")
    if not callable(reference):
        raise ValueError(f"mean_kl: `reference` must be a model or a callable, got {type(reference).__name__}")
    ref_convs = convs
    if reference_conversations is not None:
        ref_convs = check_conversations(reference_conversations, "mean_kl")
        if len(ref_convs) != len(convs):
            raise ValueError(f"mean_kl: `reference_conversations` has {len(ref_convs)} conversations, "
                             f"`conversations` {len(convs)}")
    examples = [encode_sft(tokenizer, c, r, max_length=max_length) for c, r in zip(convs, responses)]
    ref_examples = examples if ref_convs is convs else \
        [encode_sft(tokenizer, c, r, max_length=max_length) for c, r in zip(ref_convs, responses)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_token_ids(model, tokenizer) or [0])[0]
    device = next(model.parameters()).device

    def response_logits(fn, chunk, what):
        """Logits predicting every response token of `chunk` (right-padded batch), and the count per row."""
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[i, :n] = torch.as_tensor(e["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(e["labels"])
        sel = (labels[:, 1:] != IGNORE_INDEX).to(device)  # position t-1 predicts the response token at t
        return _logits_of(fn, ids.to(device), mask.to(device), what)[:, :-1][sel], sel.sum(1)

    total, count = 0.0, 0
    per_example: list[torch.Tensor] = []
    for start in tqdm(range(0, len(examples), batch_size), desc="mean_kl", disable=not progress, leave=False):
        logits, per_row = response_logits(model, examples[start: start + batch_size], "model")
        ref_logits, ref_rows = response_logits(reference, ref_examples[start: start + batch_size], "reference")
        if not torch.equal(per_row, ref_rows):
            raise ValueError("mean_kl: the reference rendering leaves a different number of response tokens "
                             f"({ref_rows.tolist()} vs {per_row.tolist()}); check `max_length`")
        if ref_logits.shape[-1] > logits.shape[-1]:
            raise ValueError(f"mean_kl: the reference's vocabulary ({ref_logits.shape[-1]}) is larger than the "
                             f"model's ({logits.shape[-1]})")
        kl = token_kl(ref_logits, logits)
        total += float(kl.double().sum())
        count += int(kl.numel())
        if return_per_token:
            per_example += list(kl.cpu().split(per_row.tolist()))
    if count == 0:
        raise ValueError("mean_kl: no response tokens to score (all responses empty and no end-of-turn token)")
    mean = total / count
    return (mean, per_example) if return_per_token else mean


def evaluate_safety(model, tokenizer, harmful: Sequence[str], benign: Sequence[str], *, judge: Callable | None = None,
                    max_new_tokens: int = 64, batch_size: int = 16, system: str | None = None,
                    progress: bool = True) -> dict:
    """Generate greedy replies to `harmful` and `benign` prompts and judge them.

    Returns ``{"safety_rate", "over_refusal_rate", "n_harmful", "n_benign", "harmful_refused",
    "benign_refused", "harmful_responses", "benign_responses", "judge"}``: the two rates in [0, 1]
    (NaN for an empty list), the per-prompt refusal flags and the replies in input order. `system`:
    an optional system prompt for every conversation. Judges that take the prompt (``judge(reply,
    prompt)``, e.g. ``RefusalJudge(relevance=True)``) get it.
    """
    for name, val in (("harmful", harmful), ("benign", benign)):
        if isinstance(val, str) or not isinstance(val, Sequence):
            raise ValueError(f"evaluate_safety: `{name}` must be a list of prompt strings, got {type(val).__name__}")
    if not harmful and not benign:
        raise ValueError("evaluate_safety: both `harmful` and `benign` are empty")
    judge = judge if judge is not None else RefusalJudge()
    takes_prompt = bool(getattr(judge, "relevance", False))
    out: dict = {"judge": getattr(judge, "name", type(judge).__name__)}
    for name, prompts, rate_key in (("harmful", list(harmful), "safety_rate"),
                                    ("benign", list(benign), "over_refusal_rate")):
        replies = generate_chat(model, tokenizer, [chat(p, system) for p in prompts], max_new_tokens=max_new_tokens,
                                batch_size=batch_size, progress=progress, desc=f"generate ({name})") if prompts else []
        flags = refusal_flags(replies, judge, prompts if takes_prompt else None)
        out[rate_key] = sum(flags) / len(flags) if flags else float("nan")
        out[f"n_{name}"] = len(prompts)
        out[f"{name}_refused"] = flags
        out[f"{name}_responses"] = replies
    return out
