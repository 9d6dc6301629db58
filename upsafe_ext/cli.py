"""`upsafe` command line. Each subcommand imports what it needs lazily, so `upsafe info` is instant.

Every command that runs a model takes ``--model`` / ``--device`` / ``--dtype`` (``upsafe_ext.models``), and
every command that trains writes its result to a folder (a default under ``upsafe_out/``, printed)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .models import add_device_args

# Each method package contributes its subcommands through `register(subparsers)` in its cli.py,
# so adding a method means adding a folder, not editing this file's parser.
COMMAND_MODULES = ["upsafe_ext.eval.cli", "upsafe_ext.upcycle.cli", "upsafe_ext.esi.cli", "upsafe_ext.magic.cli"]


def _cmd_info(args) -> int:
    from . import info

    return info.main(["--json"] if args.json else [])


def _cmd_route_demo(args) -> int:
    """Route random logits at a few temperatures and show how the selection sharpens."""
    import torch

    from .models import resolve_device, resolve_dtype
    from .ops import sparse_route

    torch.manual_seed(0)
    try:
        device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    except ValueError as exc:
        raise SystemExit(f"upsafe route-demo: {exc}") from None
    logits = torch.randn(args.tokens, args.experts, device=device, dtype=dtype)
    print(f"sparse_route on {device}: T={args.tokens}, E={args.experts}, k={args.k}, min_weight={args.min_weight}")
    for tau in (0.25, 0.5, 1.0, 2.0):
        r = sparse_route(logits, args.k, temperature=tau, min_weight=args.min_weight)
        kept = int(r.offsets[-1])
        print(f"  T={tau:<4}  slots kept {kept:6d}/{args.tokens * args.k}  mean top-1 weight "
              f"{r.weights[:, 0].mean().item():.3f}  tokens per expert {r.counts.tolist()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="upsafe", description="Controllable LLM safety (upsafe_ext)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="version, torch, CUDA and which kernels were compiled")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_info)
    p = sub.add_parser("route-demo", help="sparse routing at several temperatures on random logits")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--min-weight", type=float, default=0.1)
    add_device_args(p)
    p.set_defaults(fn=_cmd_route_demo)
    registered: set[str] = set()
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name in (name, name.rsplit(".", 1)[0]):
                continue  # that method's package is not part of this build
            raise
        registered.update(mod.register(sub) or ())
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
