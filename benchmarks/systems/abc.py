"""The one small interface every benchmarked system implements.

A system packs a list of samples into a directory (``data_dir``) with its own writer, and
reads them back with its own reader: a full ordered pass, a random-access getter (if it has
one), and its own DataLoader-style loader. Everything it may create while reading (caches,
decompressed shards) goes under ``cache_dir``, so the harness can count it and evict it.

Samples handed back must equal the samples written, bit for bit and with the same Python
structure (tensors with their dtype and shape, ints, strs); the harness checks this with
:func:`benchmarks.kinds.sample_digest` on the first (untimed) pass of every read metric.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

__all__ = ["PackOptions", "System", "collate_list"]


@dataclass(frozen=True)
class PackOptions:
    """Options shared by every writer.

    Attributes:
        shard_bytes: Target shard/chunk size in bytes for sharded systems (tensorstore_pt's
            ``max_shard_bytes``, MDS ``size_limit``, litdata ``chunk_bytes``, WebDataset
            ``maxsize``). The harness picks one value per data kind so each sharded system
            gets the same number of shards, enough for two DataLoader workers to split.
    """

    shard_bytes: int


def collate_list(batch: list[Any]) -> list[Any]:
    """The DataLoader ``collate_fn`` of every system: the batch as a list, no stacking (the
    kinds have variable shapes; stacking costs the same for every system anyway)."""
    return batch


class System(ABC):
    """A way to store and load a dataset (``torch.save`` per sample, tensorstore_pt, MDS...).

    Thread/fork safety: instances hold only configuration; every method opens what it needs.

    Attributes:
        notes: Things the adapter had to do that a reader of the results should know (a
            fallback taken, say); reported with the measurement.
    """

    def __init__(self) -> None:
        self.notes: list[str] = []

    #: Short name used on the command line and in results, e.g. ``tspt-zstd3``.
    name: ClassVar[str]
    #: ``baseline``, ``tensorstore_pt`` or ``peer``.
    family: ClassVar[str]
    #: One line for the report.
    label: ClassVar[str]
    #: Import names the system needs (checked by :meth:`unavailable_reason`).
    modules: ClassVar[tuple[str, ...]] = ()
    #: The pip requirement that brings the modules (said in the skip note).
    requirement: ClassVar[str] = ""

    def unavailable_reason(self) -> str | None:
        """None if the system can run in this interpreter, else why not (one line)."""
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            return f"not installed here ({', '.join(missing)}); install {self.requirement or missing[0]}"
        return None

    def unsupported_reason(self, sample: Any) -> str | None:
        """None if samples shaped like ``sample`` can be stored without loss, else why not."""
        return None

    def versions(self) -> dict[str, str]:
        """Versions of the packages the system runs on (for the machine record)."""
        return {}

    @abstractmethod
    def pack(self, samples: Sequence[Any], data_dir: Path, options: PackOptions) -> None:
        """Write ``samples`` into the empty directory ``data_dir`` with the system's own writer."""

    @abstractmethod
    def iterate(self, data_dir: Path, cache_dir: Path) -> Iterator[Any]:
        """Open the dataset and yield every sample in record order (the sequential read)."""

    def random_access(self, data_dir: Path, cache_dir: Path) -> Callable[[int], Any] | None:
        """Open the dataset and return ``get(i) -> sample``, or None if the system has no
        random access (then the metric is reported as not applicable)."""
        return None

    def sequential_dataset(self, data_dir: Path, cache_dir: Path) -> Iterable[Any] | None:
        """Open the dataset once and return it: every ``iter()`` of it is one ordered pass
        over all samples through the same open dataset, so whatever it keeps between passes
        (a decompressed chunk in memory, open handles) stays kept. None (the default): the
        system keeps nothing between passes (WebDataset's tar streams); the harness then
        re-opens it through :meth:`iterate` for every pass and reports that (op
        ``seq_again``, ``same_dataset: false``)."""
        return None

    @abstractmethod
    def loader(
        self, data_dir: Path, cache_dir: Path, *, num_workers: int, batch_size: int, seed: int
    ) -> Iterable[list[Any]]:
        """The system's own loader over the dataset, shuffled, yielding lists of samples
        (``collate_fn=collate_list``); iterating it again runs another epoch. With workers,
        the workers are persistent (started once, by the first epoch)."""

    def close(self) -> None:  # noqa: B027 (optional hook; most systems hold nothing)
        """Release what :meth:`iterate`, :meth:`random_access` or :meth:`loader` left open
        (shared memory, file handles). Called after each read pass, outside the timing."""
