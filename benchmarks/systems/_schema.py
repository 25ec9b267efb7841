"""Column schemas for peers that store named fields, not pickled samples (MDS, WebDataset).

A sample is a dict with string keys, a tuple or list, or a bare tensor, whose leaves are
tensors (of a dtype numpy has), ints, floats, strs or bytes, with the same keys and leaf
types in every sample. Each leaf becomes one column ``c0``, ``c1``, ...; tensors travel as
numpy arrays (no copy) and come back through ``torch.from_numpy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["Column", "Schema", "UnsupportedSample", "infer_schema", "load_schema", "save_schema"]


class UnsupportedSample(ValueError):
    """The samples cannot be stored as columns without pickling; the message says why."""


@dataclass(frozen=True)
class Column:
    """One leaf of the sample.

    Attributes:
        name: Column name (``c0``...).
        key: The leaf's key in the sample (dict key or tuple position); None for a bare tensor.
        kind: ``tensor``, ``int``, ``float``, ``str`` or ``bytes``.
        dtype: numpy dtype name of a tensor column.
        shape: The common shape of a tensor column, or None if shapes differ.
    """

    name: str
    key: Any
    kind: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Schema:
    """How samples map to columns and back.

    Attributes:
        container: ``dict``, ``tuple``, ``list`` or ``tensor``.
        columns: One per leaf, in the sample's order.
    """

    container: str
    columns: tuple[Column, ...]

    def flatten(self, sample: Any) -> dict[str, Any]:
        """Sample -> ``{column name: numpy array | int | float | str | bytes}``."""
        if self.container == "tensor":
            return {self.columns[0].name: sample.numpy()}
        return {c.name: (sample[c.key].numpy() if c.kind == "tensor" else sample[c.key]) for c in self.columns}

    def unflatten(self, row: dict[str, Any]) -> Any:
        """``{column name: value}`` -> the sample as written (tensors via ``torch.from_numpy``;
        a tensor's value may be a numpy array or, for a 0-dim tensor, a numpy scalar)."""
        import numpy as np
        import torch

        def leaf(c: Column) -> Any:
            v = row[c.name]
            if c.kind == "tensor":  # asarray: a 0-dim tensor may come back as a numpy scalar
                return torch.from_numpy(np.asarray(v))
            return _CAST[c.kind](v)  # numpy scalars from some readers -> the builtin type

        if self.container == "tensor":
            return leaf(self.columns[0])
        if self.container == "dict":
            return {c.key: leaf(c) for c in self.columns}
        values = [leaf(c) for c in self.columns]
        return tuple(values) if self.container == "tuple" else values


_CAST = {"int": int, "float": float, "str": str, "bytes": bytes}


def _leaf_kind(v: Any) -> str:
    import numpy as np
    import torch

    if type(v) is torch.Tensor:
        try:
            np.dtype(str(v.dtype).removeprefix("torch."))
        except TypeError:
            raise UnsupportedSample(f"tensor dtype {v.dtype} has no numpy equivalent") from None
        if v.is_sparse or v.is_quantized:
            raise UnsupportedSample("sparse or quantized tensors have no numpy equivalent")
        return "tensor"
    for kind, t in (("int", int), ("float", float), ("str", str), ("bytes", bytes)):
        if type(v) is t:
            return kind
    raise UnsupportedSample(f"a leaf of type {type(v).__name__} (supported: tensor, int, float, str, bytes)")


def infer_schema(samples: Sequence[Any]) -> Schema:
    """The schema shared by all ``samples``.

    Raises:
        UnsupportedSample: Nested containers, unsupported leaf types or dtypes, or samples
            whose keys or leaf types differ.
    """
    import torch

    if not samples:
        raise UnsupportedSample("no samples")
    first = samples[0]
    if type(first) is torch.Tensor:
        container, keys = "tensor", [None]
    elif isinstance(first, dict) and all(isinstance(k, str) for k in first):
        container, keys = "dict", list(first)
    elif type(first) in (tuple, list):
        container, keys = type(first).__name__, list(range(len(first)))
    else:
        raise UnsupportedSample(f"a sample of type {type(first).__name__} (supported: dict, tuple, list, tensor)")

    def leaves(s: Any) -> list[Any]:
        return [s] if container == "tensor" else [s[k] for k in keys]

    kinds = [_leaf_kind(v) for v in leaves(first)]
    shapes: list[tuple[int, ...] | None] = [
        tuple(v.shape) if k == "tensor" else None for v, k in zip(leaves(first), kinds)
    ]
    dtypes = [str(v.dtype).removeprefix("torch.") if k == "tensor" else None for v, k in zip(leaves(first), kinds)]
    for i, s in enumerate(samples):
        shape_ok = (
            (container == "tensor" and type(s) is torch.Tensor)
            or (container == "dict" and isinstance(s, dict) and list(s) == keys)
            or (container in ("tuple", "list") and type(s).__name__ == container and len(s) == len(keys))
        )
        if not shape_ok:
            raise UnsupportedSample(f"sample {i} has another structure than sample 0")
        for j, v in enumerate(leaves(s)):
            if _leaf_kind(v) != kinds[j] or (kinds[j] == "tensor" and str(v.dtype).removeprefix("torch.") != dtypes[j]):
                raise UnsupportedSample(f"sample {i}: leaf {keys[j]!r} changes type or dtype")
            if kinds[j] == "tensor" and shapes[j] is not None and tuple(v.shape) != shapes[j]:
                shapes[j] = None
    columns = tuple(
        Column(name=f"c{j}", key=keys[j], kind=kinds[j], dtype=dtypes[j], shape=shapes[j]) for j in range(len(keys))
    )
    return Schema(container=container, columns=columns)


def save_schema(schema: Schema, path: Any) -> None:
    """Write the schema as a small JSON sidecar (counted in the system's bytes on disk)."""
    import dataclasses
    import json

    with open(path, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(schema), f)


def load_schema(path: Any) -> Schema:
    """Read a schema written by :func:`save_schema`."""
    import json

    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    cols = tuple(Column(**{**c, "shape": tuple(c["shape"]) if c["shape"] is not None else None}) for c in d["columns"])
    return Schema(container=d["container"], columns=cols)
