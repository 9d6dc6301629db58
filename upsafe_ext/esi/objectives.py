"""Safety objectives S for ESI: differentiable per-prompt safety scores whose gradients ESI sums.

An objective is a callable ``objective(model, tokenizer, prompts, config) -> Tensor[B]`` (one S per
prompt, differentiable w.r.t. the model's weights) with a ``name``. `compute_esi` sums its gradients
over all prompts. Two ship here:

* `RefusalObjective` (default): S = log p_model(refusal | harmful prompt) under the chat template, the
  summed log-likelihood of a refusal continuation (``upsafe_ext.eval.refusal_response`` by default).
* `JudgeObjective` (the paper's reference S): a guard model's "safe" logit on the model's *own greedy
  reply*. The reply is generated without gradients, re-run teacher-forced to get its logits, relaxed
  with Gumbel-softmax (τ = 0.3; straight-through by default, so the guard reads exactly the reply while
  the gradient flows through the soft sample), mapped into the guard's input embeddings through a
  guard→model vocabulary transfer matrix, and placed between the guard prompt's prefix and suffix.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..train.chat import chat, encode_prompts, eos_token_ids, left_pad, pad_token_id, render_chat
from ..train.sft import IGNORE_INDEX, SFTCollator, encode_sft
from .config import ESIConfig

__all__ = ["RefusalObjective", "JudgeObjective", "build_transfer_matrix", "greedy_replies", "make_objective",
           "prompt_seed"]

_SENTINEL = "\u2063UPSAFE_RESPONSE\u2063"


def prompt_seed(prompt: str, seed: int) -> int:
    """A 63-bit seed from (seed, prompt): per-prompt noise independent of batching and ranks."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{prompt}".encode("utf-8")).digest()[:8], "big") >> 1


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RefusalObjective:
    """S(prompt) = Σ_t log p(refusal_t | chat(prompt), refusal_<t): the log-likelihood of a refusal.

    Args:
        refusal: the target refusal: None (``upsafe_ext.eval.refusal_response(prompt, config.seed)``, a
            fixed phrasing per prompt), a string (the same refusal for every prompt) or a callable
            ``prompt -> str``.

    Example:
        >>> obj = RefusalObjective("I'm sorry, but I can't help with that.")
    """

    name = "refusal"

    def __init__(self, refusal: str | Callable[[str], str] | None = None):
        if refusal is not None and not isinstance(refusal, str) and not callable(refusal):
            raise ValueError(f"RefusalObjective: `refusal` must be None, a str or a callable, got {type(refusal).__name__}")
        if isinstance(refusal, str) and not refusal.strip():
            raise ValueError("RefusalObjective: `refusal` is an empty string")
        self.refusal = refusal

    def target(self, prompt: str, seed: int) -> str:
        """The refusal continuation for `prompt`."""
        if self.refusal is None:
            from ..eval.prompts import refusal_response

            return refusal_response(prompt, seed)
        out = self.refusal if isinstance(self.refusal, str) else self.refusal(prompt)
        if not isinstance(out, str) or not out:
            raise ValueError(f"RefusalObjective: the refusal callable returned {out!r} for prompt {prompt!r:.60}")
        return out

    def __call__(self, model, tokenizer, prompts: Sequence[str], config: ESIConfig) -> Tensor:
        feats = [encode_sft(tokenizer, chat(p, config.system), self.target(p, config.seed), config.max_length)
                 for p in prompts]
        batch = SFTCollator(pad_token_id(tokenizer, model))(feats)
        device = next(model.parameters()).device
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    use_cache=False)
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:].to(device)
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return -nll.sum(1)

    def __repr__(self):
        return f"RefusalObjective(refusal={self.refusal!r})"


@torch.no_grad()
def greedy_replies(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int],
                   pad_id: int, stop_early: bool = True) -> list[list[int]]:
    """Greedy continuations of `prompt_ids` (left-padded batch, KV cache), cut before the first eos.

    Runs exactly `max_new_tokens` forward steps unless `stop_early` and every row has hit an eos (under
    FSDP every rank must run the same number of forwards, so `compute_esi` turns `stop_early` off there).
    The tokens equal Hugging Face ``generate(do_sample=False)``'s.
    """
    device = next(model.parameters()).device
    B = len(prompt_ids)
    ids, mask = left_pad(prompt_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1)
    tokens, done = [], torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        tokens.append(nxt)
        done |= torch.isin(nxt, eos)
        if t == max_new_tokens - 1 or (stop_early and bool(done.all())):
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=past,
                    use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)
    gen = torch.stack(tokens, 1).tolist()
    eos_set = set(int(e) for e in eos_ids)
    replies = []
    for row in gen:
        cut = next((j for j, t in enumerate(row) if t in eos_set), len(row))
        replies.append(row[:cut])
    return replies


