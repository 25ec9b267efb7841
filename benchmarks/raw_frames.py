"""Raw frames: read time of zstd-3 / lz4 frames vs the same records stored raw (format 1.2).

For each data kind (``state``: float32 model weights, one tensor a record; ``large``: float16
log-mel spectrograms + int16 audio; ``medium``: uint8 image patches), every record is
serialised as the writer does (``torch.save`` bytes), compressed with zstd level 3 and lz4
level 0, and the frames are written back to back to a temporary file (warm page cache). One
round reads every record the way ``StoreReader.read`` does, once per layout, interleaved:

- codec: ``os.pread`` of the stored frame, XXH3-64 of it, decode into a fresh ``bytearray``;
- raw: ``os.pread`` of the raw bytes, XXH3-64 of them, one copy into a fresh ``bytearray``
  (the writable buffer tensors are built over).

Printed per kind and codec: the saving ``1 - stored / raw`` (whole kind and per-record
quartiles), the median over rounds of each layout's time per raw MB, and their ratio (codec
/ raw, measured in the same round); then, per saving bucket, the same ratio for the records
in that bucket. Break-even: the storage bandwidth (MB/s) at which the bytes saved by the codec
take as long to read as its extra decode time: ``saving x raw / (t_codec - t_raw)``. Below
that bandwidth the codec wins on cold reads; above it (page cache, local NVMe) raw wins.

    python -m benchmarks.raw_frames [--rounds 7] [--scale full] [--stores] [--kinds state,large,medium]

``--stores`` first reads whole stores of the ``state`` kind end to end (``reader[i]``),
written with ``raw_below`` 0, 0.05 and 0.10.

No assertions: this script only prints (docs/benchmarks.md, "Raw frames").
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from benchmarks.kinds import build_kind
from tensorstore_pt.checksums import digest_int
from tensorstore_pt.codecs import make_codec
from tensorstore_pt.serialization import dumps

BUCKETS = (0.0, 0.02, 0.05, 0.10, 0.20, 0.50, 1.01)


def _round(fd: int, rows: list[tuple[int, int, int]], codec) -> tuple[np.ndarray, np.ndarray]:
    """Per record: seconds of the codec read and of the raw read (interleaved per record)."""
    t_codec = np.zeros(len(rows))
    t_raw = np.zeros(len(rows))
    for k, (off_c, stored, raw_off_len) in enumerate(rows):
        raw_off, raw_len = raw_off_len
        t0 = time.perf_counter()
        frame = os.pread(fd, stored, off_c)
        digest_int(frame)
        codec.decompress_into(frame, raw_len)
        t1 = time.perf_counter()
        data = os.pread(fd, raw_len, raw_off)
        digest_int(data)
        bytearray(data)
        t2 = time.perf_counter()
        t_codec[k], t_raw[k] = t1 - t0, t2 - t1
    return t_codec, t_raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--scale", default="full", choices=("full", "quick"))
    parser.add_argument("--kinds", default="state,large,medium")
    parser.add_argument("--stores", action="store_true", help="also read whole stores of the state kind")
    args = parser.parse_args()
    if args.stores:
        print("end to end, reader[i] over every record:")
        store_reads(args.rounds, args.scale)
    print(f"rounds: {args.rounds} (median), scale {args.scale}; times per raw MB (1e6 bytes)")
    for name in args.kinds.split(","):
        raws = [dumps(s) for s in build_kind(name, args.scale).samples]
        total = sum(map(len, raws))
        print(f"\n{name}: {len(raws)} records, {total / 1e6:.1f} MB raw")
        for codec_name, level in (("zstd", 3), ("lz4", 0)):
            codec = make_codec(codec_name, level)
            frames = [codec.compress(r) for r in raws]
            with tempfile.TemporaryFile() as f:
                rows = []
                pos = 0
                for fr, r in zip(frames, raws):
                    f.write(fr)
                    f.write(r)
                    rows.append((pos, len(fr), (pos + len(fr), len(r))))
                    pos += len(fr) + len(r)
                f.flush()
                fd = f.fileno()
                _round(fd, rows, codec)  # warm-up: page cache, codec contexts
                per_c, per_r = [], []
                for _ in range(args.rounds):
                    c, r = _round(fd, rows, codec)
                    per_c.append(c)
                    per_r.append(r)
            tc = np.median(np.stack(per_c), axis=0)
            tr = np.median(np.stack(per_r), axis=0)
            raw_len = np.array([len(r) for r in raws], dtype=np.float64)
            saving = 1 - np.array([len(fr) for fr in frames]) / raw_len
            whole = 1 - sum(map(len, frames)) / total
            q = np.percentile(saving, [25, 50, 75])
            mb = total / 1e6
            print(
                f"  {codec_name}-{level}: saving {whole:6.1%} "
                f"(per record q25/q50/q75 {q[0]:.1%}/{q[1]:.1%}/{q[2]:.1%}); "
                f"read {tc.sum() / mb * 1e3:.3f} ms/MB vs raw {tr.sum() / mb * 1e3:.3f} ms/MB: "
                f"ratio {tc.sum() / tr.sum():.2f}x"
            )
            for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:]):
                m = (saving >= lo) & (saving < hi)
                if not m.any():
                    continue
                extra = tc[m].sum() - tr[m].sum()
                saved = float((saving[m] * raw_len[m]).sum())
                breakeven = saved / extra / 1e6 if extra > 0 else float("inf")
                print(
                    f"    saving [{lo:4.0%}, {min(hi, 1):4.0%}): {int(m.sum()):5d} records, "
                    f"{raw_len[m].sum() / 1e6:8.2f} MB, read ratio {tc[m].sum() / tr[m].sum():5.2f}x, "
                    f"break-even bandwidth {breakeven:9.0f} MB/s"
                )


def store_reads(rounds: int, scale: str) -> None:
    """End to end: every record of the ``state`` kind read with ``reader[i]`` from a store
    written with ``raw_below=0`` (all frames coded) and with the default and 0.10, per codec;
    median over rounds of the whole pass, ratio against the coded store in the same round."""
    import tensorstore_pt as ts

    samples = build_kind("state", scale).samples
    with tempfile.TemporaryDirectory() as tmp:
        for codec in ("zstd", "lz4"):
            layouts = {f"raw_below={rb}": rb for rb in (0, 0.05, 0.10)}
            readers = {}
            for label, rb in layouts.items():
                path = os.path.join(tmp, f"{codec}-{rb}")
                info = ts.write_store(samples, path, codec=codec, raw_below=rb)
                readers[label] = (ts.open_store(path), info.file_bytes)
            times: dict[str, list[float]] = {label: [] for label in layouts}
            for _ in range(rounds + 1):
                for label, (reader, _) in readers.items():
                    t0 = time.perf_counter()
                    for i in range(len(reader)):
                        reader[i]
                    times[label].append(time.perf_counter() - t0)
            base = np.median(times["raw_below=0"][1:])
            for label, (reader, file_bytes) in readers.items():
                t = np.median(times[label][1:])
                share = np.mean(
                    [
                        f.is_raw(k)
                        for f in (reader._footer(s) for s in range(reader.info().shards))
                        for k in range(len(f.table))
                    ]
                )
                print(
                    f"  state {codec}-{label:14s}: {file_bytes:,} bytes, {share:5.1%} frames raw, "
                    f"read all {t * 1e3:7.1f} ms ({t / base:.2f}x the coded store)"
                )


if __name__ == "__main__":
    main()
