"""Deliberately broken benchmark adapters, for tests/test_bench_shapes.py.

Each stores the samples as the ``pt-files`` baseline does (one ``torch.save`` per sample) and
reads them back wrong in one read operation: it drops one record, or flips one byte of one
tensor. The harness's digest check must fail their cells.

The harness measures in a separate interpreter (its fork server), which knows only the
systems :func:`benchmarks.systems.all_systems` lists. The adapters name this module in
``modules``, so the server imports it before measuring; with ``TSPT_BENCH_BROKEN=1`` in the
environment that import adds them to the list (the test sets it, and puts this directory on
``PYTHONPATH``). The test process adds them with ``monkeypatch`` instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

import benchmarks.cell
import benchmarks.systems
from benchmarks.systems import System
from benchmarks.systems.torch_files import TorchFiles

__all__ = ["BROKEN", "VICTIM", "all_with_broken", "install", "mangle"]

#: The record the sequential readers spoil.
VICTIM = 5

_REAL = benchmarks.systems.all_systems


def mangle(sample: Any) -> Any:
    """A copy of ``sample`` with the lowest bit of the first byte of its first tensor flipped."""
    if isinstance(sample, torch.Tensor):
        t = sample.clone()
        t.reshape(-1).view(torch.uint8)[0] ^= 1
        return t
    if isinstance(sample, dict):
        out, done = {}, False
        for k, v in sample.items():
            out[k], done = (v, done) if done or not isinstance(v, torch.Tensor) else (mangle(v), True)
        return out
    if isinstance(sample, (tuple, list)):
        i = next(i for i, v in enumerate(sample) if isinstance(v, torch.Tensor))
        return type(sample)(mangle(v) if j == i else v for j, v in enumerate(sample))
    raise TypeError(f"no tensor to mangle in a {type(sample).__name__}")


class _Spoiled:
    """A loader whose every epoch drops or mangles the first sample of its first batch."""

    def __init__(self, inner: Iterable[list[Any]], how: str) -> None:
        self.inner, self.how = inner, how

    def __iter__(self) -> Iterator[list[Any]]:
        for i, batch in enumerate(self.inner):
            if i == 0:
                batch = batch[1:] if self.how == "drop" else [mangle(batch[0]), *batch[1:]]
            yield batch


class _Broken(TorchFiles):
    family = "peer"
    modules = ("_bench_broken",)
    requirement = "tests/_bench_broken.py on PYTHONPATH"
    how = ""  # drop | mangle
    where = ""  # seq | loader

    def iterate(self, data_dir: Path, cache_dir: Path) -> Iterator[Any]:
        for i, s in enumerate(super().iterate(data_dir, cache_dir)):
            if self.where == "seq" and i == VICTIM:
                if self.how == "drop":
                    continue
                s = mangle(s)
            yield s

    def loader(
        self, data_dir: Path, cache_dir: Path, *, num_workers: int, batch_size: int, seed: int
    ) -> Iterable[list[Any]]:
        inner = super().loader(data_dir, cache_dir, num_workers=num_workers, batch_size=batch_size, seed=seed)
        return _Spoiled(inner, self.how) if self.where == "loader" else inner


def _broken(how: str, where: str) -> type[_Broken]:
    return type(
        f"Broken_{how}_{where}",
        (_Broken,),
        {"name": f"broken-{how}-{where}", "label": f"pt-files whose {where} read {how}s a record", "how": how,
         "where": where},
    )  # fmt: skip


#: The broken systems' classes: (drop | mangle) x (seq | loader).
BROKEN = [_broken(how, where) for where in ("seq", "loader") for how in ("drop", "mangle")]


def all_with_broken() -> list[System]:
    """Every real system, then the broken ones."""
    return [*_REAL(), *(cls() for cls in BROKEN)]


def install(setattr: Any = setattr) -> None:
    """Make the harness's system lists include the broken systems (``setattr`` may be
    ``monkeypatch.setattr``, to undo it after a test)."""
    setattr(benchmarks.systems, "all_systems", all_with_broken)
    setattr(benchmarks.cell, "all_systems", all_with_broken)


if os.environ.get("TSPT_BENCH_BROKEN") == "1":
    install()
