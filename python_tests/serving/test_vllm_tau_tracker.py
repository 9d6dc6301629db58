"""The per-request τ bookkeeping inside vLLM's worker, without a server: batch-row tracking through
vLLM's BatchUpdate (add / remove / move / swap) and the per-token routing bias the model reads."""
import math
from types import SimpleNamespace

import pytest
from serving_cases import VLLM_VENV_REASON

pytest.importorskip("vllm", reason=VLLM_VENV_REASON)

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from upsafe_ext.serving import request_tau, vllm_model  # noqa: E402
from upsafe_ext.upcycle.layer import safety_logit  # noqa: E402


def sp(tau=None):
    return SamplingParams(extra_args=None if tau is None else {"safety_temperature": tau})


def update(batch_size, removed=(), added=(), moved=()):
    return BatchUpdate(batch_size=batch_size, removed=list(removed),
                       added=[(i, p, [], []) for i, p in added], moved=list(moved))


def test_validate_params_rejects_bad_tau():
    request_tau.SafetyTemperatureTracker.validate_params(sp(0.2))
    with pytest.raises(ValueError, match="safety_temperature"):
        request_tau.SafetyTemperatureTracker.validate_params(sp(3.0))


def test_tracker_follows_adds_removes_moves_and_swaps():
    tr = request_tau.SafetyTemperatureTracker(None, torch.device("cpu"), False)
    assert request_tau.active_tracker() is tr
    tr.update_state(update(3, added=[(0, sp(0.1)), (1, sp()), (2, sp(0.9))]))
    assert tr.request_temperatures(3, 0.5) == [0.1, 0.5, 0.9]
    tr.update_state(update(2, removed=[0], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert tr.request_temperatures(2, 0.5) == [0.9, 0.5]
    tr.update_state(update(2, moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert tr.request_temperatures(2, 0.5) == [0.5, 0.9]
    tr.update_state(update(2, added=[(1, sp(0.0))]))  # a new request takes a freed row
    assert tr.request_temperatures(2, 0.5) == [0.5, 0.0]
    step = tr.step
    tr.update_state(None)
    assert tr.step == step + 1
    assert tr.apply(torch.ones(2, 3)).sum() == 6


def fake_step(monkeypatch, query_start_loc):
    md = {"layer0": SimpleNamespace(query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32))}
    monkeypatch.setattr(vllm_model, "is_forward_context_available", lambda: True)
    monkeypatch.setattr(vllm_model, "get_forward_context", lambda: SimpleNamespace(attn_metadata=md))


def test_routing_bias_maps_each_token_to_its_request(monkeypatch):
    tr = request_tau.SafetyTemperatureTracker(None, torch.device("cpu"), False)
    tr.update_state(update(3, added=[(0, sp(0.2)), (1, sp()), (2, sp(1.0))]))
    fake_step(monkeypatch, [0, 3, 4, 6])  # 3 prefill tokens, 1 decode token, 2 tokens; +1 padding below
    bias = vllm_model.token_routing_bias(7, 3, 0.5, torch.device("cpu"))
    rows = [0, 0, 0, 1, 2, 2, 1]  # the padding token gets the default τ (= row 1's)
    taus = [0.2, 0.5, 1.0]
    for t, r in enumerate(rows):
        g, s = safety_logit(taus[r])
        assert torch.equal(bias[t], torch.tensor([g, s, s], dtype=torch.float32)), (t, bias[t])
    assert math.isinf(bias[5, 0]) and bias[5, 1] == 0


def test_routing_bias_shortcuts(monkeypatch):
    tr = request_tau.SafetyTemperatureTracker(None, torch.device("cpu"), False)
    tr.update_state(update(2, added=[(0, sp()), (1, sp(0.5))]))
    fake_step(monkeypatch, [0, 2, 3])
    assert vllm_model.token_routing_bias(3, 2, 0.5, torch.device("cpu")) is None  # τ = 0.5 everywhere
    tr.update_state(update(2, added=[(0, sp(0.3)), (1, sp(0.3))]))
    bias = vllm_model.token_routing_bias(3, 2, 0.5, torch.device("cpu"))
    assert bias.shape == (2,) and bias.tolist() == [0.0, pytest.approx(math.log(0.3 / 0.7))]
    monkeypatch.setattr(vllm_model, "is_forward_context_available", lambda: False)  # a warm-up run
    assert vllm_model.token_routing_bias(5, 2, 0.5, torch.device("cpu")) is None
