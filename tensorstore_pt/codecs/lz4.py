"""Codec ``lz4``: one LZ4 frame per record, content size in the frame header.

Format facts from the LZ4 Frame Format Description (lz4/doc/lz4_Frame_format.md) and the
python-lz4 docs: ``lz4.frame.compress(..., store_size=True)`` sets the Content Size field;
``lz4.frame.get_frame_info`` reads it without decompressing; ``lz4.frame.decompress(...,
return_bytes_read=True)`` tells how much input one frame consumed.
"""

from __future__ import annotations

import io
from typing import Any

import lz4.frame

from ..errors import DecompressionError, InvalidOptionError
from .abc import Codec

__all__ = ["Lz4Codec"]

MAX_LEVEL = 16  # lz4.frame.COMPRESSIONLEVEL_MAX; 0 is the fast default, 3+ is LZ4-HC
#: LZ4 block format: a match length grows by at most 255 per input byte, so no frame decodes to
#: more than 256 times its size (all-zero data reaches about 243:1).
_MAX_RATIO = 256
#: Frames whose raw size is at least this decode in chunks of _STREAM_CHUNK_BYTES (see
#: Lz4Codec.decompress_into).
_STREAM_INTO_BYTES = 4 * 2**20
_STREAM_CHUNK_BYTES = 2**20


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
        if raw_bytes >= _STREAM_INTO_BYTES:
            sink = io.BytesIO()
            self._decode_chunks(frame, raw_bytes, sink.write)
            # getvalue() hands over BytesIO's own buffer (no copy) once it is written to the end.
            return sink.getvalue()
        return bytes(self._decode(frame, raw_bytes, writable=False))

    def decompress_into(self, frame: bytes | memoryview, raw_bytes: int) -> bytearray:
        """Decode into a fresh ``bytearray``; frames of 4 MiB+ are decoded 1 MiB at a time
        straight into it (python-lz4 decodes into a buffer of its own and copies it out, so one
        call on the whole frame peaked at twice the raw length)."""
        if raw_bytes < _STREAM_INTO_BYTES:
            return self._decode(frame, raw_bytes, writable=True)  # type: ignore[return-value]
        out = bytearray(raw_bytes)
        view = memoryview(out)
        pos = 0

        def put(piece: bytes) -> None:
            nonlocal pos
            view[pos : pos + len(piece)] = piece
            pos += len(piece)

        try:
            self._decode_chunks(frame, raw_bytes, put)
        finally:
            view.release()
        return out

    def _decode_chunks(self, frame: bytes | memoryview, raw_bytes: int, put: Any) -> None:
        """Decode ``frame`` to exactly ``raw_bytes``, giving ``put`` at most 1 MiB at a time.

        Input goes in 1 MiB at a time too, so the decoder never holds a copy of the frame: peak
        memory is what ``put`` keeps plus about 2 MiB and lz4's block buffer (at most 4 MiB).
        """
        self._check_declared(frame, raw_bytes)
        decoder = lz4.frame.LZ4FrameDecompressor(return_bytearray=False)
        view = memoryview(frame).cast("B")
        got = 0
        fed = 0
        stalled = False  # a drain call (no new input) gave nothing: python-lz4 then wants input
        try:
            while not decoder.eof:
                if decoder.needs_input or stalled:
                    if fed >= len(view):
                        raise DecompressionError(
                            f"lz4: the frame is truncated: {len(view)} stored bytes end before the frame's end "
                            f"mark ({got} of {raw_bytes} bytes decoded)"
                        )
                    data: Any = view[fed : fed + _STREAM_CHUNK_BYTES]
                    fed += len(data)
                else:
                    data = b""
                piece = decoder.decompress(data, max_length=_STREAM_CHUNK_BYTES)
                stalled = not data and not piece
                if got + len(piece) > raw_bytes:
                    raise DecompressionError(f"lz4: the frame decodes to more than {raw_bytes} bytes (the raw length)")
                got += len(piece)
                put(piece)
        except (RuntimeError, ValueError) as exc:
            raise DecompressionError(f"lz4: the frame does not decode ({exc})") from exc
        finally:
            view.release()
        unused = len(decoder.unused_data or b"") + len(frame) - fed
        if unused:
            raise DecompressionError(
                f"lz4: the frame ends {unused} bytes before the {len(frame)} stored bytes do (trailing data)"
            )
        if got != raw_bytes:
            raise DecompressionError(f"lz4: decoded {got} bytes, expected {raw_bytes} bytes")

    def _check_declared(self, frame: bytes | memoryview, raw_bytes: int) -> None:
        declared = self.frame_content_bytes(frame)
        if declared != raw_bytes:
            raise DecompressionError(
                f"lz4: the frame header declares a content size of {declared} bytes, "
                f"expected {raw_bytes} bytes (the raw length in the index)"
            )

    def _decode(self, frame: bytes | memoryview, raw_bytes: int, writable: bool) -> bytes | bytearray:
        self._check_declared(frame, raw_bytes)
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
