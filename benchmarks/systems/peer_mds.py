"""MosaicML Streaming: MDS shards with zstd, written by ``MDSWriter`` and read by
``StreamingDataset`` / ``StreamingDataLoader``.

The packed directory is the dataset's ``remote``; reads go through a ``local`` cache, as
Streaming is used in training: on first access each zstd shard is copied into the cache and
decompressed there (so the cache holds the raw shards; the harness reports its size).
Tensors are stored as ``ndarray`` columns (fixed dtype, and fixed shape where every sample
shares it), ints as ``int``, strs as ``str``, bytes as ``bytes``.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ._schema import UnsupportedSample, infer_schema, load_schema, save_schema
from .abc import PackOptions, System, collate_list

__all__ = ["MosaicMDS"]

_SCHEMA = "bench-schema.json"


def _encoding(c: Any) -> str:
    if c.kind == "tensor":
        return f"ndarray:{c.dtype}" + (":" + ",".join(map(str, c.shape)) if c.shape else "")
    return {"int": "int", "float": "float64", "str": "str", "bytes": "bytes"}[c.kind]


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
            infer_schema([sample])
        except UnsupportedSample as exc:
            return f"MDS columns cannot hold this sample without pickling: {exc}"
        return None

    def pack(self, samples: Sequence[Any], data_dir: Path, options: PackOptions) -> None:
        from streaming import MDSWriter

        schema = infer_schema(samples)
        columns = {c.name: _encoding(c) for c in schema.columns}
        with MDSWriter(out=str(data_dir), columns=columns, compression="zstd", size_limit=options.shard_bytes) as w:
            for s in samples:
                w.write(schema.flatten(s))
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
