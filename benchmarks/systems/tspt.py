"""tensorstore_pt, one system per codec configuration.

New options (a codec, a level, a reader mode) are benchmarked by adding a row to
:data:`CONFIGS`; the rest of the harness picks it up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

from .abc import PackOptions, System, collate_list

__all__ = ["AUDITED", "CONFIGS", "TensorStore", "system_for_audit", "tspt_systems"]

#: (system name, codec, level, other writer options) for every tensorstore_pt configuration
#: benchmarked; then the format 1.1 options (a trained zstd dictionary, and 64 KiB
#: multi-record frames) and format 1.3's container-free columnar frames (``compact``).
CONFIGS: tuple[tuple[str, str, int | None, dict[str, Any]], ...] = (
    ("tspt-none", "none", None, {}),
    ("tspt-lz4", "lz4", None, {}),
    ("tspt-zstd1", "zstd", 1, {}),
    ("tspt-zstd3", "zstd", 3, {}),
    ("tspt-zstd9", "zstd", 9, {}),
    ("tspt-zstd3-dict", "zstd", 3, {"dictionary": True}),
    ("tspt-zstd3-frames64k", "zstd", 3, {"frame_target_bytes": 64 * 2**10}),
    ("tspt-zstd3-compact", "zstd", 3, {"compact": True}),
)

#: The configuration whose store ``tspt audit`` is run on, per kind, to name the option to use
#: (tensorstore_pt's default codec, as a user's first store would be).
AUDITED = "tspt-zstd3"

#: Levels the codecs use when none is given (tensorstore_pt.codecs: lz4 0, zstd 3).
_DEFAULT_LEVEL = {"lz4": 0, "zstd": 3}


def _option_key(codec: str, level: int | None, options: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two packing options the same store: codec, level (defaults filled in),
    whether a dictionary is trained, whether records share frames, whether they are compact."""
    if level is None:
        level = _DEFAULT_LEVEL.get(codec)
    compact = bool(options.get("compact"))
    return (
        codec,
        level,
        bool(options.get("dictionary")),
        bool(options.get("frame_target_bytes")) and not compact,
        compact,
    )


def system_for_audit(options: dict[str, Any]) -> str | None:
    """The benchmarked configuration (a :data:`CONFIGS` name) that packs with the options an
    audit recommends, or None if no row matches.

    Args:
        options: A :class:`tensorstore_pt.audit.CodecProjection`'s ``codec``, i.e.
            :func:`~tensorstore_pt.write_store` keywords (``{"codec": "zstd", "level": 3,
            "dictionary": 16384}``).
    """
    want = _option_key(options["codec"], options.get("level"), options)
    for name, codec, level, extra in CONFIGS:
        if _option_key(codec, level, extra) == want:
            return name
    return None


class TensorStore(System):
    """A tensorstore_pt store written by ``write_store`` and read by ``open_store``; its
    DataLoader rows read it through :class:`~tensorstore_pt.StoreIterableDataset` (see
    :meth:`loader`)."""

    family: ClassVar[str] = "tensorstore_pt"

    def __init__(self, name: str, codec: str, level: int | None, options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]
        self.codec = codec
        self.level = level
        self.options = dict(options or {})
        extra = "".join(f", {k}={v}" for k, v in self.options.items())
        self.label = f"tensorstore_pt, codec {codec}" + (f" level {level}" if level is not None else "") + extra  # type: ignore[misc]

    def versions(self) -> dict[str, str]:
        import tensorstore_pt

        return {"tensorstore_pt": tensorstore_pt.__version__}

    def pack(self, samples: Sequence[Any], data_dir: Path, options: PackOptions) -> None:
        from tensorstore_pt import write_store

        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a kind too small to train a dictionary on
            write_store(
                samples,
                data_dir,
                codec=self.codec,
                level=self.level,
                max_shard_bytes=options.shard_bytes,
                **self.options,
            )

    def iterate(self, data_dir: Path, cache_dir: Path) -> Iterator[Any]:
        from tensorstore_pt import open_store

        with open_store(data_dir) as reader:
            yield from reader

    def random_access(self, data_dir: Path, cache_dir: Path) -> Callable[[int], Any]:
        from tensorstore_pt import open_store

        return open_store(data_dir).read

    def sequential_dataset(self, data_dir: Path, cache_dir: Path) -> Iterable[Any]:
        from tensorstore_pt import open_store

        return open_store(data_dir)  # each iter() is one ordered pass over the open reader

    def loader(
        self, data_dir: Path, cache_dir: Path, *, num_workers: int, batch_size: int, seed: int
    ) -> Iterable[list[Any]]:
        """tensorstore_pt's own loader, as the peers' rows use theirs (litdata's
        ``StreamingDataLoader`` over a shuffled ``StreamingDataset``): a shuffled
        :class:`~tensorstore_pt.StoreIterableDataset` under a
        :class:`~tensorstore_pt.StoreDataLoader`, each epoch reshuffled. (Before 2026-12-05 this
        row read the store as a map-style dataset, one random read a sample.)"""
        from tensorstore_pt import StoreDataLoader, StoreIterableDataset

        return StoreDataLoader(
            StoreIterableDataset(data_dir, shuffle=True, seed=seed),
            batch_size=batch_size,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            collate_fn=collate_list,
        )


def tspt_systems() -> list[TensorStore]:
    """One :class:`TensorStore` per row of :data:`CONFIGS`."""
    return [TensorStore(name, codec, level, options) for name, codec, level, options in CONFIGS]
