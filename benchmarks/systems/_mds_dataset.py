"""The StreamingDataset subclass used by the MDS adapter (imports ``streaming``; imported
only when the MDS system runs). Overriding ``__getitem__`` is Streaming's documented way to
transform items; iteration goes through it too, so samples are rebuilt inside the workers."""

from __future__ import annotations

from typing import Any

import numpy as np
from streaming import StreamingDataset

from ._schema import Schema
from .peer_mds import stored_dtype

__all__ = ["SampleDataset"]


class SampleDataset(StreamingDataset):  # type: ignore[misc]
    """A StreamingDataset whose items are the original samples (tensors, ints, strs)."""

    def __init__(self, *, schema: Schema, **kw: Any) -> None:
        super().__init__(**kw)
        self.schema = schema

    def __getitem__(self, idx: Any) -> Any:
        row = super().__getitem__(idx)
        for c in self.schema.columns:
            if c.kind == "tensor" and stored_dtype(c) != c.dtype:  # a bool tensor written as uint8
                row[c.name] = np.asarray(row[c.name]).view(c.dtype)
        return self.schema.unflatten(row)
