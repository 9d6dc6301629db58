"""The JSON round trip shared by the package's config dataclasses (PEFT-style): a type tag, and keys
written by a newer upsafe_ext dropped with a warning instead of failing the load."""
from __future__ import annotations

import dataclasses
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
