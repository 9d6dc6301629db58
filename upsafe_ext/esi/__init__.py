"""ESI: Expected Safety Impact scoring, global top-p selection, and SET / SPA sparse training
(arXiv 2604.08297; see docs in METHODS.md §2).

    from upsafe_ext.esi import compute_esi, SparseAdamW
    scores = compute_esi(model, tok, harmful_prompts, batch_size=8)      # name -> fp32 scores
    mask = scores.select(fraction=0.01)                                 # exact global top-1%
    opt = SparseAdamW(model, mask, mode="set", lr=1e-4)                 # SET: train only those
    # or SparseAdamW(model, mask, mode="spa") to fine-tune with them frozen bit for bit

Layers: kernels ``csrc/esi`` -> ops ``upsafe_ext.ops.esi`` -> this package (objectives, scores, mask,
optimizer, training loops, plots, CLI ``upsafe esi ...``).
"""
from .config import DEFAULT_EXCLUDE, ESIConfig, SparseTrainConfig
from .mask import SafetyMask
from .objectives import JudgeObjective, RefusalObjective, build_transfer_matrix
from .optim import SparseAdamW
from .scores import ESIScores, compute_esi, eligible_parameters, esi_reference
from .train import TrainResult, own_replies, run_set, run_spa

__all__ = [
    "compute_esi", "ESIScores", "SafetyMask", "SparseAdamW", "RefusalObjective", "JudgeObjective", "ESIConfig",
    "SparseTrainConfig", "DEFAULT_EXCLUDE", "build_transfer_matrix", "eligible_parameters", "esi_reference",
    "run_set", "run_spa", "own_replies", "TrainResult",
]
