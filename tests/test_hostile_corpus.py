"""Hostile records (issue 11): bounded memory, no uninitialised bytes, typed errors.

Every record of the corpus is built here by code (no committed binaries) and stored, checksum
intact, in a store of each codec. Each must be refused by a read with a typed error naming
the record, within a stated peak of Python-tracked memory (tracemalloc), and reported by
``verify_store(deep=True)``. A differential fuzz checks the fast decoder against torch.load.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from _hostile_tools import CODECS, hand, peak_bytes, torch_zip
from _store_tools import build_store, sample, torch_save_bytes
from strategies import tensors_of

from tensorstore_pt import (
    AllocationBudgetError,
    CorruptStoreError,
    IndexFormatError,
    RecordDecodeError,
    UnsafePayloadError,
    UnsupportedSampleError,
    open_store,
    verify_store,
    write_store,
)
from tensorstore_pt.codecs import get_codec
from tensorstore_pt.fastload import fast_loads
from tensorstore_pt.format import raw_frames_runs

MiB = 2**20
#: Peak Python-tracked allocation allowed while refusing one hostile record of the corpus.
PEAK_BOUND = 8 * MiB


def _cd_patch(buf: bytes, offset: int, value: bytes, entry: int = 0) -> bytes:
    """Overwrite bytes at ``offset`` of central directory entry ``entry``."""
    b = bytearray(buf)
    pos = -1
    for _ in range(entry + 1):
        pos = b.index(b"PK\x01\x02", pos + 1)
    b[pos + offset : pos + offset + len(value)] = value
    return bytes(b)


def _rezip(buf: bytes, compress: int = zipfile.ZIP_STORED, extra: bytes = b"", dup: bool = False) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf)) as zin, zipfile.ZipFile(out, "w", compress) as zout:
        for info in zin.infolist():
            zi = zipfile.ZipInfo(info.filename)
            zi.compress_type = compress
            zi.extra = extra
            zout.writestr(zi, zin.read(info))
            if dup and info.filename.endswith("data.pkl"):
                with warnings.catch_warnings():  # the duplicate is the point: zipfile warns about it
                    warnings.simplefilter("ignore", UserWarning)
                    zout.writestr(zi, zin.read(info))
    return out.getvalue()


GOOD = torch_save_bytes(sample(0))
BIG_STR = "a" * 50_000


#: GLOBAL _codecs.encode (memo 1), a 50 kB str (2), "latin1" (3), the pair (4), REDUCE: bytes (6).
ENCODE = (
    b"c_codecs\nencode\nq\x01X"
    + struct.pack("<I", len(BIG_STR))
    + BIG_STR.encode()
    + b"q\x02X\x06\x00\x00\x00latin1q\x03\x86q\x04Rq\x06"
)
BYTEARRAY = b"c__builtin__\nbytearray\nq\x05"  # GLOBAL bytearray (memo 5)


def _tensor_op(n: int) -> bytes:
    """A float32 tensor of ``n`` elements over storage ``data/0`` (memo 7), as torch.save pickles it."""
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        b"(X\x07\x00\x00\x00storageq\x00ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ"
        + struct.pack("<i", n)
        + b"tQK\x00J"
        + struct.pack("<i", n)
        + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRq\x07"
    )


def _pickles() -> dict[str, tuple[bytes, type[BaseException]]]:
    """Hand-built pickles; every one uses only opcodes torch.save writes (check with pickletools.dis)."""
    s = pickle.dumps
    ints = b"".join(b"M" + struct.pack("<H", i) for i in range(5000))
    return {
        # item 1: bytearray(N) from torch's allow-list (torch.load would allocate N bytes)
        "bytearray-2GB": (hand(b"c__builtin__\nbytearray\nJ\x00\x00\x00\x80\x85R"), RecordDecodeError),
        # [encode(s, "latin1")] + 200 more calls on the memoized str: 10 MB of bytes from 5 bytes each
        "bytes-repeats": (hand(b"](", ENCODE, b"h\x01h\x04R" * 200, b"e"), AllocationBudgetError),
        # bytearray(b) on the memoized bytes, 200 times
        "bytearray-repeats": (
            hand(b"](", ENCODE, BYTEARRAY, b"h\x06\x85R", b"h\x05h\x06\x85R" * 200, b"e"),
            AllocationBudgetError,
        ),
        # nested: bytearray(encode(s, "latin1")) on the memoized str, 200 times
        "str-bytes-bytearray-repeats": (
            hand(b"](", ENCODE, BYTEARRAY, b"h\x06\x85R", b"h\x05h\x01h\x04R\x85R" * 200, b"e"),
            AllocationBudgetError,
        ),
        # set(L) on one memoized list of 5000 ints, 400 times (each set costs ~90 bytes an element)
        "set-of-list-repeats": (
            hand(b"](c__builtin__\nset\nq\x01]q\x02(", ints, b"e\x85R", b"h\x01h\x02\x85R" * 400, b"e"),
            AllocationBudgetError,
        ),
        "empty-dicts": (hand(b"(", b"}" * 300_000, b"l"), CorruptStoreError),  # LIST: not what torch.save writes
        "empty-dict-appends": (hand(b"](", b"}" * 300_000, b"e"), AllocationBudgetError),
        "mark-list-of-refs": (hand(b"]q\x01(", b"h\x01" * 100_000, b"la"), RecordDecodeError),
        "deep-nesting": (hand(b"]" * 100_000, b"a" * 99_999), AllocationBudgetError),
        "str-global": (hand(b"c__builtin__\nstr\nJ\x00\x00\x00\x40\x85R"), UnsafePayloadError),
        "protocol-4": (s([1, 2], protocol=4), RecordDecodeError),
        "os-system": (hand(b"cposix\nsystem\nX\x04\x00\x00\x00true\x85R"), UnsafePayloadError),
    }


def _stride0_tensor() -> bytes:
    """A 4-byte storage viewed as 2**40 elements of stride 0 (numel claims 4 TiB)."""
    pkl = hand(
        b"ctorch._utils\n_rebuild_tensor_v2\n(",
        b"(X\x07\x00\x00\x00storageq\x00ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ",
        b"K\x00\x8a\x06\x00\x00\x00\x00\x00\x01\x85K\x00\x85\x89ccollections\nOrderedDict\n)Rt",
        b"R",
    )
    return torch_zip(pkl, {"0": b"\0\0\x80\x3f"})


def _records() -> dict[str, tuple[bytes, type[BaseException]]]:
    out = {name: (torch_zip(pkl), err) for name, (pkl, err) in _pickles().items()}
    # item 3: the DOS directory bit of data/0 (torch.load returns uninitialised bytes for it)
    t = torch_save_bytes({"x": torch.arange(1024, dtype=torch.float32)})
    names = zipfile.ZipFile(io.BytesIO(t)).namelist()
    data0 = names.index(next(n for n in names if n.endswith("data/0")))
    out["directory-bit"] = (_cd_patch(t, 38, b"\x10", data0), RecordDecodeError)
    out["flags-no-descriptor"] = (_cd_patch(GOOD, 8, b"\x00\x08"), RecordDecodeError)
    out["extra-field"] = (_rezip(GOOD, extra=b"\x99\x99\x00\x00"), RecordDecodeError)
    out["deflated-entries"] = (_rezip(GOOD, zipfile.ZIP_DEFLATED), RecordDecodeError)
    out["duplicate-names"] = (_rezip(GOOD, dup=True), RecordDecodeError)
    out["overlapping-headers"] = (_cd_patch(GOOD, 42, b"\x00\x00\x00\x00", 1), RecordDecodeError)
    out["stride0-4TiB"] = (_stride0_tensor(), AllocationBudgetError)
    # set(t) over a memoized 16384-element tensor, 20 times: a tensor object per element each
    # time (C++ memory, invisible to tracemalloc: 220 MB RSS before the fix)
    set_t = hand(b"](", _tensor_op(16384), b"c__builtin__\nset\nq\x08", b"h\x08h\x07\x85R" * 20, b"e")
    out["set-of-tensor-repeats"] = (torch_zip(set_t, {"0": bytes(4 * 16384)}), RecordDecodeError)
    # item 4: invalid sparse tensors (the writer refuses them; a hostile writer does not)
    coo = torch.sparse_coo_tensor([[0, 5], [0, 0]], [1.0, 2.0], (2, 2), check_invariants=False)
    csr = torch.sparse_csr_tensor([0, 1, 2], [0, 7], [1.0, 2.0], (2, 2), check_invariants=False)
    out["sparse-coo-index-out-of-range"] = (torch_save_bytes(coo), RecordDecodeError)
    out["sparse-csr-column-out-of-range"] = (torch_save_bytes(csr), RecordDecodeError)
    # item 6: not a zip at all
    out["not-a-zip"] = (b"hello, not a zip" * 10, RecordDecodeError)
    return out


RECORDS = _records()


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("kind", list(RECORDS))
def test_hostile_record(tmp_path: Path, kind: str, codec: str) -> None:
    raw, error = RECORDS[kind]
    c = get_codec(CODECS[codec])
    frames = [(len(GOOD), c.compress(GOOD)), (len(raw), c.compress(raw)), (len(GOOD), c.compress(GOOD))]
    store = build_store(tmp_path / "s", [frames], CODECS[codec])
    r = open_store(store)
    peak, err = peak_bytes(lambda: r[1])
    assert isinstance(err, error), repr(err)
    assert "record 1" in str(err) and "shard-00000.tspt" in str(err)
    assert peak < PEAK_BOUND, f"{kind}/{codec}: peak {peak} bytes"
    assert torch.equal(r[2]["x"], sample(0)["x"])  # the reader goes on
    report = verify_store(store, deep=True)
    assert [p.record for p in report.problems] == [1], report.problems
    if kind == "directory-bit":  # torch.load itself returns uninitialised bytes here
        assert not report.ok


def test_writer_refuses_invalid_sparse(tmp_path: Path) -> None:
    coo = torch.sparse_coo_tensor([[0, 5], [0, 0]], [1.0, 2.0], (2, 2), check_invariants=False)
    csr = torch.sparse_csr_tensor([0, 1, 2], [0, 7], [1.0, 2.0], (2, 2), check_invariants=False)
    for bad in (coo, csr):
        with pytest.raises(UnsupportedSampleError, match=r"sample\[\"s\"\]: an invalid torch.sparse"):
            write_store([{"s": bad}], tmp_path / f"s{bad.layout}".replace(".", "_"))
    liar = torch.sparse_coo_tensor([[1, 0], [0, 0]], [1.0, 2.0], (2, 2), is_coalesced=True, check_invariants=False)
    with pytest.raises(UnsupportedSampleError, match="coalesced"):
        write_store([{"s": liar}], tmp_path / "liar")
    good = torch.sparse_coo_tensor([[1, 0], [0, 0]], [1.0, 2.0], (2, 2))
    write_store([{"s": good}, {"s": good.coalesce()}], tmp_path / "ok")
    r = open_store(tmp_path / "ok")
    assert not r[0]["s"].is_coalesced() and r[1]["s"].is_coalesced()  # coalesced state is kept


# --------------------------------------------------------------------------- codec tricks


GiB = 2**30
_ZSTD_BLOCK = 128 * 1024  # RFC 8878: Block_Maximum_Size
_LZ4_BLOCK = 4 * MiB  # LZ4 frame format: the largest Block Maximum Size (BD 7)


def _zstd_rle_frame(claim: int, byte: int = 0) -> bytes:
    """A zstd frame (RFC 8878) of RLE blocks, 4 bytes per 128 KiB, decoding to ``claim`` bytes.

    Frame header: magic, Frame_Header_Descriptor 0xC0 (Frame_Content_Size 8 bytes, not single
    segment, so a Window_Descriptor follows: exponent 7, 128 KiB), the content size. Each block
    header is 3 bytes little-endian: Last_Block (bit 0), Block_Type 1 = RLE (bits 1-2),
    Block_Size = the regenerated size (bits 3-23), then the one byte to repeat.
    """
    out = [b"\x28\xb5\x2f\xfd" + bytes([0xC0, 7 << 3]) + struct.pack("<Q", claim)]
    left = claim
    while True:
        n = min(left, _ZSTD_BLOCK)
        left -= n
        last = int(left == 0)
        out.append(struct.pack("<I", last | (1 << 1) | (n << 3))[:3] + bytes([byte]))
        if last:
            return b"".join(out)


def _lz4_zero_frame(claim: int) -> bytes:
    """An LZ4 frame of ``claim`` zero bytes (a multiple of 4 MiB), content size declared: one
    compressed 4 MiB block of zeros (about 16 KiB, near LZ4's 1:256 worst case) repeated, as
    independent blocks allow."""
    import lz4.frame
    import xxhash

    one = lz4.frame.compress(
        bytes(_LZ4_BLOCK),
        block_size=lz4.frame.BLOCKSIZE_MAX4MB,
        block_linked=False,
        store_size=False,
        content_checksum=False,
    )
    block = one[7:-4]  # between the 7-byte header (no content size) and the end mark
    if claim % _LZ4_BLOCK or len(block) - 4 != struct.unpack("<I", block[:4])[0]:
        raise ValueError(f"lz4 test frame: expected one compressed block and a multiple of 4 MiB, found {claim}")
    descriptor = bytes([0x40 | 0x20 | 0x08, 0x70]) + struct.pack("<Q", claim)  # v01, B.Indep, C.Size; BD 4 MiB
    header_checksum = (xxhash.xxh32_intdigest(descriptor) >> 8) & 0xFF
    return (
        struct.pack("<I", 0x184D2204) + descriptor + bytes([header_checksum]) + block * (claim // _LZ4_BLOCK) + bytes(4)
    )


def test_frame_builders_decode() -> None:
    import lz4.frame

    for claim in (1, 1000, _ZSTD_BLOCK, _ZSTD_BLOCK + 1, 3 * _ZSTD_BLOCK):
        frame = _zstd_rle_frame(claim, 7)
        assert zstandard.frame_content_size(frame) == claim
        assert zstandard.ZstdDecompressor().decompress(frame) == bytes([7]) * claim
    frame = _lz4_zero_frame(8 * MiB)
    assert lz4.frame.get_frame_info(frame)["content_size"] == 8 * MiB
    assert lz4.frame.decompress(frame) == bytes(8 * MiB)
    assert len(_zstd_rle_frame(GiB)) < 33_000 and len(_lz4_zero_frame(GiB)) < 4_300_000


#: Run in a fresh interpreter: each operation on record 1 of a store, and the peak resident
#: set (ru_maxrss, which sees the codecs' C allocations that tracemalloc does not) over the
#: baseline after opening the store and reading record 0, after each operation.
_CHILD = r"""
import json, resource, sys
from tensorstore_pt import open_store, verify_store
import tensorstore_pt.dataset as dataset
store = sys.argv[1]
r = open_store(store, verify=False)
r.read_bytes(0)
kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = kib()
def op(name):
    try:
        if name == "read":
            r[1]
        elif name == "read_bytes":
            return len(r.read_bytes(1))
        elif name == "verify_store":
            return [[p.kind, p.record] for p in verify_store(store, deep=True).problems]
        elif name == "iterable_skip":
            it = dataset.StoreIterableDataset(store, on_error="skip")
            return [len(list(it)), it.skip_counts()]
        else:
            dataset.StoreDataset(store)[1]
    except Exception as exc:
        return type(exc).__name__ + ": " + str(exc)
out = {}
for name in sys.argv[2:]:
    result = op(name)
    out[name] = [result, (kib() - base) * 1024]
print(json.dumps(out))
"""
_OPS = ["read", "read_bytes", "verify_store", "iterable_skip", "map_dataset"]


def _child_peaks(store: Path) -> dict[str, tuple[Any, int]]:
    """{operation: (result or "ErrorType: message", peak RSS over the baseline in bytes)};
    the peak is cumulative (each value bounds every operation before it)."""
    import json
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(store), *_OPS], capture_output=True, text=True, env=env, timeout=300
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"peak-memory child failed (rc {done.returncode}): {done.stderr[-2000:]}")
    return {k: (v[0], v[1]) for k, v in json.loads(lines[-1]).items()}


#: Frames over max_record_bytes (default 1 GiB): (codec, raw length the frame decodes to, builder).
_OVER = {
    "zstd-rle-claims-100GiB": ("zstd", 100 * GiB, lambda: _zstd_rle_frame(100 * GiB)),  # 3.2 MB frame
    "zstd-rle-claims-2GiB": ("zstd", 2 * GiB, lambda: _zstd_rle_frame(2 * GiB)),  # 64 KB frame
    "lz4-zero-blocks-2GiB": ("lz4", 2 * GiB, lambda: _lz4_zero_frame(2 * GiB)),  # 8.4 MB frame
}
#: Refusing a frame over max_record_bytes allocates nothing of its size: this much RSS at most.
OVER_RSS_BOUND = 64 * MiB


def _bomb_store(tmp_path: Path, codec: str, claim: int, frame: bytes) -> Path:
    config = CODECS[codec]
    good = get_codec(config).compress(GOOD)
    return build_store(tmp_path / "s", [[(len(GOOD), good), (claim, frame)]], config)


@pytest.mark.parametrize("kind", list(_OVER))
def test_frame_over_max_record_bytes(tmp_path: Path, kind: str) -> None:
    """The issue: a 3.2 MB zstd frame claiming 100 GiB made reads, read_bytes, verify_store and
    the datasets raise a raw MemoryError (which also defeated on_error="skip")."""
    codec, claim, build = _OVER[kind]
    frame = build()
    store = _bomb_store(tmp_path, codec, claim, frame)
    r = open_store(store, verify=False)
    for fn in (lambda: r[1], lambda: r.read_bytes(1)):
        peak, err = peak_bytes(fn)
        assert isinstance(err, AllocationBudgetError), repr(err)
        assert "record 1" in str(err) and "max_record_bytes=1073741824" in str(err)
        assert peak < len(frame) + PEAK_BOUND, f"{kind}: peak {peak} bytes, frame {len(frame)} bytes"  # the read frame
    peaks = _child_peaks(store)
    budget = "AllocationBudgetError: "
    assert peaks["read"][0].startswith(budget) and peaks["read_bytes"][0].startswith(budget), peaks
    assert peaks["map_dataset"][0].startswith(budget), peaks
    assert peaks["verify_store"][0] == [["record_budget", 1]], peaks
    assert peaks["iterable_skip"][0] == [1, {"AllocationBudgetError": 1}], peaks
    worst = max(p for _, p in peaks.values())
    print(f"\npeak RSS {kind}: {worst} bytes")
    assert worst < OVER_RSS_BOUND, f"{kind}: peak RSS {worst} bytes over the baseline"


#: Frames at max_record_bytes whose data is one repeated byte (legit-looking frames: the raw
#: length in the footer is what they decode to). Decoded, then refused as not a torch.save zip.
_AT_LIMIT = {
    "zstd-rle-1GiB": ("zstd", GiB, lambda: _zstd_rle_frame(GiB)),  # 32 KB frame
    "lz4-zero-blocks-1GiB": ("lz4", GiB, lambda: _lz4_zero_frame(GiB)),  # 4.2 MB frame
}
#: ... within the raw length plus this much RSS (the issue: 1 GiB peaked at 2.3 GiB).
AT_LIMIT_RSS_SLACK = 128 * MiB


@pytest.mark.parametrize("kind", list(_AT_LIMIT))
def test_frame_at_max_record_bytes_peaks_once(tmp_path: Path, kind: str) -> None:
    codec, claim, build = _AT_LIMIT[kind]
    store = _bomb_store(tmp_path, codec, claim, build())
    peaks = _child_peaks(store)
    assert peaks["read"][0].startswith("RecordDecodeError: ") and "record 1" in peaks["read"][0], peaks
    assert peaks["read_bytes"][0] == claim, peaks
    assert peaks["verify_store"][0] == [["record_load", 1]], peaks
    assert peaks["iterable_skip"][0] == [1, {"RecordDecodeError": 1}], peaks
    assert peaks["map_dataset"][0].startswith("RecordDecodeError: "), peaks
    worst = max(p for _, p in peaks.values())
    print(f"\npeak RSS {kind}: {worst} bytes")
    assert worst < claim + AT_LIMIT_RSS_SLACK, f"{kind}: peak RSS {worst} bytes over the baseline, raw {claim}"


def test_max_record_bytes_is_settable(tmp_path: Path) -> None:
    write_store([sample(0)], tmp_path / "s")
    with pytest.raises(AllocationBudgetError, match="max_record_bytes=100"):
        open_store(tmp_path / "s", max_record_bytes=100)[0]
    dataset = pytest.importorskip("tensorstore_pt.dataset")
    with pytest.raises(AllocationBudgetError):
        dataset.StoreDataset(tmp_path / "s", max_record_bytes=100)[0]
    assert torch.equal(open_store(tmp_path / "s", max_record_bytes=10 * MiB)[0]["x"], sample(0)["x"])


@pytest.mark.parametrize("kind", ["skippable-frame", "concatenated-frames", "other-dict-id"])
def test_zstd_frame_tricks(tmp_path: Path, kind: str) -> None:
    c = zstandard.ZstdCompressor(level=3)
    frame = c.compress(GOOD)
    if kind == "skippable-frame":
        frame = struct.pack("<II", 0x184D2A50, 8) + bytes(8) + frame
    elif kind == "concatenated-frames":
        frame = frame + frame
    else:
        d = zstandard.train_dictionary(4096, [torch_save_bytes(sample(i)) * 3 for i in range(64)])
        frame = zstandard.ZstdCompressor(level=3, dict_data=d).compress(GOOD)
    store = build_store(tmp_path / "s", [[(len(GOOD), frame)]], CODECS["zstd"])
    with pytest.raises(CorruptStoreError, match="record 0"):
        open_store(store)[0]
    assert [p.record for p in verify_store(store, deep=True).problems] == [0]


# --------------------------------------------------------------------------- differential fuzz


def _mutate(rng: random.Random, buf: bytes) -> bytes:
    b = bytearray(buf)
    for _ in range(rng.randrange(1, 4)):
        kind = rng.randrange(4)
        i = rng.randrange(len(b))
        if kind == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[i] = rng.randrange(256)
        elif kind == 2 and i < len(b) - 4:
            b[i : i + 4] = struct.pack("<I", rng.choice((0, 1, 0xFFFFFFFF, rng.randrange(len(buf) + 64))))
        else:
            b[i : i + rng.randrange(1, 16)] = b""
    return bytes(b)


def test_differential_fuzz_fast_decoder_vs_torch_load() -> None:
    """Mutated valid records: the fast decoder refuses, or returns what torch.load returns,
    bit for bit, and the same bytes twice (never uninitialised memory). ``TSPT_FUZZ_N`` sets
    the number of mutations (default 1500, a few seconds)."""
    n = int(os.environ.get("TSPT_FUZZ_N", "1500"))
    rng = random.Random(11)
    bases = [
        torch_save_bytes({"x": torch.arange(64, dtype=torch.float32), "y": [1, "a", b"b"]}),
        torch_save_bytes((torch.ones(3, 4).t(), {"k": torch.tensor(7)})),
    ]
    for step in range(n):
        buf = _mutate(rng, bases[step % len(bases)])
        try:
            got = fast_loads(buf)
        except (CorruptStoreError, UnsafePayloadError):
            continue
        again = fast_loads(buf)
        expected = torch.load(io.BytesIO(buf), weights_only=True)
        for a, b, e in zip(tensors_of(got), tensors_of(again), tensors_of(expected)):
            assert a.dtype == e.dtype and a.shape == e.shape and a.stride() == e.stride()
            ua, ub, ue = (t.contiguous().view(-1).view(torch.uint8) if t.numel() else t for t in (a, b, e))
            assert torch.equal(ua, ub) and torch.equal(ua, ue)


# --------------------------------------------------------------------------- format 1.2: raw frames


def _raw_frame_store(path: Path, raws: list[bytes], codec: str = "zstd") -> Path:
    """A store whose every frame is stored raw (format 1.2), built below the writer so that
    hostile records (which the writer refuses) can be stored."""
    from tensorstore_pt.checksums import digest_int
    from tensorstore_pt.format import IndexInfo, encode_index, footer_meta
    from tensorstore_pt.shardio import ShardBuilder
    from tensorstore_pt.storage import storage_for

    path.mkdir()
    storage = storage_for(path)
    out = ShardBuilder(storage, "shard-00000.tspt", 0, footer_meta([], CODECS[codec]), multi=False)
    for raw in raws:
        out.add(raw, digest_int(raw), [len(raw)], raw=True)
    entry = out.close()
    info = IndexInfo.build(CODECS[codec], [entry], {}, {}, features=("raw-frames",))
    (path / "index.json").write_bytes(encode_index(info))
    return path


@pytest.mark.parametrize("kind", list(RECORDS))
def test_hostile_record_stored_raw(tmp_path: Path, kind: str) -> None:
    """A hostile record in a raw frame meets the same record checks as in a codec frame."""
    raw, error = RECORDS[kind]
    store = _raw_frame_store(tmp_path / "s", [GOOD, raw, GOOD])
    r = open_store(store)
    assert raw_frames_runs(r._footer(0).raw_mask) == [[0, 3]]
    peak, err = peak_bytes(lambda: r[1])
    assert isinstance(err, error), repr(err)
    assert "record 1" in str(err)
    assert peak < PEAK_BOUND, f"{kind}: peak {peak} bytes"
    assert torch.equal(r[2]["x"], sample(0)["x"])
    assert [p.record for p in verify_store(store, deep=True).problems] == [1]


def _lie(store: Path, meta_edit: Any = None, raw_of_frame_1: int | None = None) -> None:
    """Rewrite the footer of a raw-frame store (a consistent lie: checksums resealed)."""
    import json as _json

    import numpy as np
    from _store_tools import reseal_index

    from tensorstore_pt.format import RECORD_DTYPE, TRAILER_BYTES, decode_trailer, encode_footer

    path = store / "shard-00000.tspt"
    data = path.read_bytes()
    table_offset, count, js, _ = decode_trailer(data[-TRAILER_BYTES:], len(data), str(path))
    table = np.frombuffer(data, dtype=RECORD_DTYPE, count=count, offset=table_offset).copy()
    meta = _json.loads(data[len(data) - TRAILER_BYTES - js : len(data) - TRAILER_BYTES])
    if meta_edit is not None:
        meta_edit(meta)
    if raw_of_frame_1 is not None:
        table["raw"][1] = raw_of_frame_1
    path.write_bytes(data[:table_offset] + encode_footer(table, meta))
    reseal_index(store)


RAW_FRAME_LIES = {
    # A raw frame whose table row says another raw length than its stored one: 64 bytes more
    # (the footer check refuses it), or 1 GiB (the index's bound refuses it before any shard).
    "raw-length-differs": {"raw_of_frame_1": len(GOOD) + 64},
    "raw-length-claims-1GiB": {"raw_of_frame_1": 2**30},
    "flag-index-past-frame-count": {"meta_edit": lambda m: m.update(raw_frames=[[0, 4]])},
    "duplicate-flags": {"meta_edit": lambda m: m.update(raw_frames=[[0, 2], [1, 2], [2, 3]])},
    "flags-not-a-list": {"meta_edit": lambda m: m.update(raw_frames={"0": 1})},
    "negative-flag": {"meta_edit": lambda m: m.update(raw_frames=[[-1, 3]])},
}


@pytest.mark.parametrize("kind", list(RAW_FRAME_LIES))
def test_hostile_raw_frame_flags(tmp_path: Path, kind: str) -> None:
    store = _raw_frame_store(tmp_path / "s", [GOOD, GOOD, GOOD])
    _lie(store, **RAW_FRAME_LIES[kind])
    peak, err = peak_bytes(lambda: open_store(store)[1])
    assert isinstance(err, (CorruptStoreError, IndexFormatError)), repr(err)
    assert "shard-00000.tspt" in str(err)
    assert peak < PEAK_BOUND, f"{kind}: peak {peak} bytes"
    assert not verify_store(store, deep=True).ok
