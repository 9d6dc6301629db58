"""Safety alignment margin and per-mode behaviour rates.

The **safety alignment margin** (arXiv 2508.14904) is the mean silhouette coefficient, with cosine
distance, of the logit vectors of the *first response token* grouped by mode: for each prompt and
each mode, the model's next-token logits right after the assistant generation prompt. Near 0: the
modes are indistinguishable where the reply starts; towards 1: every mode forms its own tight cluster.
The paper reports ~0.13 for a co-trained model against ~0.03 for baselines.

    from upsafe_ext.magic import safety_alignment_margin
    res = safety_alignment_margin(model, tok, prompts, plot="margin.png")
    res.margin, res.per_mode            # float, {"positive": ..., "negative": ..., "rejective": ...}

The silhouette is computed here in torch (no scikit-learn): for sample i in cluster A,
a(i) = mean distance to the other members of A, b(i) = min over clusters B != A of the mean distance
to B, s(i) = (b - a) / max(a, b), and s(i) = 0 for a singleton cluster (scikit-learn's convention).
Cosine distance is 1 - cos, with 0 on the diagonal; a zero vector is at distance 1 from everything.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..train.chat import encode_prompts, pad_token_id
from .config import MODES
from .inference import magic_conversations
from .model import get_tokens
from .tokens import MagicTokens

MODE_COLOURS = {"positive": "#2a9d48", "negative": "#d62828", "rejective": "#1d5fbf"}


def _normalised(x: Tensor) -> Tensor:
    dtype = torch.float64 if x.numel() <= (1 << 24) else torch.float32
    x = x.detach().to(dtype)
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def silhouette_samples_cosine(x: Tensor, labels: Tensor | Sequence[int], chunk: int = 2048) -> Tensor:
    """Per-sample silhouette coefficients of `x` [N, D] under cosine distance, clusters from `labels` [N].

    Needs 2 <= number of clusters <= N - 1 (as scikit-learn does). Rows are processed in chunks of
    `chunk`, so memory is O(chunk * N) besides `x`. Returns a float64 tensor [N].
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"silhouette_samples_cosine: `x` must be a 2-D tensor [N, D], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"silhouette_samples_cosine: `labels` must be 1-D with N={x.shape[0]} entries, got "
                         f"shape {tuple(labels.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("silhouette_samples_cosine: `x` has NaN or inf entries")
    n = x.shape[0]
    uniq, lab = torch.unique(labels.cpu(), return_inverse=True)
    k = uniq.numel()
    if not 2 <= k <= n - 1:
        raise ValueError(f"silhouette_samples_cosine: need 2 <= clusters <= N-1, got {k} clusters for N={n}")
    xn = _normalised(x.cpu())
    onehot = torch.nn.functional.one_hot(lab, k).to(xn.dtype)  # [N, K]
    counts = onehot.sum(0)                                       # [K]
    sums = torch.empty(n, k, dtype=torch.float64)
    for s in range(0, n, chunk):
        d = (1.0 - xn[s: s + chunk] @ xn.T).clamp_min(0.0)       # [c, N] cosine distances
        rows = torch.arange(s, min(s + chunk, n))
        d[rows - s, rows] = 0.0
        sums[s: s + chunk] = (d @ onehot).double()
    own = counts[lab].double()
    idx = torch.arange(n)
    a = sums[idx, lab] / (own - 1).clamp_min(1)
    mean_other = sums / counts.double()
    mean_other[idx, lab] = math.inf
    b = mean_other.min(1).values
    denom = torch.maximum(a, b)
    sil = torch.where(denom > 0, (b - a) / torch.where(denom > 0, denom, torch.ones_like(denom)),
                      torch.zeros_like(denom))
    return torch.where(own > 1, sil, torch.zeros_like(sil))


def silhouette_cosine(x: Tensor, labels: Tensor | Sequence[int]) -> float:
    """Mean silhouette coefficient of `x` [N, D] under cosine distance (see the module docstring)."""
    return float(silhouette_samples_cosine(x, labels).mean())


