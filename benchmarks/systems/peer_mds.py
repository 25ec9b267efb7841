"""MosaicML Streaming: MDS shards with zstd, written by ``MDSWriter`` and read by
``StreamingDataset`` / ``StreamingDataLoader``.

The packed directory is the dataset's ``remote``; reads go through a ``local`` cache, as
Streaming is used in training: on first access each zstd shard is copied into the cache and
decompressed there (so the cache holds the raw shards; the harness reports its size).
Columns use MDS's own encodings: 0-dim tensors its scalar encodings (``int64``,
``float32``...), other tensors ``ndarray`` (fixed dtype, and fixed shape where every sample
shares it), ints ``int``, floats ``float64``, strs ``str``, bytes ``bytes``. MDS has no bool
dtype: bool tensors are written as their uint8 view and viewed back when read. What MDS
cannot hold (empty tensors, dtypes outside its list, ints beyond int64) is reported as
unsupported.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ._schema import Column, Schema, UnsupportedSample, infer_schema, load_schema, save_schema
from .abc import PackOptions, System, collate_list

__all__ = ["MosaicMDS"]

_SCHEMA = "bench-schema.json"


#: The numpy dtypes MDS has encodings for: its ``ndarray`` values and its scalar encodings
#: (named as numpy names them).
_MDS_DTYPES = frozenset(
    ["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32", "float64"]
)
#: dtypes MDS lacks, stored as the listed one of the same item size (a view, no copy).
_STORED_AS = {"bool": "uint8"}
_INT64 = (-(2**63), 2**63 - 1)


def stored_dtype(c: Column) -> str | None:
    """The numpy dtype a tensor column is written as (None for other columns)."""
    return _STORED_AS.get(c.dtype, c.dtype) if c.kind == "tensor" and c.dtype else None


def _encoding(c: Column) -> str:
    """The MDS encoding of a column: a scalar encoding (``int64``, ``float32``...) for 0-dim
    tensors, ``ndarray:DTYPE[:SHAPE]`` for the others (the shape when every sample shares
    it), ``int`` (int64), ``float64``, ``str`` and ``bytes`` for the Python leaves."""
    if c.kind == "tensor":
        dtype = stored_dtype(c)
        if c.shape == ():
            return str(dtype)
        return f"ndarray:{dtype}" + (":" + ",".join(map(str, c.shape)) if c.shape else "")
    return {"int": "int", "float": "float64", "str": "str", "bytes": "bytes"}[c.kind]


def _why_not(schema: Schema, sample: Any, where: str) -> str | None:
    """Why MDS's encodings cannot hold ``sample`` exactly (None if they can)."""
    for c in schema.columns:
        v = sample if schema.container == "tensor" else sample[c.key]
        if c.kind == "tensor":
            dtype = str(v.dtype).removeprefix("torch.")
            if _STORED_AS.get(dtype, dtype) not in _MDS_DTYPES:
                return f"{where}: MDS has no encoding for tensors of dtype {dtype} (leaf {c.key!r})"
            if v.numel() == 0:
                shape = tuple(v.shape)
                return (
                    f"{where}: MDS's ndarray encoding rejects a tensor with no elements (leaf {c.key!r}, shape {shape})"
                )
            if v.dim() == 0 and c.shape != ():
                return (
                    f"{where}: leaf {c.key!r} is 0-dim in some samples only "
                    "(MDS holds scalars and arrays in different encodings)"
                )
        elif c.kind == "int" and not _INT64[0] <= v <= _INT64[1]:
            return f"{where}: MDS stores ints as int64; leaf {c.key!r} holds {v}"
    return None


def _row(schema: Schema, sample: Any) -> dict[str, Any]:
    row = schema.flatten(sample)
    for c in schema.columns:
        if c.dtype in _STORED_AS:
            row[c.name] = row[c.name].view(_STORED_AS[c.dtype])
    return row


class MosaicMDS(System):
    name = "mds-zstd"
    family = "peer"
    label = "MosaicML Streaming, MDS shards, zstd (level 3)"
    modules = ("streaming",)
    requirement = "the bench-peers extra (mosaicml-streaming; needs a torchvision that matches torch)"

    def __init__(self) -> None:
        super().__init__()
        self._live: list[Any] = []
        self._cleaned = False

    def versions(self) -> dict[str, str]:
        import streaming

        return {"mosaicml-streaming": streaming.__version__}

    def unsupported_reason(self, sample: Any) -> str | None:
        try:
            schema = infer_schema([sample])
        except UnsupportedSample as exc:
            return f"MDS columns cannot hold this sample without pickling: {exc}"
        why = _why_not(schema, sample, "the first sample")
        return f"MDS columns cannot hold this sample: {why}" if why else None

    def pack(self, samples: Sequence[Any], data_dir: Path, options: PackOptions) -> None:
        """Write the samples as MDS columns.

        Raises:
            UnsupportedSample: A sample MDS's encodings cannot hold exactly (the message says
                which and why), before anything is written.
        """
        from streaming import MDSWriter

        schema = infer_schema(samples)
        for i, s in enumerate(samples):
            why = _why_not(schema, s, f"sample {i}")
            if why:
                raise UnsupportedSample(why)
        columns = {c.name: _encoding(c) for c in schema.columns}
        with MDSWriter(out=str(data_dir), columns=columns, compression="zstd", size_limit=options.shard_bytes) as w:
            for s in samples:
                w.write(_row(schema, s))
        save_schema(schema, data_dir / _SCHEMA)

    def _dataset(self, data_dir: Path, cache_dir: Path, **kw: Any) -> Any:
        from streaming.base.util import clean_stale_shared_memory

        if self._live:  # Streaming refuses two live datasets on one local directory
            self.close()
        if not self._cleaned:  # "call it only once in your script" (Streaming's advice)
            clean_stale_shared_memory()
            self._cleaned = True
        schema = load_schema(data_dir / _SCHEMA)
        from ._mds_dataset import SampleDataset

        ds = SampleDataset(schema=schema, remote=str(data_dir), local=str(cache_dir), **kw)
        self._live.append(ds)
        return ds

    def iterate(self, data_dir: Path, cache_dir: Path) -> Iterator[Any]:
        yield from self._dataset(data_dir, cache_dir, shuffle=False, batch_size=1)

    def sequential_dataset(self, data_dir: Path, cache_dir: Path) -> Iterable[Any]:
        """One open ``StreamingDataset``: a later pass reads the shards it decompressed into its cache."""
        return self._dataset(data_dir, cache_dir, shuffle=False, batch_size=1)

    def random_access(self, data_dir: Path, cache_dir: Path) -> Callable[[int], Any]:
        return self._dataset(data_dir, cache_dir, shuffle=False, batch_size=1).__getitem__

    def loader(
        self, data_dir: Path, cache_dir: Path, *, num_workers: int, batch_size: int, seed: int
    ) -> Iterable[list[Any]]:
        from streaming import StreamingDataLoader

        ds = self._dataset(data_dir, cache_dir, shuffle=True, shuffle_seed=seed, batch_size=batch_size)
        return StreamingDataLoader(
            ds,
            batch_size=batch_size,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            collate_fn=collate_list,
        )

    def close(self) -> None:
        """Drop the live dataset; a collection frees it now (its threads hold cycles)."""
        self._live.clear()
        gc.collect()
