"""Codec registry: codec config (a JSON object from the index) <-> :class:`Codec` instance."""

from __future__ import annotations

from typing import Any, Callable

from ..checksums import digest_int, format_digest
from ..errors import (
    ChecksumMismatchError,
    IndexFormatError,
    InvalidOptionError,
    ShardSizeError,
    TensorStoreError,
    UnsupportedFormatError,
)
from .abc import Codec
from .lz4 import Lz4Codec
from .none import NoneCodec
from .zstd import ZstdCodec

__all__ = ["CODEC_IDS", "get_codec", "make_codec"]

_FACTORIES: dict[str, tuple[Callable[..., Codec], frozenset[str]]] = {
    "none": (NoneCodec, frozenset()),
    "zstd": (ZstdCodec, frozenset({"level", "dict"})),
    "lz4": (Lz4Codec, frozenset({"level"})),
}

#: Codec ids this version can read and write.
CODEC_IDS: tuple[str, ...] = tuple(sorted(_FACTORIES))


#: Keys of a zstd dictionary reference in the codec config.
DICT_REF_KEYS = frozenset({"name", "checksum", "dict_id", "bytes"})
#: Upper bound on a dictionary file (zstd dictionaries are KiB to a few MiB).
MAX_DICT_BYTES = 16 * 2**20


def read_store_file(storage: Any, name: str) -> bytes:
    """Read a store file that a codec config names (a dictionary), refusing one past
    ``MAX_DICT_BYTES`` before reading it: size and bytes come from one open file
    (``read_all(max_bytes=...)``), so a file that grows between a size check and the read is
    never read whole either. Every ``get_codec`` loader reads through this.

    Raises:
        ShardSizeError: The file is larger than ``MAX_DICT_BYTES``.
        FileNotFoundError: The file is absent (callers turn it into ``MissingShardError``).
    """
    try:
        return storage.read_all(name, max_bytes=MAX_DICT_BYTES)
    except TensorStoreError:
        raise
    except ValueError as exc:
        raise ShardSizeError(
            f"store {storage.location!r}: file {name!r}: expected at most {MAX_DICT_BYTES} bytes ({exc})"
        ) from exc


def load_dictionary(ref: Any, load: Callable[[str], bytes], where: str) -> bytes:
    """Validate a ``{"name", "checksum", "dict_id", "bytes"}`` reference, load and check the file.

    Raises:
        IndexFormatError: A malformed reference or unsafe name.
        ChecksumMismatchError: The file's size, xxh3_64 digest or zstd dictionary id differ.
        FileNotFoundError (MissingShardError from the reader's loader): The file is absent.
    """
    import zstandard

    from ..checksums import parse_digest
    from ..format import check_shard_name

    if not isinstance(ref, dict) or set(ref) != DICT_REF_KEYS:
        raise IndexFormatError(f"{where}: expected a dict reference with keys {sorted(DICT_REF_KEYS)}, found {ref!r}")
    name = check_shard_name(ref["name"], f"{where}.name")
    expected = parse_digest(ref["checksum"], f"{where}.checksum")
    size, dict_id = ref["bytes"], ref["dict_id"]
    for key, value in (("bytes", size), ("dict_id", dict_id)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DICT_BYTES * 2**12:
            raise IndexFormatError(f"{where}.{key}: expected a non-negative int, found {value!r}")
    if size > MAX_DICT_BYTES:
        raise IndexFormatError(f"{where}.bytes: {size} bytes is above the {MAX_DICT_BYTES}-byte limit for a dictionary")
    data = load(name)
    found = digest_int(data)
    if len(data) != size or found != expected:
        raise ChecksumMismatchError(
            f"{where}: dictionary file {name!r}: expected {size} bytes with {format_digest(expected)}, "
            f"found {len(data)} bytes with {format_digest(found)}"
        )
    found_id = zstandard.ZstdCompressionDict(data).dict_id()
    if found_id != dict_id:
        raise ChecksumMismatchError(f"{where}: dictionary file {name!r}: expected dict_id {dict_id}, found {found_id}")
    return data


def get_codec(config: Any, load: Callable[[str], bytes] | None = None) -> Codec:
    """Build a codec from its stored config, refusing anything this version does not know.

    Args:
        config: The codec config from the index, e.g. ``{"id": "zstd", "level": 3}``.
        load: Reads a file of the store by name (needed when the config references a
            zstd dictionary).

    Raises:
        UnsupportedFormatError: Unknown ``id`` or an unknown config key (a newer writer's
            option this reader cannot honour).
        IndexFormatError: A known key with a bad value, or a bad dictionary reference.
        ChecksumMismatchError: The dictionary file differs from its reference.
    """
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise UnsupportedFormatError(f"codec config: expected an object with a string 'id', found {config!r}")
    codec_id = config["id"]
    if codec_id not in _FACTORIES:
        raise UnsupportedFormatError(
            f"codec config: unknown codec id {codec_id!r}; this version knows {list(CODEC_IDS)}"
        )
    factory, keys = _FACTORIES[codec_id]
    unknown = sorted(set(config) - keys - {"id"})
    if unknown:
        raise UnsupportedFormatError(
            f"codec config for {codec_id!r}: unknown option(s) {unknown}; this version knows {sorted(keys)} "
            "(the store was probably written by a newer tensorstore_pt)"
        )
    kwargs = {k: config[k] for k in keys if k in config and k != "dict"}
    if "dict" in config:
        if load is None:
            raise UnsupportedFormatError("codec config references a zstd dictionary but no store to load it from")
        kwargs["dictionary"] = load_dictionary(config["dict"], load, "codec config: dict")
        kwargs["dict_ref"] = dict(config["dict"])
    try:
        return factory(**kwargs)
    except InvalidOptionError as exc:
        raise IndexFormatError(f"codec config {config}: {exc}") from exc


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