def build_transfer_matrix(model_tokenizer, guard_tokenizer, model_vocab_size: int | None = None) -> Tensor:
    """The guard→model vocabulary transfer matrix T: sparse ``[V_model, V_guard]`` fp32 (COO).

    Row i describes model token i in the guard's vocabulary: a special token maps to the guard's token
    of the same string (if any); an ordinary token maps to the guard token with the same raw string when
    it decodes to the same text, otherwise to the guard's tokenisation of its text, each of the n pieces
    with weight 1/n (the guard sees the mean of their embeddings). Tokens with no text get an empty row.
    `model_vocab_size` (the model's logit width, may exceed ``len(model_tokenizer)``) pads with empty rows.
    """
    nm = len(model_tokenizer)
    V = int(model_vocab_size) if model_vocab_size is not None else nm
    if V < nm:
        raise ValueError(f"build_transfer_matrix: `model_vocab_size` ({V}) is smaller than the model tokenizer ({nm})")
    gvocab = guard_tokenizer.get_vocab()
    gspecial = set(guard_tokenizer.all_special_tokens)
    mspecial = set(model_tokenizer.all_special_tokens)
    rows, cols, vals = [], [], []
    pending_ids, pending_text = [], []
    toks = model_tokenizer.convert_ids_to_tokens(list(range(nm)))
    for i, tok in enumerate(toks):
        if tok is None:
            continue
        if tok in mspecial:
            if tok in gvocab:
                rows.append(i), cols.append(gvocab[tok]), vals.append(1.0)
            continue
        text = model_tokenizer.convert_tokens_to_string([tok])
        if not text:
            continue
        g = gvocab.get(tok)
        if g is not None and tok not in gspecial and guard_tokenizer.convert_tokens_to_string([tok]) == text:
            rows.append(i), cols.append(g), vals.append(1.0)
        else:
            pending_ids.append(i)
            pending_text.append(text)
    if pending_text:
        enc = guard_tokenizer(pending_text, add_special_tokens=False)["input_ids"]
        for i, pieces in zip(pending_ids, enc):
            for g in pieces:
                rows.append(i), cols.append(int(g)), vals.append(1.0 / len(pieces))
    Vg = max(len(guard_tokenizer), max(cols, default=-1) + 1)
    idx = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
    return torch.sparse_coo_tensor(idx, torch.tensor(vals, dtype=torch.float32), (V, Vg),
                                   check_invariants=True).coalesce()


