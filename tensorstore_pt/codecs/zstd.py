"""Codec ``zstd``: one Zstandard frame per record, content size in the frame header.

Format facts from RFC 8878 (Zstandard Compression and the application/zstd Media Type) and
the python-zstandard docs: ``ZstdCompressor.compress`` writes the content size into the frame
header by default (``write_content_size=True``); ``zstandard.frame_content_size`` reads it
back without decompressing; ``ZstdDecompressor.decompress(..., allow_extra_data=False)``
rejects bytes after the first frame.
"""

from __future__ import annotations

import threading
from typing import Any

import zstandard

from ..errors import DecompressionError, InvalidOptionError
from .abc import Codec

__all__ = ["ZstdCodec"]

MIN_LEVEL = -7  # fastest "negative" levels; zstandard accepts down to ZSTD_minCLevel()
MAX_LEVEL = 22
#: Frames whose raw size is at least this decode straight into the output buffer.
_STREAM_INTO_BYTES = 4 * 2**20
#: ... in chunks of this many bytes (python-zstandard's readinto sizes a temporary output
#: buffer by the destination it is given: one read of the whole destination doubled the peak).
_STREAM_CHUNK_BYTES = 2**20
#: RFC 8878: a block decodes to at most 128 KiB and takes at least 3 bytes (its header).
_BLOCK_MAX_BYTES = 128 * 1024
_BLOCK_HEADER_BYTES = 3


