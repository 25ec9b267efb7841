"""The codec interface: one frame in, one record's raw bytes out.

A codec turns the raw bytes of one record (a ``torch.save`` buffer) into one *frame* and
back. Its configuration is a small JSON object stored in the index (``{"id": "zstd",
"level": 3}``), so a reader needs no out-of-band knowledge. No torch import here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

__all__ = ["Codec"]


class Codec(ABC):
    """Abstract base of every codec.

    Thread safety: ``compress`` and ``decompress`` may be called from many threads at once;
    implementations keep per-thread native contexts where the underlying library needs them.
    Fork safety: instances hold no file handles; native contexts are re-created lazily in a
    child process.
    """

    #: The ``"id"`` of the codec config, unique in the registry.
    codec_id: str = ""

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """Return the JSON-serialisable config that :func:`get_codec` turns back into this codec."""

    @abstractmethod
    def compress(self, raw: bytes | memoryview) -> bytes:
        """Encode one record's raw bytes as one frame."""

    @abstractmethod
    def frame_content_bytes(self, frame: bytes | memoryview) -> int | None:
        """Return the decompressed size a frame's header declares, or None if it declares none.

        Raises:
            DecompressionError: If the frame header cannot be parsed.
        """

    def max_raw_bytes(self, stored_bytes: int, frames: int = 1) -> int:
        """Return an upper bound on what ``frames`` frames of ``stored_bytes`` bytes in all decode to.

        Readers compare the raw lengths in an index or footer against this bound *before*
        allocating, so a hostile index cannot claim that a 100-byte frame holds 1 TiB. The
        bound is the codec format's worst case (the best possible compression ratio), never a
        typical ratio, so no genuine record exceeds it.

        Args:
            stored_bytes: Total size of the frames in bytes.
            frames: How many frames those bytes hold (the bound of a sum of frames).

        Returns:
            The largest raw size in bytes the frames can decode to. This default knows no bound
            and returns 2**62; codecs override it.
        """
        return 2**62

    @abstractmethod
    def decompress(self, frame: bytes | memoryview, raw_bytes: int) -> bytes:
        """Decode one frame whose decompressed size must be exactly ``raw_bytes``.

        The frame header's declared size is checked against ``raw_bytes`` *before* any output
        buffer is allocated, so a hostile frame cannot make the reader allocate more than
        ``raw_bytes``.

        Raises:
            DecompressionError: If the header is malformed, declares another size, the frame is
                truncated or has trailing data, or the codec reports an error.
        """

    def first_frame(self, data: bytes | memoryview, raw_limit: int) -> tuple[int, bytes] | None:
        """Find and decode the frame that starts at ``data[0]``, without a record table.

        ``recover`` uses this to rebuild a shard whose footer is lost: zstd (RFC 8878) and LZ4
        frames (LZ4 Frame Format) end with a block marked last, so they delimit themselves.

        Args:
            data: Bytes starting with a frame; more data may follow it.
            raw_limit: Refuse a frame that declares or decodes to more than this many bytes
                (checked against the header before decoding, and while decoding).

        Returns:
            ``(stored length of the frame, its decoded bytes)``; None where frames do not
            delimit themselves (codec ``none``).

        Raises:
            DecompressionError: The bytes at the start are not a complete frame within the
                limit.
        """
        return None

    def decompress_into(self, frame: bytes | memoryview, raw_bytes: int) -> bytearray:
        """Like :meth:`decompress`, but into a fresh, writable ``bytearray`` of ``raw_bytes``.

        Tensors can then be built over the result without a copy (``torch.frombuffer`` needs
        a writable buffer). Codecs override this where they can decode straight into it.
        """
        return bytearray(self.decompress(frame, raw_bytes))
