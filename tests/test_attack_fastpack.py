"""Attacks on the fast packing path: ``serialization.dumps``'s save templates must give
``torch.save``'s own bytes whatever the sample (computed here independently with
``torch.save``), and the parallel writer must give the ``num_workers=0`` store."""

from __future__ import annotations

import io

import pytest
import torch

from tensorstore_pt import serialization as ser


def _torch_save(sample):
    buf = io.BytesIO()
    torch.save(ser.compact(sample), buf)
    return buf.getvalue()


def _fresh(word: str) -> str:
    """An equal string that is a new object (not the interned one)."""
    out = "".join(list(word))
    if len(word) > 1:
        assert out is not word  # test premise, not validation
    return out


@pytest.fixture
def templates(monkeypatch):
    fresh = ser._SaveTemplates()
    monkeypatch.setattr(ser, "_TEMPLATES", fresh)
    return fresh


@pytest.mark.parametrize("word", ["storage", "cpu", "latin1"])
@pytest.mark.parametrize("interned_first", [True, False])
def test_user_string_equal_to_a_pickler_string(templates, word, interned_first):
    """torch.save's pickle writes the interned strings 'storage' and 'cpu' (a storage's
    persistent id) and 'latin1' (bytes under protocol 2) through pickle's memo, which works
    by object identity: a user's interned 'storage' becomes a memo reference, an equal string
    built at run time does not. Two samples equal in value but not in that identity must not
    share a template."""
    interned = (torch.arange(4.0), word, b"xy")
    built = (torch.arange(4.0) + 1, _fresh(word), b"xy")
    first, second = (interned, built) if interned_first else (built, interned)
    assert ser.dumps(first) == _torch_save(first)
    assert ser.dumps(second) == _torch_save(second)
    assert ser.dumps(interned) == _torch_save(interned)
    assert ser.dumps(built) == _torch_save(built)
