"""Shared by the merge suites (tests/test_merge.py, tests/test_merge_attack.py): small samples,
parts written from slices of them, the records a store gives back, and a merge killed after
its n-th step."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

import tensorstore_pt as ts
from tensorstore_pt import merge as merge_mod


def sample(i: int) -> dict:
    """``{"x": uint8 [3, 12, 12] (seeded by i), "y": i}``."""
    g = torch.Generator().manual_seed(i)
    return {"x": torch.randint(0, 8, (3, 12, 12), dtype=torch.uint8, generator=g), "y": i}


def write_parts(root: Path, samples: Sequence[dict], splits: Sequence[tuple[int, int]], **options: Any) -> list[Path]:
    """One part store ``root/part-k`` of ``samples[a:b]`` for each ``(a, b)`` in ``splits``."""
    parts = []
    for k, (a, b) in enumerate(splits):
        part = root / f"part-{k}"
        ts.write_store(samples[a:b], part, **options)
        parts.append(part)
    return parts


def pairs(samples: Sequence[dict]) -> list[tuple[int, bytes]]:
    """``(y, bytes of x)`` of each sample: what :func:`records` must give back."""
    return [(s["y"], s["x"].numpy().tobytes()) for s in samples]


def records(path: Path) -> list[tuple[int, bytes]]:
    """``(y, bytes of x)`` of each record of the store at ``path``, in record order."""
    reader = ts.open_store(path)
    return pairs([reader[i] for i in range(len(reader))])


class Crash(Exception):
    """The injected death of a merge."""


def crash_after_steps(monkeypatch: Any, n: int) -> None:
    """Make the merge raise :class:`Crash` instead of taking its step number ``n`` (0-based)."""
    real = merge_mod._Merge._do_step
    count = {"n": 0}

    def step(self: Any, s: Any) -> None:
        if count["n"] == n:
            raise Crash(f"after {n} steps")
        count["n"] += 1
        real(self, s)

    monkeypatch.setattr(merge_mod._Merge, "_do_step", step)