def project_2d(x: Tensor) -> Tensor:
    """The first two principal components of the L2-normalised rows of `x` [N, D] (cosine geometry),
    via the eigen-decomposition of the centred Gram matrix. Returns float32 [N, 2]."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"project_2d: `x` must be a 2-D tensor with at least 2 rows, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    xn = _normalised(x.cpu())
    xc = xn - xn.mean(0, keepdim=True)
    g = (xc @ xc.T).double()
    vals, vecs = torch.linalg.eigh(g)                  # ascending
    top = torch.arange(g.shape[0] - 1, max(g.shape[0] - 3, -1), -1)
    pts = vecs[:, top] * vals[top].clamp_min(0).sqrt()
    if pts.shape[1] < 2:
        pts = torch.cat([pts, torch.zeros(pts.shape[0], 2 - pts.shape[1], dtype=pts.dtype)], 1)
    return pts.float()


@torch.no_grad()
def first_token_logits(model, tokenizer, conversations: Sequence[Sequence[dict]], *, batch_size: int = 16,
                       progress: bool = True, desc: str = "first-token logits") -> Tensor:
    """Next-token logits right after each conversation's assistant generation prompt: float32 [N, V] on CPU.

    Each conversation is rendered by the tokenizer's chat template (with the generation prompt) and
    the batch is *right*-padded, so the logits at each row's last real position are exactly those of
    the unpadded sequence (causal attention never sees the padding that follows).
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"first_token_logits: `batch_size` must be a positive int, got {batch_size!r}")
    ids = encode_prompts(tokenizer, conversations) if len(conversations) else []
    if not ids:
        raise ValueError("first_token_logits: `conversations` is empty")
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer, model)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[Tensor | None] = [None] * len(ids)
    was_training = model.training
    model.eval()
    try:
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[s: s + batch_size]
            width = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, : len(ids[i])] = torch.as_tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits
            last = (mask.sum(1) - 1).to(device)
            picked = logits[torch.arange(len(idx), device=device), last].float().cpu()
            for r, i in enumerate(idx):
                out[i] = picked[r]
    finally:
        if was_training:
            model.train()
    return torch.stack(out)  # type: ignore[arg-type]


@dataclass
class MarginResult:
    """What `safety_alignment_margin` measured.

    margin: mean silhouette over all (prompt, mode) points; per_mode: mean silhouette of each mode's
    points; modes: the modes compared; n_prompts; points_2d [N*M, 2] (the plot's projection);
    labels [N*M] (index into `modes`); plot_path: the PNG written, if any; vectors: the logit vectors
    [N*M, V] when asked for (`keep_vectors=True`).
    """

    margin: float
    per_mode: dict
    modes: tuple
    n_prompts: int
    points_2d: Tensor = field(repr=False)
    labels: Tensor = field(repr=False)
    plot_path: str | None = None
    vectors: Tensor | None = field(default=None, repr=False)

    def __float__(self) -> float:
        return float(self.margin)

    def to_dict(self) -> dict:
        return {"margin": self.margin, "per_mode": dict(self.per_mode), "modes": list(self.modes),
                "n_prompts": self.n_prompts, "plot_path": self.plot_path}


