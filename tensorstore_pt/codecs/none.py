"""Codec ``none``: the frame is the record's raw bytes, unchanged."""

from __future__ import annotations

from typing import Any

from ..errors import DecompressionError
from .abc import Codec

__all__ = ["NoneCodec"]


class NoneCodec(Codec):
    """Store records as they are (stored bytes == raw bytes)."""

    codec_id = "none"

    def get_config(self) -> dict[str, Any]:
        return {"id": "none"}

    def compress(self, raw: bytes | memoryview) -> bytes:
        return bytes(raw)

    def frame_content_bytes(self, frame: bytes | memoryview) -> int | None:
        return len(frame)

    def max_raw_bytes(self, stored_bytes: int, frames: int = 1) -> int:
        """A ``none`` frame is its raw bytes: the bound is ``stored_bytes`` itself."""
        return stored_bytes

    def decompress(self, frame: bytes | memoryview, raw_bytes: int) -> bytes:
        if len(frame) != raw_bytes:
            raise DecompressionError(
                f"codec 'none': expected a frame of {raw_bytes} bytes (the raw length), found {len(frame)} bytes"
            )
        return bytes(frame)

    def decompress_into(self, frame: bytes | memoryview, raw_bytes: int) -> bytearray:
        """One copy of the frame into a fresh ``bytearray`` (not two, through ``bytes``)."""
        if len(frame) != raw_bytes:
            raise DecompressionError(
                f"codec 'none': expected a frame of {raw_bytes} bytes (the raw length), found {len(frame)} bytes"
            )
        return bytearray(frame)
