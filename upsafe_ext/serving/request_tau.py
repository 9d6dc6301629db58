"""Per-request safety temperature inside vLLM: validated at the API boundary, tracked per batch row.

vLLM flattens the tokens of every scheduled request into one ``[num_tokens, H]`` batch and never
hands ``SamplingParams`` to the model. Its logits-processor interface is the supported road from a
request's ``extra_args`` to the worker (the road vLLM documents for "custom arguments"):

* ``validate_params`` runs in the API server for every request; a ValueError there becomes an
  HTTP 400 with our message, before the request reaches the engine;
* ``update_state`` runs in the worker once per step, after the persistent batch was condensed and
  reordered and *before* the forward pass, with every row added, removed, moved or swapped.

:class:`SafetyTemperatureTracker` keeps ``row -> τ`` from those updates (rows without a τ are left
out: the model uses its saved default) and publishes itself as the process's active tracker, which
:mod:`upsafe_ext.serving.vllm_model` reads inside the forward pass. Its ``apply`` is the identity.
"""
from __future__ import annotations

import threading

import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .params import parse_safety_temperature

_lock = threading.Lock()
_active: "SafetyTemperatureTracker | None" = None


def active_tracker() -> "SafetyTemperatureTracker | None":
    """The tracker of this worker's persistent batch (None before the engine built one)."""
    return _active


class SafetyTemperatureTracker(LogitsProcessor):
    """A no-op logits processor that records each batch row's ``safety_temperature``.

    Loaded by vLLM from the ``vllm.logits_processors`` entry point in every engine of this venv; for a
    model without safety MoE layers it only validates and records (a few dict operations per step).
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        parse_safety_temperature(sampling_params.extra_args)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        global _active
        self.row_tau: dict[int, float] = {}
        self.step = 0  # bumped on every update: the model caches its per-token τ per step
        with _lock:
            _active = self

    def is_argmax_invariant(self) -> bool:
        return True  # apply() never changes the logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.step += 1
        if not batch_update:
            return
        rows = self.row_tau
        for index in batch_update.removed:
            rows.pop(index, None)
        for index, params, _prompt, _output in batch_update.added:
            tau = parse_safety_temperature(params.extra_args) if params is not None else None
            if tau is None:
                rows.pop(index, None)
            else:
                rows[index] = tau
        for a, b, direction in batch_update.moved:
            ta, tb = rows.pop(a, None), rows.pop(b, None)
            if ta is not None:
                rows[b] = ta
            if tb is not None and direction == MoveDirectionality.SWAP:
                rows[a] = tb

    def request_temperatures(self, num_reqs: int, default: float) -> list[float]:
        """τ of batch rows ``0..num_reqs-1`` (``default`` where the request set none)."""
        rows = self.row_tau
        return [rows.get(i, default) for i in range(num_reqs)]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
