"""The safety alignment margin's maths (upsafe_ext.magic): the cosine silhouette against hand-computed
values and a loop reference, its errors, and first-token logits against an unpadded forward pass.
(The margin of a co-trained model: test_magic_training.py.)

Split from test_magic.py; the shared helpers are in magic_fixtures.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from magic_fixtures import ids, one_torch_thread  # noqa: F401
from upsafe_ext.magic import first_token_logits, silhouette_cosine, silhouette_samples_cosine
from upsafe_ext.testing import tiny_causal_lm, tiny_tokenizer
from upsafe_ext.train.sft import render_chat


# ---------------------------------------------------------------------------------------------- margin maths

def test_silhouette_cosine_hand_computed():
    # a1=(1,0), a2=(0,1) | b1=(-1,0), b2=(0,-1): cosine distances d(a1,a2)=1, d(a1,b1)=2, d(a1,b2)=1 ...
    # every point: a = 1, b = (2 + 1)/2 = 1.5, s = (1.5 - 1)/1.5 = 1/3
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    lab = [0, 0, 1, 1]
    torch.testing.assert_close(silhouette_samples_cosine(x, lab), torch.full((4,), 1 / 3, dtype=torch.float64))
    # scaling rows changes nothing (cosine); a singleton cluster scores 0 (scikit-learn's convention)
    x2 = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-3.0, 0.0], [1.0, 1.0]])
    # clusters {0,1}, {2}, {3}: d(0,1)=1, d(0,2)=2, d(0,3)=1-1/sqrt2, d(1,2)=1, d(1,3)=1-1/sqrt2
    r = 1 - 1 / math.sqrt(2)
    s0 = (r - 1) / 1  # a=1, b=min(2, r)=r
    s1 = (r - 1) / 1
    got = silhouette_samples_cosine(x2, [0, 0, 1, 2])
    torch.testing.assert_close(got, torch.tensor([s0, s1, 0.0, 0.0], dtype=torch.float64))
    assert silhouette_cosine(x2, [0, 0, 1, 2]) == pytest.approx((s0 + s1) / 4)


def _silhouette_loop(x, labels):
    """The definition, written as loops (an independent reference)."""
    xn = [v / v.norm() for v in x.double()]
    n = len(xn)
    out = []
    for i in range(n):
        same = [j for j in range(n) if labels[j] == labels[i] and j != i]
        if not same:
            out.append(0.0)
            continue
        d = lambda j: 1.0 - float(xn[i] @ xn[j])  # noqa: E731
        a = sum(d(j) for j in same) / len(same)
        b = min(sum(d(j) for j in range(n) if labels[j] == c) / sum(1 for j in range(n) if labels[j] == c)
                for c in set(labels) if c != labels[i])
        out.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("n,d,k,chunk", [(7, 3, 2, 2048), (23, 17, 3, 5), (40, 431, 5, 16)])
def test_silhouette_matches_loop_reference(n, d, k, chunk):
    g = torch.Generator().manual_seed(n)
    centres = torch.randn(k, d, generator=g) * 2
    labels = [i % k for i in range(n)]
    x = centres[labels] + torch.randn(n, d, generator=g)
    torch.testing.assert_close(silhouette_samples_cosine(x, labels, chunk=chunk), _silhouette_loop(x, labels),
                               rtol=1e-9, atol=1e-9)


def test_silhouette_errors():
    with pytest.raises(ValueError, match="clusters"):
        silhouette_samples_cosine(torch.randn(4, 3), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="`labels`"):
        silhouette_samples_cosine(torch.randn(4, 3), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        silhouette_samples_cosine(torch.tensor([[float("nan"), 1.0], [1.0, 0.0], [0.0, 1.0]]), [0, 1, 1])


def test_first_token_logits_match_unpadded_forward():
    tok = tiny_tokenizer()
    model = tiny_causal_lm("qwen2")
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer question here"}],
             [{"role": "system", "content": "s"}, {"role": "user", "content": "mid length"}]]
    got = first_token_logits(model, tok, convs, batch_size=3, progress=False)
    for i, c in enumerate(convs):
        x = torch.tensor([ids(tok, render_chat(tok, c))])
        with torch.no_grad():
            ref = model(input_ids=x).logits[0, -1]
        torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=1e-5)
