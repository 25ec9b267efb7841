"""Codec registry: codec config (a JSON object from the index) <-> :class:`Codec` instance."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import InvalidOptionError, UnsupportedFormatError
from .abc import Codec
from .lz4 import Lz4Codec
from .none import NoneCodec
from .zstd import ZstdCodec

__all__ = ["CODEC_IDS", "get_codec", "make_codec"]

_FACTORIES: dict[str, tuple[Callable[..., Codec], frozenset[str]]] = {
    "none": (NoneCodec, frozenset()),
    "zstd": (ZstdCodec, frozenset({"level"})),
    "lz4": (Lz4Codec, frozenset({"level"})),
}

#: Codec ids this version can read and write.
CODEC_IDS: tuple[str, ...] = tuple(sorted(_FACTORIES))


def get_codec(config: Any) -> Codec:
    """Build a codec from its stored config, refusing anything this version does not know.

    Raises:
        UnsupportedFormatError: Unknown ``id`` or an unknown config key (a newer writer's
            option this reader cannot honour).
        InvalidOptionError: A known key with a bad value.
    """
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise UnsupportedFormatError(f"codec config: expected an object with a string 'id', found {config!r}")
    codec_id = config["id"]
    if codec_id not in _FACTORIES:
        raise UnsupportedFormatError(f"codec config: unknown codec id {codec_id!r}; this version knows {list(CODEC_IDS)}")
    factory, keys = _FACTORIES[codec_id]
    unknown = sorted(set(config) - keys - {"id"})
    if unknown:
        raise UnsupportedFormatError(
            f"codec config for {codec_id!r}: unknown option(s) {unknown}; this version knows {sorted(keys)} "
            "(the store was probably written by a newer tensorstore_pt)"
        )
    return factory(**{k: config[k] for k in keys if k in config})


def make_codec(codec: str, level: int | None = None) -> Codec:
    """Build a codec from user options (``codec="zstd", level=3``).

    Raises:
        InvalidOptionError: Unknown codec name, or a level the codec does not accept.
    """
    if codec not in _FACTORIES:
        raise InvalidOptionError(f"codec: expected one of {list(CODEC_IDS)}, found {codec!r}")
    factory, keys = _FACTORIES[codec]
    if level is None:
        return factory()
    if "level" not in keys:
        raise InvalidOptionError(f"codec {codec!r} takes no level, found level={level!r}")
    return factory(level=level)
