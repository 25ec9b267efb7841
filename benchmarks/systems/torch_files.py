"""Baselines: ``torch.save`` per sample (the common practice) and of the whole list."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .abc import PackOptions, System, collate_list

__all__ = ["TorchFiles", "TorchList"]


def _load(path: str | Path) -> Any:
    import torch

    return torch.load(path, weights_only=True, map_location="cpu")


class _FileDataset:
    """Map-style dataset over one ``.pt`` file per sample (what people write by hand)."""

    def __init__(self, files: list[str]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        return _load(self.files[i])


def _files(data_dir: Path) -> list[str]:
    return [str(data_dir / n) for n in sorted(n for n in os.listdir(data_dir) if n.endswith(".pt"))]


def _dataloader(dataset: Any, num_workers: int, batch_size: int, seed: int) -> Iterable[list[Any]]:
    import torch

    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_list,
    )


class TorchFiles(System):
    """One ``torch.save`` file per sample, ``NNNNNNNN.pt``; read with
    ``torch.load(weights_only=True)``; the DataLoader uses a map-style dataset of paths."""

    name = "pt-files"
    family = "baseline"
    label = "one torch.save file per sample"

    def pack(self, samples: Sequence[Any], data_dir: Path, options: PackOptions) -> None:
        import torch

        for i, s in enumerate(samples):
            torch.save(s, data_dir / f"{i:08d}.pt")

    def iterate(self, data_dir: Path, cache_dir: Path) -> Iterator[Any]:
        for f in _files(data_dir):
            yield _load(f)

    def random_access(self, data_dir: Path, cache_dir: Path) -> Callable[[int], Any]:
        return _FileDataset(_files(data_dir)).__getitem__

    def sequential_dataset(self, data_dir: Path, cache_dir: Path) -> Iterable[Any]:
        return _FileDataset(_files(data_dir))  # keeps the file list; every pass loads every file

    def loader(
        self, data_dir: Path, cache_dir: Path, *, num_workers: int, batch_size: int, seed: int
    ) -> Iterable[list[Any]]:
        return _dataloader(_FileDataset(_files(data_dir)), num_workers, batch_size, seed)


class TorchList(System):
    """One ``torch.save`` of the whole list of samples; every read loads the whole file
    first (the DataLoader's workers share the loaded list copy-on-write after fork)."""

    name = "pt-list"
    family = "baseline"
    label = "one torch.save file of the whole list"

    def pack(self, samples: Sequence[Any], data_dir: Path, options: PackOptions) -> None:
        import torch

        torch.save(list(samples), data_dir / "data.pt")

    def iterate(self, data_dir: Path, cache_dir: Path) -> Iterator[Any]:
        yield from _load(data_dir / "data.pt")

    def random_access(self, data_dir: Path, cache_dir: Path) -> Callable[[int], Any]:
        return _load(data_dir / "data.pt").__getitem__

    def sequential_dataset(self, data_dir: Path, cache_dir: Path) -> Iterable[Any]:
        return _load(data_dir / "data.pt")  # the loaded list: later passes only index it

    def loader(
        self, data_dir: Path, cache_dir: Path, *, num_workers: int, batch_size: int, seed: int
    ) -> Iterable[list[Any]]:
        return _dataloader(_load(data_dir / "data.pt"), num_workers, batch_size, seed)