class JudgeObjective:
    """S(prompt) = the guard's "safe" logit on the model's own greedy reply, differentiable through a
    Gumbel-softmax relaxation of the reply and a guard→model vocabulary transfer.

    Args:
        guard_model: a causal LM (frozen here; its parameters get no gradients).
        guard_tokenizer: its tokenizer (None: the model's tokenizer, identity transfer).
        transfer: None (identity when the two tokenizers share a vocabulary, else
            `build_transfer_matrix`), a LongTensor ``[V_model]`` map (guard id per model token, -1 = none),
            or a dense/sparse ``[V_model, V_guard]`` matrix.
        safe_token: the verdict token whose logit is S (a string: its first guard token; or an id).
        unsafe_token: optional; if given S = logit(safe) - logit(unsafe).
        tau: Gumbel-softmax temperature, > 0. Default 0.3.
        max_new_tokens: greedy reply length limit. Default 32.
        template: None (the guard tokenizer's chat template over ``[user: prompt, assistant: reply]`` with
            the generation prompt appended, so the next token is the verdict) or a format string with
            ``{prompt}`` and ``{response}`` fields, e.g. Llama-Guard-style instructions.
        straight_through: True (default; **ours**): the guard reads the exact one-hot reply and the gradient
            is the soft sample's; False: the guard reads the soft sample itself.

    Example:
        >>> from upsafe_ext.testing import tiny_causal_lm, tiny_tokenizer
        >>> obj = JudgeObjective(tiny_causal_lm("llama", seed=1), tiny_tokenizer(), safe_token="s")
    """

    name = "judge"

    def __init__(self, guard_model, guard_tokenizer=None, *, transfer: Tensor | None = None,
                 safe_token: str | int = "safe", unsafe_token: str | int | None = None, tau: float = 0.3,
                 max_new_tokens: int = 32, template: str | None = None, straight_through: bool = True):
        if not isinstance(guard_model, torch.nn.Module) or not hasattr(guard_model, "get_input_embeddings"):
            raise ValueError("JudgeObjective: `guard_model` must be a Hugging Face causal LM (nn.Module with "
                             f"get_input_embeddings), got {type(guard_model).__name__}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"JudgeObjective: `tau` must be a float > 0, got {tau!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"JudgeObjective: `max_new_tokens` must be an int >= 1, got {max_new_tokens!r}")
        if template is not None and (not isinstance(template, str) or "{response}" not in template):
            raise ValueError("JudgeObjective: `template` must be None or a format string containing {response}, "
                             f"got {template!r:.80}")
        if transfer is not None and (not isinstance(transfer, Tensor) or transfer.dim() not in (1, 2)):
            raise ValueError("JudgeObjective: `transfer` must be None, a 1-D LongTensor map or a 2-D "
                             f"[V_model, V_guard] matrix, got {transfer!r:.80}")
        for arg, tokv in (("safe_token", safe_token), ("unsafe_token", unsafe_token)):
            if tokv is not None and (isinstance(tokv, bool) or not isinstance(tokv, (str, int))):
                raise ValueError(f"JudgeObjective: `{arg}` must be a str or int, got {tokv!r}")
        self.guard = guard_model.eval()
        self.guard.requires_grad_(False)
        self.guard_tokenizer = guard_tokenizer
        self.transfer = transfer
        self.safe_token, self.unsafe_token = safe_token, unsafe_token
        self.tau = float(tau)
        self.max_new_tokens = max_new_tokens
        self.template = template
        self.straight_through = bool(straight_through)
        self._mapped: tuple | None = None  # (model vocab size, [V_model, d_guard] guard embeddings per model token)

    # -- guard-side pieces -------------------------------------------------------------------------
    def _gtok(self, tokenizer):
        return self.guard_tokenizer if self.guard_tokenizer is not None else tokenizer

    def _token_id(self, tok, gtok, arg: str) -> int:
        if isinstance(tok, int):
            vg = self.guard.get_input_embeddings().weight.shape[0]
            if not 0 <= tok < vg:
                raise ValueError(f"JudgeObjective: `{arg}` id {tok} is outside the guard vocabulary [0, {vg})")
            return tok
        ids = gtok(tok, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"JudgeObjective: `{arg}` {tok!r} tokenises to nothing with the guard tokenizer")
        return int(ids[0])

    def guard_text(self, prompt: str, gtok) -> tuple[str, str]:
        """(prefix, suffix): the guard's input text before and after the reply."""
        if self.template is not None:
            head, tail = self.template.split("{response}", 1)
            return head.replace("{prompt}", prompt), tail.replace("{prompt}", prompt)
        if getattr(gtok, "chat_template", None) is None:
            raise ValueError("JudgeObjective: the guard tokenizer has no chat template; pass `template` "
                             "(a format string with {prompt} and {response})")
        text = render_chat(gtok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": _SENTINEL}],
                           add_generation_prompt=True)
        if text.count(_SENTINEL) != 1:
            raise ValueError("JudgeObjective: the guard chat template does not render the assistant reply "
                             "verbatim; pass `template`")
        head, tail = text.split(_SENTINEL)
        return head, tail

    def mapped_embeddings(self, tokenizer, model_vocab: int, device) -> Tensor:
        """``[V_model, d_guard]``: each model token's guard input embedding, T @ E_guard (cached)."""
        if self._mapped is not None and self._mapped[0] == model_vocab and self._mapped[1].device == torch.device(device):
            return self._mapped[1]
        E = self.guard.get_input_embeddings().weight.detach()
        Vg = E.shape[0]
        T = self.transfer
        if T is None:
            gtok = self.guard_tokenizer
            if gtok is None or gtok.get_vocab() == tokenizer.get_vocab():
                T = torch.arange(model_vocab)
                T[T >= Vg] = -1
            else:
                T = build_transfer_matrix(tokenizer, gtok, model_vocab)
        if T.dim() == 1:
            if T.numel() < model_vocab:
                T = torch.cat([T.long(), torch.full((model_vocab - T.numel(),), -1, dtype=torch.long)])
            T = T[:model_vocab].long().to(E.device)
            if int(T.max()) >= Vg:
                raise ValueError(f"JudgeObjective: `transfer` maps to guard id {int(T.max())} >= guard vocab {Vg}")
            mapped = torch.zeros((model_vocab, E.shape[1]), dtype=E.dtype, device=E.device)
            ok = T >= 0
            mapped[ok] = E[T[ok]]
        else:
            if T.shape[0] < model_vocab or T.shape[1] > Vg:
                raise ValueError(f"JudgeObjective: `transfer` has shape {tuple(T.shape)}; need "
                                 f"[>= {model_vocab} model tokens, <= {Vg} guard tokens]")
            T = T.to(E.device, torch.float32)
            Ef = E[: T.shape[1]].float()
            mapped = (torch.sparse.mm(T, Ef) if T.is_sparse else T @ Ef)[:model_vocab].to(E.dtype)
        self._mapped = (model_vocab, mapped.to(device))
        return self._mapped[1]

    # -- the objective -------------------------------------------------------------------------------
    def __call__(self, model, tokenizer, prompts: Sequence[str], config: ESIConfig) -> Tensor:
        gtok = self._gtok(tokenizer)
        device = next(model.parameters()).device
        gdev = next(self.guard.parameters()).device
        safe = self._token_id(self.safe_token, gtok, "safe_token")
        unsafe = None if self.unsafe_token is None else self._token_id(self.unsafe_token, gtok, "unsafe_token")
        pids = [p[-(config.max_length - 1):] for p in encode_prompts(tokenizer, [chat(p, config.system) for p in prompts])]
        max_new = max(1, min(self.max_new_tokens, config.max_length - max(len(p) for p in pids)))
        was_training = model.training
        model.eval()
        pad = pad_token_id(tokenizer, model)
        replies = greedy_replies(model, pids, max_new, eos_token_ids(model, tokenizer), pad,
                                 stop_early=not _distributed())
        # teacher-forced logits of the replies (right padding), with gradients
        seqs = [p + r for p, r in zip(pids, replies)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s)
            att[i, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False).logits
        if was_training:
            model.train()
        V = logits.shape[-1]
        mapped = self.mapped_embeddings(tokenizer, V, gdev)
        gemb = self.guard.get_input_embeddings()
        rows = []
        for i, (p, r) in enumerate(zip(pids, replies)):
            head, tail = self.guard_text(prompts[i], gtok)
            h_ids = torch.as_tensor(gtok(head, add_special_tokens=False)["input_ids"], dtype=torch.long, device=gdev)
            t_ids = torch.as_tensor(gtok(tail, add_special_tokens=False)["input_ids"], dtype=torch.long, device=gdev)
            parts = [gemb(h_ids)]
            if r:
                lg = logits[i, len(p) - 1: len(p) - 1 + len(r)].float()
                gen = torch.Generator().manual_seed(prompt_seed(prompts[i], config.seed))
                gumbel = -torch.empty(lg.shape).exponential_(generator=gen).log()
                soft = F.softmax((lg + gumbel.to(lg.device)) / self.tau, dim=-1)
                if self.straight_through:
                    hard = F.one_hot(torch.as_tensor(r, device=lg.device), V).to(soft.dtype)
                    y = hard + (soft - soft.detach())
                else:
                    y = soft
                parts.append((y.to(gdev, mapped.dtype) @ mapped))
            parts.append(gemb(t_ids))
            rows.append(torch.cat(parts, 0))
        L = max(x.shape[0] for x in rows)
        d = rows[0].shape[1]
        gatt = torch.zeros((len(rows), L), dtype=torch.long, device=gdev)
        emb_rows = []
        for i, x in enumerate(rows):
            pad = torch.zeros((L - x.shape[0], d), dtype=x.dtype, device=gdev)
            emb_rows.append(torch.cat([x, pad], 0))
            gatt[i, : x.shape[0]] = 1
        emb = torch.stack(emb_rows, 0)
        glogits = self.guard(inputs_embeds=emb, attention_mask=gatt, use_cache=False).logits
        last = glogits[torch.arange(len(rows), device=gdev), gatt.sum(1) - 1].float()
        s = last[:, safe] if unsafe is None else last[:, safe] - last[:, unsafe]
        return s.to(device)

    def __repr__(self):
        return (f"JudgeObjective(guard={type(self.guard).__name__}, safe_token={self.safe_token!r}, "
                f"unsafe_token={self.unsafe_token!r}, tau={self.tau}, max_new_tokens={self.max_new_tokens}, "
                f"straight_through={self.straight_through})")


def make_objective(objective) -> Callable:
    """None / "refusal" -> `RefusalObjective()`; an objective instance is returned as is."""
    if objective is None or objective == "refusal":
        return RefusalObjective()
    if objective == "judge":
        raise ValueError("compute_esi: `objective='judge'` needs a guard model; pass JudgeObjective(guard, guard_tok)")
    if isinstance(objective, str) or not callable(objective):
        raise ValueError(f"compute_esi: `objective` must be 'refusal', a RefusalObjective / JudgeObjective or a "
                         f"callable (model, tokenizer, prompts, config) -> Tensor[B]; got {objective!r:.80}")
    return objective
