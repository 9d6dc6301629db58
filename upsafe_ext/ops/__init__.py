"""Thin Python wrappers over the registered `torch.ops.upsafe` kernels.

Each op has: a public function (docstring gives shapes, dtypes and the formula), a fake (meta)
implementation for torch.compile, autograd through `torch.library.register_autograd`, and a
plain-PyTorch reference next to it that the tests compare against.
"""
from .grouped_mlp import grouped_expert_mlp, grouped_expert_mlp_reference
from .routing import RoutingResult, sparse_route, sparse_route_reference

__all__ = ["RoutingResult", "sparse_route", "sparse_route_reference", "grouped_expert_mlp",
           "grouped_expert_mlp_reference"]
from .esi import esi_accumulate_, esi_histogram, select_topk, select_topk_reference, sparse_adamw_  # noqa: E402

__all__ += ["esi_accumulate_", "esi_histogram", "select_topk", "select_topk_reference", "sparse_adamw_"]
