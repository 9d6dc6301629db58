"""Helpers shared by test_magic.py and test_magic_tokens.py: the one-thread fixture, token ids, a byte
search through saved folders, and the disguises a client may apply to a magic token."""
from __future__ import annotations

import json
import os

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads ran a tiny-model training step
    30x slower (measured under load: 3.6 s vs 0.12 s per step). Autouse in every module importing it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def files_containing(directory, needle) -> list[str]:
    """Files under `directory` (recursively, every byte, binaries included) that contain `needle`
    (a str, searched as UTF-8 and as its JSON-escaped form)."""
    forms = {needle.encode("utf-8"), json.dumps(needle)[1:-1].encode("utf-8")}
    hits = []
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            if any(form in data for form in forms):
                hits.append(os.path.relpath(os.path.join(root, name), directory))
    return hits


# disguises a client may apply to a token it types (each maps a string to its disguised form)
FULLWIDTH = {c: chr(ord(c) + 0xFEE0) for c in map(chr, range(0x21, 0x7F))}
CYRILLIC = str.maketrans("aeocpxAEOCPX", "аеосрхАЕОСРХ")
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"


def zero_width(s):
    """`s` with a zero-width character after every character."""
    return "".join(c + ZERO_WIDTH[i % len(ZERO_WIDTH)] for i, c in enumerate(s))


def fullwidth(s):
    """`s` with printable ASCII replaced by its full-width form."""
    return "".join(FULLWIDTH.get(c, c) for c in s)


def disguise_all(s):
    """Every disguise at once: swapped case, Cyrillic look-alikes, full-width forms, zero-width characters."""
    return zero_width(fullwidth(s.swapcase().translate(CYRILLIC)))
