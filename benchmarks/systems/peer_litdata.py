"""litdata (Lightning): chunks written by ``litdata.optimize(compression="zstd")`` and read by
``StreamingDataset`` / ``StreamingDataLoader``.

litdata serialises tensors, ints and strs of a sample (a pytree) itself, so samples go in and
come out as they are. ``optimize`` runs with ``num_workers=2`` (the machine's cores; its
default is 4 per CPU) and ``start_method="fork"`` (its default, spawn, would re-import torch
in every worker of every repetition and needs a picklable sample source); chunks are read in
place from the packed directory (litdata copies only remote data into its cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .abc import PackOptions, System, collate_list

__all__ = ["LitData"]

_SAMPLES: Sequence[Any] = ()


def _get(i: int) -> Any:
    return _SAMPLES[i]


def _own_bytes(item: Any) -> Any:
    """The dataset's ``transform``: bytes leaves as ``bytes``. litdata's bytes serializer
    hands back a ``memoryview`` into the chunk it read, which is not the ``bytes`` written
    and which a DataLoader worker cannot pickle. Other leaves pass through untouched."""
    if isinstance(item, memoryview):
        return item.tobytes()
    if type(item) is dict:
        return {k: _own_bytes(v) for k, v in item.items()}
    if type(item) in (tuple, list):
        return type(item)(_own_bytes(v) for v in item)
    return item


class LitData(System):
    name = "litdata-zstd"
    family = "peer"
    label = "litdata optimize, chunks, zstd"
    modules = ("litdata",)
    requirement = "the bench-peers extra (litdata; needs a torchvision that matches torch)"

    def versions(self) -> dict[str, str]:
        import litdata

        return {"litdata": litdata.__version__}

    def __init__(self) -> None:
        super().__init__()
        self.workers = 2

    def pack(self, samples: Sequence[Any], data_dir: Path, options: PackOptions) -> None:
        import shutil

        import litdata

        global _SAMPLES
        _SAMPLES = samples  # the forked workers of optimize() read samples from here
        try:
            while True:
                try:
                    litdata.optimize(
                        fn=_get,
                        inputs=list(range(len(samples))),
                        output_dir=str(data_dir),
                        chunk_bytes=options.shard_bytes,
                        compression="zstd",
                        num_workers=self.workers,
                        start_method="fork",
                        verbose=False,
                    )
                    return
                except Exception as exc:
                    # Workers infer the chunk format from their first sample; with samples of
                    # different ranks (a state_dict) two workers can disagree and the merge
                    # fails. Its remedy is one worker.
                    if self.workers == 1 or "config isn't consistent" not in str(exc):
                        raise
                    self.workers = 1
                    self.notes.append(
                        "litdata optimize with 2 workers failed (its workers inferred different chunk formats: "
                        '"The config isn\'t consistent between chunks"); packed with 1 worker'
                    )
                    shutil.rmtree(data_dir)
                    data_dir.mkdir()
        finally:
            _SAMPLES = ()

    def _dataset(self, data_dir: Path, cache_dir: Path, **kw: Any) -> Any:
        import litdata

        return litdata.StreamingDataset(input_dir=str(data_dir), cache_dir=str(cache_dir), transform=_own_bytes, **kw)

    def iterate(self, data_dir: Path, cache_dir: Path) -> Iterator[Any]:
        yield from self._dataset(data_dir, cache_dir, shuffle=False)

    def sequential_dataset(self, data_dir: Path, cache_dir: Path) -> Iterable[Any]:
        """One open ``StreamingDataset``: a later pass reads the decompressed chunk it kept."""
        return self._dataset(data_dir, cache_dir, shuffle=False)

    def random_access(self, data_dir: Path, cache_dir: Path) -> Callable[[int], Any]:
        return self._dataset(data_dir, cache_dir, shuffle=False).__getitem__

    def loader(
        self, data_dir: Path, cache_dir: Path, *, num_workers: int, batch_size: int, seed: int
    ) -> Iterable[list[Any]]:
        import litdata

        return litdata.StreamingDataLoader(
            self._dataset(data_dir, cache_dir, shuffle=True, seed=seed),
            batch_size=batch_size,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            collate_fn=collate_list,
        )
