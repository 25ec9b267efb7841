"""WebDataset: plain tar shards written by ``ShardWriter`` and read by ``WebDataset`` /
``WebLoader``.

Each sample is one group of tar members keyed ``NNNNNNNN``: tensors as ``.npy`` (numpy's
format, decoded by webdataset's default decoder), ints as ``.cls``, floats as ``.json``, strs
as ``.txt``, bytes as ``.bin``. Tar shards have no index, so there is no random access (reported as n/a).
Training order comes from shard shuffling plus a 1,000-sample shuffle buffer, the
documented recipe; the DataLoader batches inside the pipeline (``.batched``) and
``WebLoader`` runs with ``batch_size=None`` and a ``collate_fn`` that hands the batch on as
it is (the DataLoader's default for ``batch_size=None``, ``default_convert``, would turn the
tuples of a sample into lists).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ._schema import Schema, UnsupportedSample, infer_schema, load_schema, save_schema
from .abc import PackOptions, System

__all__ = ["WebDatasetTar"]

_SCHEMA = "bench-schema.json"
_EXT = {"tensor": "npy", "int": "cls", "float": "json", "str": "txt", "bytes": "bin"}


def _urls(data_dir: Path) -> list[str]:
    return sorted(glob.glob(str(data_dir / "*.tar")))


class _Unflatten:
    """Picklable map: a decoded webdataset sample -> ``(original sample,)``.

    The 1-tuple matters: webdataset's ``map`` copies ``__key__`` into any dict it returns,
    which would add a key the written sample did not have."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.keys = {c.name: f"{c.name}.{_EXT[c.kind]}" for c in schema.columns}

    def __call__(self, d: dict[str, Any]) -> tuple[Any]:
        return (self.schema.unflatten({name: d[key] for name, key in self.keys.items()}),)


def _unwrap_batch(batch: list[tuple[Any]]) -> list[Any]:
    return [t[0] for t in batch]


def _as_is(batch: list[Any]) -> list[Any]:
    """The DataLoader's ``collate_fn``: the batch ``.batched`` made, untouched. Without it, a
    DataLoader with ``batch_size=None`` applies torch's ``default_convert`` to each batch,
    which turns every tuple inside into a list (and numpy arrays into tensors)."""
    return batch


class WebDatasetTar(System):
    name = "wds-tar"
    family = "peer"
    label = "WebDataset, tar shards (uncompressed)"
    modules = ("webdataset",)
    requirement = "the bench-peers extra (webdataset)"

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"webdataset": version("webdataset")}

    def unsupported_reason(self, sample: Any) -> str | None:
        try:
            infer_schema([sample])
        except UnsupportedSample as exc:
            return f"tar members cannot hold this sample without pickling: {exc}"
        return None

    def pack(self, samples: Sequence[Any], data_dir: Path, options: PackOptions) -> None:
        import webdataset as wds

        schema = infer_schema(samples)
        with wds.ShardWriter(str(data_dir / "shard-%06d.tar"), maxsize=options.shard_bytes, verbose=0) as w:
            for i, s in enumerate(samples):
                row = schema.flatten(s)
                w.write({"__key__": f"{i:08d}", **{f"{c.name}.{_EXT[c.kind]}": row[c.name] for c in schema.columns}})
        save_schema(schema, data_dir / _SCHEMA)

    def iterate(self, data_dir: Path, cache_dir: Path) -> Iterator[Any]:
        import webdataset as wds

        fix = _Unflatten(load_schema(data_dir / _SCHEMA))
        for (sample,) in wds.WebDataset(_urls(data_dir), shardshuffle=False, empty_check=False).decode().map(fix):
            yield sample

    def loader(
        self, data_dir: Path, cache_dir: Path, *, num_workers: int, batch_size: int, seed: int
    ) -> Iterable[list[Any]]:
        import webdataset as wds

        urls = _urls(data_dir)
        fix = _Unflatten(load_schema(data_dir / _SCHEMA))
        pipeline = (
            wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False)
            .shuffle(1000)
            .decode()
            .map(fix)
            .batched(batch_size, collation_fn=_unwrap_batch, partial=True)
        )
        return wds.WebLoader(
            pipeline, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0, collate_fn=_as_is
        )
