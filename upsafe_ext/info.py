"""`python -m upsafe_ext.info` / `upsafe info`: version, torch, CUDA, and which kernels were built."""
from __future__ import annotations

import json
import platform
import sys

import torch

from . import __version__, _ext

OPS = [
    "sparse_route", "sparse_route_backward", "grouped_expert_mlp", "grouped_expert_mlp_backward",
    "esi_accumulate_", "esi_histogram", "esi_select", "esi_mark_", "esi_sparse_adamw_",
]


def collect() -> dict:
    build = _ext.build_info()
    info = {
        "upsafe_ext": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extension_loaded": _ext.loaded(),
        "build": build,
        "kernels": {},
    }
    if _ext.loaded():
        for op in OPS:
            try:
                info["kernels"][op] = [d for d in ("cpu", "cuda") if _ext.has_kernel(op, d)]
            except RuntimeError:
                info["kernels"][op] = []
    return info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    if "--json" in argv:
        print(json.dumps(info, indent=2))
        return 0
    b = info["build"]
    print(f"upsafe_ext {info['upsafe_ext']}  (python {info['python']})")
    print(f"torch {info['torch']}  cuda build: {info['torch_cuda']}  cuda available: {info['cuda_available']}"
          + (f"  [{info['gpu']}]" if info["gpu"] else ""))
    if not info["extension_loaded"]:
        print(f"compiled extension: NOT LOADED ({b.get('error')})")
        return 1
    archs = b.get("cuda_archs") or "-"
    print(f"compiled extension: built against torch {b['torch_built']}, CUDA kernels: "
          f"{'yes' if b['with_cuda'] else 'no'} (archs {archs})")
    for op, devs in info["kernels"].items():
        print(f"  {op:32s} {', '.join(devs) if devs else 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
