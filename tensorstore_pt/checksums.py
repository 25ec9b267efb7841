"""xxHash helpers: the one checksum algorithm of format v1 (XXH3, 64-bit, seed 0).

The digest of a byte string is XXH3_64 as defined by the xxHash specification
(https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md) and computed by the
``xxhash`` Python package. In the index a digest is written ``"xxh3_64:<16 hex digits>"``
(big-endian hex of the 64-bit value, as ``xxhash.xxh3_64_hexdigest`` prints it); in shard
footers it is the same value stored as a little-endian u64.

No torch import here: this module is safe to use from tools that only inspect files.
"""

from __future__ import annotations

import xxhash

from .errors import IndexFormatError

ALGORITHM = "xxh3_64"

__all__ = ["ALGORITHM", "digest_int", "format_digest", "parse_digest", "FileHasher"]


def digest_int(data: bytes | bytearray | memoryview) -> int:
    """Return the XXH3_64 digest of ``data`` as an unsigned 64-bit int."""
    return xxhash.xxh3_64_intdigest(data)


def format_digest(value: int) -> str:
    """Format a 64-bit digest as ``"xxh3_64:<16 lowercase hex digits>"``."""
    return f"{ALGORITHM}:{value:016x}"


def parse_digest(text: object, where: str) -> int:
    """Parse ``"xxh3_64:<hex>"`` into an int.

    Raises:
        IndexFormatError: If ``text`` is not a string of that form; ``where`` names the field.
    """
    if not isinstance(text, str) or ":" not in text:
        raise IndexFormatError(f"{where}: expected a digest string 'xxh3_64:<16 hex digits>', found {text!r}")
    algo, _, hexpart = text.partition(":")
    if algo != ALGORITHM:
        raise IndexFormatError(f"{where}: expected checksum algorithm {ALGORITHM!r}, found {algo!r}")
    if len(hexpart) != 16 or any(c not in "0123456789abcdef" for c in hexpart):
        raise IndexFormatError(f"{where}: expected 16 lowercase hex digits after 'xxh3_64:', found {hexpart!r}")
    return int(hexpart, 16)


class FileHasher:
    """Incremental XXH3_64 over a stream of chunks (used for whole-shard digests).

    Not thread-safe: one instance per stream.
    """

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)

    def intdigest(self) -> int:
        return self._h.intdigest()