def plot_mode_scatter(points: Tensor, labels: Tensor, modes: Sequence[str], path: str | os.PathLike,
                      title: str | None = None) -> str:
    """Scatter `points` [N, 2] coloured by mode (`labels` index into `modes`) into a PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"plot_mode_scatter: `path` must end in .png, got {path!r}")
    points = torch.as_tensor(points).float()
    labels = torch.as_tensor(labels)
    fig = Figure(figsize=(5.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for j, m in enumerate(modes):
        sel = labels == j
        ax.scatter(points[sel, 0].numpy(), points[sel, 1].numpy(), s=14, alpha=0.75,
                   color=MODE_COLOURS.get(m, f"C{j}"), label=f"{m} ({int(sel.sum())})", edgecolors="none")
    ax.set_xlabel("PC 1 (normalised first-token logits)")
    ax.set_ylabel("PC 2")
    ax.legend(loc="best", fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def safety_alignment_margin(model, tokenizer, prompts, *, tokens: MagicTokens | None = None,
                            modes: Sequence[str] | None = None, system: str | None = None, batch_size: int = 16,
                            plot: str | os.PathLike | None = None, title: str | None = None,
                            keep_vectors: bool = False, progress: bool = True) -> MarginResult:
    """The safety alignment margin of `model` on `prompts` (strings or conversations).

    Each prompt is placed once per mode in `modes` (default: every mode `tokens` holds, so the negative
    one is left out when disabled; at least two), its first-response-token logits are taken
    (`first_token_logits`), and the mean cosine silhouette over the mode clusters is returned as a
    `MarginResult` (``float(result)`` is the margin). `plot`: a .png path for the 2-D scatter.
    Works before co-training too (tokens not yet learned): that gives the baseline to compare with.
    """
    tokens = get_tokens(model, tokens, "safety_alignment_margin")
    modes = tuple(tokens.modes if modes is None else modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"safety_alignment_margin: unknown `modes` {bad}; modes are {MODES}")
    if len(set(modes)) != len(modes) or len(modes) < 2:
        raise ValueError(f"safety_alignment_margin: `modes` must name at least two distinct modes, got {modes}")
    for m in modes:
        tokens.resolve_mode(m, strict=True)  # PermissionError for a disabled negative mode
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) < 2:
        raise ValueError("safety_alignment_margin: `prompts` must be a list of at least 2 prompts (a silhouette "
                         "needs more points than clusters)")
    convs, labels = [], []
    for j, m in enumerate(modes):
        c, _ = magic_conversations(tokenizer, prompts, m, tokens=tokens, system=system, strict=True)
        convs += c
        labels += [j] * len(c)
    vecs = first_token_logits(model, tokenizer, convs, batch_size=batch_size, progress=progress)
    lab = torch.tensor(labels)
    per_sample = silhouette_samples_cosine(vecs, lab)
    margin = float(per_sample.mean())
    per_mode = {m: float(per_sample[lab == j].mean()) for j, m in enumerate(modes)}
    pts = project_2d(vecs)
    path = None
    if plot is not None:
        path = plot_mode_scatter(pts, lab, modes, plot,
                                 title or f"first-token logits by mode - margin {margin:.3f} (n={len(prompts)})")
    return MarginResult(margin=margin, per_mode=per_mode, modes=modes, n_prompts=len(prompts), points_2d=pts,
                        labels=lab, plot_path=path, vectors=vecs if keep_vectors else None)


def behaviour_rates(model, tokenizer, harmful: Sequence[str], benign: Sequence[str], *,
                    tokens: MagicTokens | None = None, modes: Sequence[str] | None = None,
                    include_no_token: bool = True, judge: Callable | None = None, max_new_tokens: int = 64,
                    batch_size: int = 16, progress: bool = True, return_replies: bool = False) -> dict:
    """Refusal rates per mode on harmful and benign prompts, judged by the package's refusal judge.

    All requests (every prompt x every mode, plus a "no_token" row without any token when
    `include_no_token`) are generated greedily in shared batches. Returns
    ``{row: {"harmful_refusal": rate, "benign_refusal": rate, "n_harmful": n, "n_benign": n}}`` with
    rows = `modes` (default: the modes `tokens` holds) [+ "no_token"]; with `return_replies` each row
    also has "replies" (harmful first, then benign). `judge`: ``fn(text) -> bool`` (default
    ``upsafe_ext.eval.judge.RefusalJudge()``). Expected after co-training: positive refuses harmful
    but not benign, negative refuses neither, rejective refuses both, no_token behaves like positive.
    """
    from ..eval.generation import generate_chat

    if judge is None:
        from ..eval.judge import RefusalJudge

        judge = RefusalJudge()
    tokens = get_tokens(model, tokens, "behaviour_rates")
    harmful, benign = list(harmful), list(benign)
    if not harmful and not benign:
        raise ValueError("behaviour_rates: `harmful` and `benign` are both empty")
    modes = tuple(tokens.modes if modes is None else modes)
    for m in modes:
        tokens.resolve_mode(m, strict=True)
    prompts = harmful + benign
    rows = list(modes) + (["no_token"] if include_no_token else [])
    convs: list[list[dict]] = []
    for row in rows:
        if row == "no_token":
            convs += [tokens.place(tokenizer, [{"role": "user", "content": tokens.strip(p)}], None) for p in prompts]
        else:
            convs += magic_conversations(tokenizer, prompts, row, tokens=tokens, strict=True)[0]
    replies = generate_chat(model, tokenizer, convs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            progress=progress, desc="behaviour")
    out = {}
    n = len(prompts)
    for r, row in enumerate(rows):
        rep = replies[r * n: (r + 1) * n]
        flags = [bool(judge(t)) for t in rep]
        h, b = flags[: len(harmful)], flags[len(harmful):]
        out[row] = {"harmful_refusal": sum(h) / len(h) if h else float("nan"),
                    "benign_refusal": sum(b) / len(b) if b else float("nan"),
                    "n_harmful": len(h), "n_benign": len(b)}
        if return_replies:
            out[row]["replies"] = rep
    return out