class ZstdCodec(Codec):
    """Zstandard frames at a fixed compression level.

    Args:
        level: Compression level, ``-7 <= level <= 22`` (zstd's default is 3).
        dictionary: Raw zstd dictionary bytes (as ``zstandard.train_dictionary`` makes them),
            used for every frame; None for none.
        dict_ref: The dictionary's reference as stored in the codec config
            (``{"name", "checksum", "dict_id", "bytes"}``); required with ``dictionary``.

    Raises:
        InvalidOptionError: If ``level`` is not an int in range.

    Thread safety: zstandard's (de)compressor objects are not safe for concurrent use, so each
    thread gets its own (``threading.local``).
    """

    codec_id = "zstd"

    def __init__(self, level: int = 3, dictionary: bytes | None = None, dict_ref: dict[str, Any] | None = None) -> None:
        if isinstance(level, bool) or not isinstance(level, int) or not MIN_LEVEL <= level <= MAX_LEVEL:
            raise InvalidOptionError(f"zstd level: expected an int in [{MIN_LEVEL}, {MAX_LEVEL}], found {level!r}")
        if (dictionary is None) != (dict_ref is None):
            raise InvalidOptionError("zstd: a dictionary needs its dict_ref and a dict_ref its dictionary")
        self.level = level
        self.dictionary = dictionary
        self.dict_ref = dict_ref
        self._dict = zstandard.ZstdCompressionDict(dictionary) if dictionary is not None else None
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {"level": self.level, "dictionary": self.dictionary, "dict_ref": self.dict_ref}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["level"], state["dictionary"], state["dict_ref"])  # type: ignore[misc]

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"id": "zstd", "level": self.level}
        if self.dict_ref is not None:
            config["dict"] = dict(self.dict_ref)
        return config

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(
                level=self.level, write_content_size=True, dict_data=self._dict
            )
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor(dict_data=self._dict)
        return d

    def compress(self, raw: bytes | memoryview) -> bytes:
        return self._compressor().compress(raw)

    def frame_content_bytes(self, frame: bytes | memoryview) -> int | None:
        try:
            size = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise DecompressionError(f"zstd: cannot parse the frame header ({exc})") from exc
        return None if size < 0 else size

    def max_raw_bytes(self, stored_bytes: int, frames: int = 1) -> int:
        """Worst case of RFC 8878: every 3 bytes of frame hold one block of at most 128 KiB.

        This is ``ZSTD_decompressBound``'s reasoning; ``ceil(stored / 3)`` blocks per frame,
        summed over ``frames`` frames, is at most ``(stored_bytes + 2 * frames) // 3`` blocks.
        (All-zero data really reaches about 32,000:1.)
        """
        return (stored_bytes + (_BLOCK_HEADER_BYTES - 1) * frames) // _BLOCK_HEADER_BYTES * _BLOCK_MAX_BYTES

    def decompress(self, frame: bytes | memoryview, raw_bytes: int) -> bytes:
        declared = self.frame_content_bytes(frame)
        if declared != raw_bytes:
            raise DecompressionError(
                f"zstd: the frame header declares a content size of {declared} bytes, "
                f"expected {raw_bytes} bytes (the raw length in the index)"
            )
        try:
            out = self._decompressor().decompress(frame, max_output_size=raw_bytes, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise DecompressionError(f"zstd: the frame does not decode ({exc})") from exc
        if len(out) != raw_bytes:
            raise DecompressionError(f"zstd: decoded {len(out)} bytes, expected {raw_bytes} bytes")
        return out

    def decompress_into(self, frame: bytes | memoryview, raw_bytes: int) -> bytearray:
        """Decode into a preallocated ``bytearray``; frames of 4 MiB+ stream straight into it.

        The streaming path (``ZstdDecompressor.stream_reader(...).readinto``) never writes past
        the buffer and checks that the frame ends exactly at ``raw_bytes``; it does not see
        bytes stored after the frame's end (``tspt verify`` does, through :meth:`decompress`).
        """
        if raw_bytes < _STREAM_INTO_BYTES:
            return bytearray(self.decompress(frame, raw_bytes))
        declared = self.frame_content_bytes(frame)
        if declared != raw_bytes:
            raise DecompressionError(
                f"zstd: the frame header declares a content size of {declared} bytes, "
                f"expected {raw_bytes} bytes (the raw length in the index)"
            )
        out = bytearray(raw_bytes)
        view = memoryview(out)
        pos = 0
        try:
            with self._decompressor().stream_reader(frame, read_across_frames=False) as reader:
                while pos < raw_bytes:
                    n = reader.readinto(view[pos : pos + _STREAM_CHUNK_BYTES])
                    if not n:
                        break
                    pos += n
                extra = reader.read(1) if pos == raw_bytes else b""
        except zstandard.ZstdError as exc:
            raise DecompressionError(f"zstd: the frame does not decode ({exc})") from exc
        finally:
            view.release()
        if pos != raw_bytes or extra:
            raise DecompressionError(
                f"zstd: the frame decodes to {'more than ' if extra else ''}{pos} bytes, expected {raw_bytes} bytes"
            )
        return out

    def first_frame(self, data: bytes | memoryview, raw_limit: int) -> tuple[int, bytes] | None:
        """Decode the first zstd frame of ``data``; its length is where ``unused_data`` starts
        (python-zstandard's ``ZstdDecompressionObj`` stops at the end of one frame)."""
        declared = self.frame_content_bytes(data)
        if declared is None or declared > raw_limit:
            raise DecompressionError(
                f"zstd: the frame declares {declared} content bytes; expected a declared size of at most {raw_limit}"
            )
        dobj = self._decompressor().decompressobj()
        parts: list[bytes] = []
        got = 0
        view = memoryview(data)
        fed = 0
        try:
            for pos in range(0, len(view), _BLOCK_MAX_BYTES):
                chunk = view[pos : pos + _BLOCK_MAX_BYTES]
                out = dobj.decompress(chunk)
                fed = pos + len(chunk)
                got += len(out)
                parts.append(out)
                if got > declared:
                    raise DecompressionError(f"zstd: the frame decodes past its declared {declared} bytes")
                if dobj.eof:
                    break
        except zstandard.ZstdError as exc:
            raise DecompressionError(f"zstd: the frame does not decode ({exc})") from exc
        if not dobj.eof or got != declared:
            raise DecompressionError(f"zstd: the frame is incomplete ({got} of {declared} bytes decoded)")
        # unused_data is what was left of the last chunk fed after the frame's end.
        return fed - len(dobj.unused_data), b"".join(parts)
