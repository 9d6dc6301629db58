"""The one way the package writes an output folder: into a temporary sibling, renamed into place only when
everything is written (a crash leaves the old folder, or nothing, never half a checkpoint), and never into
a folder the same call reads from.

    with atomic_dir(out, inputs=[model_dir], arg="out") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterable, Iterator


def _real(path) -> str:
    return os.path.realpath(os.fspath(path))


def check_not_input(out, inputs: Iterable = (), arg: str = "out") -> str:
    """`out` as an absolute path; ValueError naming `arg` when it is, contains or lies inside an input."""
    if out is None or os.fspath(out) == "":
        raise ValueError(f"`{arg}` must be a folder path, got {out!r}")
    target = _real(out)
    for src in inputs:
        if src is None or not os.path.exists(os.fspath(src)):
            continue  # hub ids, built-in names: nothing on disk to overwrite
        s = _real(src)
        if target == s or target.startswith(s + os.sep) or s.startswith(target + os.sep):
            raise ValueError(f"`{arg}`={os.fspath(out)!r} would overwrite the input {os.fspath(src)!r}; "
                             f"choose another output folder")
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"`{arg}`={os.fspath(out)!r} exists and is not a folder")
    return target


@contextlib.contextmanager
def atomic_dir(out, inputs: Iterable = (), arg: str = "out") -> Iterator[str]:
    """Yield a fresh temporary folder beside `out`; on a clean exit it replaces `out` (an existing `out` is
    moved aside first and removed only after the new one is in place). On an exception the temporary
    folder is removed and `out` is untouched."""
    target = check_not_input(out, inputs, arg)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path, mode: int | None = None) -> Iterator[str]:
    """Yield a temporary file path beside `path` (permissions `mode` when given, e.g. 0o600); on a clean
    exit it is renamed over `path`, on an exception removed (`path` untouched)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
