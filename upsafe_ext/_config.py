"""The JSON round trip shared by the package's config dataclasses (PEFT-style): a type tag, and keys
written by a newer upsafe_ext dropped with a warning instead of failing the load; and the argument checks
the configs validate their fields with (errors name the field and say what was expected)."""
from __future__ import annotations

import dataclasses
import math
import warnings


class SerialisableConfig:
    """Mixin for dataclasses: ``to_dict()`` (tuples as lists, as JSON stores them), ``from_dict(d)`` and
    ``resolve(config, overrides, op)`` (a config plus keyword overrides, as the library functions take them)."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return {"type": type(self).__name__, **d}

    @classmethod
    def resolve(cls, config, overrides: dict, op: str):
        """`config` (or the defaults) with keyword `overrides` applied; errors name `op` and the bad keys."""
        if config is not None and not isinstance(config, cls):
            raise ValueError(f"{op}: `config` must be an instance of {cls.__name__}, got {type(config).__name__}")
        cfg = config or cls()
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"{op}: unknown keyword argument(s) {bad}; {cls.__name__} fields are "
                             f"{sorted(known - {'version'})}")
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}.from_dict: expected a dict, got {type(d).__name__}")
        d = dict(d)
        kind = d.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"{cls.__name__}.from_dict: not a {cls.__name__} (type={kind!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:  # written by a newer upsafe_ext: keep what we understand
            warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown} (saved by a newer upsafe_ext? upgrade)",
                          stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in known})


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *, optional: bool = False) -> None:
    """ValueError naming `name` unless `value` is an int (not a bool) in [`lo`, `hi`] (either bound may be
    None: unbounded), or None when `optional`."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) or \
            (hi is not None and value > hi):
        bound = ""
        if lo is not None and hi is not None:
            bound = f" in [{lo}, {hi}]"
        elif lo is not None or hi is not None:
            bound = f" >= {lo}" if lo is not None else f" <= {hi}"
        raise ValueError(f"{name} must be an int{bound}{' or None' if optional else ''}, got {value!r}")


def check_float(name: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False, *, optional: bool = False) -> None:
    """ValueError naming `name` unless `value` is a finite real number in the given range (or None when
    `optional`)."""
    if optional and value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be a finite float in {rng}{' or None' if optional else ''}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """ValueError naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
