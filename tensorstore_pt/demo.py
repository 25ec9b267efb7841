"""``tspt demo``: the main job on a real dataset, with no download.

The dataset is scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten
Digits" test set (``sklearn.datasets.load_digits``): 1,797 grey-level 8x8 images with
values 0..16 and their labels 0..9. Each sample is ``(image, label)`` with ``image`` a
``torch.uint8`` tensor of shape (8, 8) (the values are small integers, so the conversion from
sklearn's float64 is exact) and ``label`` a 0-dim ``torch.int64`` tensor.

The demo packs the samples with codecs none, lz4 and zstd, and zstd with a trained
dictionary and with 64 KiB multi-record frames (format 1.1), verifies each store, reads every
sample back and checks it bit-exactly against the source, and prints a table beside the
baseline: one ``torch.save`` file per sample, read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["digits_samples", "run_demo"]


def digits_samples() -> list[tuple[Any, Any]]:
    """Return the 1,797 (uint8 8x8 image, int64 label) samples of scikit-learn's digits.

    Raises:
        ImportError: If scikit-learn is not installed (``pip install tensorstore_pt[demo]``).
    """
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images
    if not np.array_equal(images, np.round(images)) or images.min() < 0 or images.max() > 255:
        raise ValueError("load_digits() images are expected to be integers in 0..255")
    images_u8 = torch.from_numpy(images.astype(np.uint8))
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return [(images_u8[i].clone(), labels[i].clone()) for i in range(len(labels))]


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _median_rate(n: int, fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: page cache and lazy handles, for every system alike
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def _disk_bytes(paths: list[Path]) -> tuple[int, int]:
    """(sum of file sizes, sum of allocated bytes as st_blocks * 512)."""
    size = alloc = 0
    for p in paths:
        st = os.stat(p)
        size += st.st_size
        alloc += st.st_blocks * 512
    return size, alloc


def run_demo(workdir: str | None = None, repeats: int = 5, out: Callable[[str], None] = print) -> int:
    """Run the demo; print the table; return 0 if every check passed, else 1.

    Args:
        workdir: Directory for the stores and the per-file baseline; a temporary directory
            (removed afterwards) if None.
        repeats: Timed read repetitions after one warm-up; the median is reported.
        out: Where lines go (``print`` by default).
    """
    import torch

    from .reader import open_store
    from .writer import write_store

    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, found {repeats}")
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tspt-demo-")
        root = Path(tmp.name)
    else:
        root = Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
    try:
        samples = digits_samples()
        n = len(samples)
        out(f"dataset: scikit-learn digits, {n} samples of (uint8 8x8 image, int64 label)")
        out(f"torch {torch.__version__}; reads: median of {repeats} runs after a warm-up, warm page cache\n")
        rows = []
        ok = True

        # Baseline: one torch.save file per sample.
        base = root / "per-sample-pt"
        base.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        files = []
        for i, s in enumerate(samples):
            f = base / f"{i:05d}.pt"
            torch.save(s, f)
            files.append(f)
        pack_s = time.perf_counter() - t0

        def read_files() -> None:
            for f in files:
                torch.load(f, weights_only=True)

        back = [torch.load(f, weights_only=True) for f in files]
        ok &= all(_same(a, b) for a, b in zip(samples, back))
        size, alloc = _disk_bytes(files)
        rate = _median_rate(n, read_files, repeats)
        rows.append(("1 .pt file per sample", len(files), size, alloc, pack_s, rate, "ok" if ok else "MISMATCH"))
        base_rate, base_alloc = rate, alloc

        configs = [
            ("none", {"codec": "none"}),
            ("lz4", {"codec": "lz4"}),
            ("zstd", {"codec": "zstd"}),
            ("zstd+dict", {"codec": "zstd", "dictionary": True}),
            ("zstd+frames", {"codec": "zstd", "frame_target_bytes": 64 * 2**10}),
        ]
        for name, options in configs:
            path = root / f"store-{name}"
            t0 = time.perf_counter()
            info = write_store(samples, path, mode="overwrite", metadata={"dataset": "sklearn digits"}, **options)
            pack_s = time.perf_counter() - t0
            reader = open_store(path)
            reader.verify()
            got = list(reader)
            same = len(got) == n and all(_same(a, b) for a, b in zip(samples, got))
            ok &= same

            def read_store(reader: Any = reader) -> None:
                for _ in reader:
                    pass

            store_files = [p for p in path.iterdir() if p.is_file()]  # shards, index, dictionary
            size, alloc = _disk_bytes(store_files)
            rate = _median_rate(n, read_store, repeats)
            label = f"tensorstore_pt {info.codec['id']}" + (f"-{info.codec['level']}" if "level" in info.codec else "")
            if "dict" in info.codec:
                label += " + dictionary"
            if "frame_target_bytes" in options:
                label += f" + {options['frame_target_bytes'] // 1024} KiB frames"
            rows.append((label, len(store_files), size, alloc, pack_s, rate, "ok" if same else "MISMATCH"))

        header = ("system", "files", "bytes", "allocated", "vs base", "pack s", "read samples/s", "vs base", "check")
        table = [header]
        for label, nfiles, size, alloc, pack_s, rate, check in rows:
            table.append(
                (
                    label,
                    f"{nfiles:,}",
                    f"{size:,}",
                    f"{alloc:,}",
                    f"{alloc / base_alloc:.3f}x",
                    f"{pack_s:.2f}",
                    f"{rate:,.0f}",
                    f"{rate / base_rate:.2f}x",
                    check,
                )
            )
        widths = [max(len(r[c]) for r in table) for c in range(len(header))]
        for k, r in enumerate(table):
            out("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))))
            if k == 0:
                out("  ".join("-" * w for w in widths))
        out(
            "\nbytes: sum of file sizes (stores: shards, index.json and any dictionary); allocated: st_blocks x 512, what the "
            "file system really uses; vs base: against the per-sample files."
        )
        out("every store verified clean and every sample read back bit-exact" if ok else "FAILED: see the check column")
        return 0 if ok else 1
    finally:
        if tmp is not None:
            tmp.cleanup()

