"""Codec ``lz4``: one LZ4 frame per record, content size in the frame header.

Format facts from the LZ4 Frame Format Description (lz4/doc/lz4_Frame_format.md) and the
python-lz4 docs: ``lz4.frame.compress(..., store_size=True)`` sets the Content Size field;
``lz4.frame.get_frame_info`` reads it without decompressing; ``lz4.frame.decompress(...,
return_bytes_read=True)`` tells how much input one frame consumed.
"""

from __future__ import annotations

from typing import Any

import lz4.frame

from ..errors import DecompressionError, InvalidOptionError
from .abc import Codec

__all__ = ["Lz4Codec"]

MAX_LEVEL = 16  # lz4.frame.COMPRESSIONLEVEL_MAX; 0 is the fast default, 3+ is LZ4-HC
#: LZ4 block format: a match length grows by at most 255 per input byte, so no frame decodes to
#: more than 256 times its size (all-zero data reaches about 243:1).
_MAX_RATIO = 256


class Lz4Codec(Codec):
    """LZ4 frames (block-independent, no content checksum: the store's xxh3_64 covers it).

    Args:
        level: 0 (default, fast) to 16 (LZ4-HC max).

    Raises:
        InvalidOptionError: If ``level`` is not an int in range.

    Thread safety: the module-level lz4.frame functions hold no shared state.
    """

    codec_id = "lz4"

    def __init__(self, level: int = 0) -> None:
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= MAX_LEVEL:
            raise InvalidOptionError(f"lz4 level: expected an int in [0, {MAX_LEVEL}], found {level!r}")
        self.level = level

    def get_config(self) -> dict[str, Any]:
        return {"id": "lz4", "level": self.level}

    def compress(self, raw: bytes | memoryview) -> bytes:
        return lz4.frame.compress(raw, compression_level=self.level, store_size=True, content_checksum=False)

    def frame_content_bytes(self, frame: bytes | memoryview) -> int | None:
        try:
            info = lz4.frame.get_frame_info(frame)
        except (RuntimeError, ValueError) as exc:
            raise DecompressionError(f"lz4: cannot parse the frame header ({exc})") from exc
        size = info.get("content_size", 0)
        # lz4 reports 0 when the Content Size field is absent; a real 0-byte record is never
        # written (torch.save output is never empty), so 0 means "not declared".
        return size if size > 0 else None

    def max_raw_bytes(self, stored_bytes: int, frames: int = 1) -> int:
        """LZ4's worst case: at most 256 raw bytes per stored byte."""
        return _MAX_RATIO * stored_bytes

    def decompress(self, frame: bytes | memoryview, raw_bytes: int) -> bytes:
        return bytes(self._decode(frame, raw_bytes, writable=False))

    def decompress_into(self, frame: bytes | memoryview, raw_bytes: int) -> bytearray:
        return self._decode(frame, raw_bytes, writable=True)  # type: ignore[return-value]

    def _decode(self, frame: bytes | memoryview, raw_bytes: int, writable: bool) -> bytes | bytearray:
        declared = self.frame_content_bytes(frame)
        if declared != raw_bytes:
            raise DecompressionError(
                f"lz4: the frame header declares a content size of {declared} bytes, "
                f"expected {raw_bytes} bytes (the raw length in the index)"
            )
        # A streaming decompressor with max_length: output never grows past raw_bytes, even
        # when a forged header declares less than the blocks really inflate to.
        decoder = lz4.frame.LZ4FrameDecompressor(return_bytearray=writable)
        try:
            out = decoder.decompress(frame, max_length=raw_bytes)
        except (RuntimeError, ValueError) as exc:
            raise DecompressionError(f"lz4: the frame does not decode ({exc})") from exc
        if not decoder.eof:
            if decoder.needs_input:
                raise DecompressionError(
                    f"lz4: the frame is truncated: {len(frame)} stored bytes end before the frame's end "
                    f"mark ({len(out)} of {raw_bytes} bytes decoded)"
                )
            raise DecompressionError(f"lz4: the frame decodes to more than {raw_bytes} bytes (the raw length)")
        if decoder.unused_data:
            raise DecompressionError(
                f"lz4: the frame ends {len(decoder.unused_data)} bytes before the {len(frame)} stored bytes do "
                "(trailing data)"
            )
        if len(out) != raw_bytes:
            raise DecompressionError(f"lz4: decoded {len(out)} bytes, expected {raw_bytes} bytes")
        return out

    def first_frame(self, data: bytes | memoryview, raw_limit: int) -> tuple[int, bytes] | None:
        """Decode the first LZ4 frame of ``data``; its length is where ``unused_data`` starts."""
        declared = self.frame_content_bytes(data)
        if declared is None or declared > raw_limit:
            raise DecompressionError(
                f"lz4: the frame declares {declared} content bytes; expected a declared size of at most {raw_limit}"
            )
        decoder = lz4.frame.LZ4FrameDecompressor()
        try:
            out = decoder.decompress(data, max_length=declared)
        except (RuntimeError, ValueError) as exc:
            raise DecompressionError(f"lz4: the frame does not decode ({exc})") from exc
        if not decoder.eof or len(out) != declared:
            raise DecompressionError(f"lz4: the frame is incomplete ({len(out)} of {declared} bytes decoded)")
        return len(data) - len(decoder.unused_data or b""), bytes(out)
