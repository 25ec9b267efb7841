"""Find and check ``torch.save`` zip archives inside a byte buffer (no torch import).

``recover`` uses this to rebuild a shard whose footer is lost: without the record table, the
records of a ``none`` frame run or of a multi-record frame are found by their own structure.
A record's raw bytes are a zip archive (PKWARE APPNOTE.TXT) that ``torch.save`` writes with
every entry stored uncompressed and a CRC-32 for each entry; the End of Central Directory
record (and, for archives past 4 GiB, the zip64 EOCD record) gives the central directory's
offset and size relative to the archive's first byte, which pins down where an archive that
starts at a known offset ends. The CRC-32s then prove its contents.
"""

from __future__ import annotations

import io
import struct
import zipfile

__all__ = ["find_zip_end", "check_zip"]

_EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_LOCATOR64 = b"PK\x06\x07"
_EOCD_BYTES = 22
_LOCATOR64_BYTES = 20


def find_zip_end(buf: bytes | memoryview, start: int, end: int | None = None, max_candidates: int = 8) -> int | None:
    """The end offset (exclusive) of the zip archive that starts at ``buf[start]``, or None.

    Args:
        buf: The bytes to search.
        start: Where the archive starts (a local file header, ``PK\\x03\\x04``).
        end: Search no further than this offset (default: the end of ``buf``).
        max_candidates: Give up after this many EOCD signatures that do not fit. The first
            EOCD after ``start`` is the archive's own unless tensor bytes happen to contain
            the signature; the cap keeps a walk that starts inside an archive (an entry's
            local header) linear rather than quadratic.

    Returns:
        The first offset ``e`` such that ``buf[start:e]`` is a zip whose EOCD record's
        central-directory offset and size are consistent with an archive starting at
        ``start``; None if there is none.
    """
    data = bytes(buf) if isinstance(buf, memoryview) else buf
    end = len(data) if end is None else min(end, len(data))
    if data[start : start + 4] != b"PK\x03\x04":
        return None
    pos = start
    for _ in range(max_candidates):
        p = data.find(_EOCD, pos, end)
        if p < 0 or p + _EOCD_BYTES > end:
            return None
        pos = p + 1
        cd_bytes, cd_offset, comment = struct.unpack_from("<IIH", data, p + 12)
        stop = p + _EOCD_BYTES + comment
        if stop > end:
            continue
        cd_end = p
        loc = p - _LOCATOR64_BYTES
        if loc >= start and data[loc : loc + 4] == _LOCATOR64:
            # A zip64 archive (torch.save always writes the zip64 records): the zip64 EOCD
            # record, found through the locator, holds the central directory's size and offset.
            (eocd64,) = struct.unpack_from("<Q", data, loc + 8)
            e64 = start + eocd64
            if not start <= e64 <= loc - 56 or data[e64 : e64 + 4] != _EOCD64:
                continue
            cd_bytes, cd_offset = struct.unpack_from("<QQ", data, e64 + 40)
            cd_end = e64
        elif cd_offset == 0xFFFFFFFF or cd_bytes == 0xFFFFFFFF:
            continue
        if start + cd_offset + cd_bytes == cd_end:
            return stop
    return None


def check_zip(data: bytes | memoryview) -> str | None:
    """Check that ``data`` is exactly one zip archive whose entries are all stored (not
    compressed) and match their CRC-32s, as ``torch.save`` writes them.

    Returns:
        None if it is; otherwise a sentence saying what is wrong.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
            infos = zf.infolist()
            if not infos:
                return "the zip archive has no entries"
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED:
                    return f"entry {info.filename!r} is compressed (method {info.compress_type}); torch.save stores entries"
            bad = zf.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        return f"not a zip archive ({exc})"
    if bad is not None:
        return f"entry {bad!r} fails its CRC-32"
    return None
