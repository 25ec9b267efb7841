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
Sizes are compared bytes with bytes (sum of file sizes) and, separately, allocated blocks with
allocated blocks.

The second part builds from the same data the four shapes people ``torch.save`` a dataset
in, and packs each as ``tspt pack`` does (:mod:`tensorstore_pt.sources`):

1. a tuple of equal-length tensors, ``torch.save((images, labels))``: one record per row;
2. a list of tensors of different lengths (the images of each digit, 10 tensors);
3. a dict of columns, ``torch.save({"image": images, "label": labels})``;
4. a directory of ``.pt`` files, one sample each, in ``train/`` and ``val/`` (``--recursive``).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .format import LOCK_NAME

__all__ = ["digits_samples", "run_demo", "tutorial_shapes"]


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
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


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


def tutorial_shapes(root: Path, samples: list[tuple[Any, Any]]) -> list[tuple[str, Path, list[Any]]]:
    """Write the four shapes people ``torch.save`` under ``root``.

    Returns:
        (name, path, the samples packing it should give) for each shape.
    """
    import torch

    images = torch.stack([s[0] for s in samples])
    labels = torch.stack([s[1] for s in samples])
    root.mkdir(parents=True, exist_ok=True)
    shapes: list[tuple[str, Path, list[Any]]] = []

    tup = root / "tuple.pt"
    torch.save((images, labels), tup)
    shapes.append(("tuple (images, labels)", tup, [(images[i], labels[i]) for i in range(len(samples))]))

    by_digit = [images[labels == d] for d in range(10)]  # 10 tensors of different lengths
    lst = root / "list.pt"
    torch.save(by_digit, lst)
    shapes.append(("list of 10 (n_d, 8, 8)", lst, by_digit))

    cols = root / "dict.pt"
    torch.save({"image": images, "label": labels}, cols)
    shapes.append(("dict of columns", cols, [{"image": images[i], "label": labels[i]} for i in range(len(samples))]))

    tree = root / "files"
    split = len(samples) * 4 // 5
    expected = []
    for sub, part in (("train", samples[:split]), ("val", samples[split:])):
        (tree / sub).mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(part):
            torch.save(s, tree / sub / f"{i}.pt")
        expected += list(part)
    shapes.append(("dir train/ + val/", tree, expected))
    return shapes


def _pack_shapes(root: Path, samples: list[tuple[Any, Any]], out: Callable[[str], None]) -> bool:
    """The demo's second part: pack the four shapes as ``tspt pack`` does; print a table."""
    from .reader import open_store
    from .sources import open_source
    from .writer import write_store

    out("\npart 2: the four shapes people torch.save, packed as `tspt pack SRC DEST` reads them")
    ok = True
    table = [("torch.save shape", "read as", "records", "source bytes", "zstd-3 bytes", "zstd-3 + frames", "check")]
    notes = []
    for name, path, expected in tutorial_shapes(root / "shapes", samples):
        source = open_source(path, recursive=True)
        got_samples = list(source.samples)
        sizes = []
        same = len(got_samples) == len(expected)
        for options, tag in (({}, "zstd"), ({"frame_target_bytes": 64 * 2**10}, "frames")):
            store = root / "shapes" / f"store-{path.stem}-{tag}"
            info = write_store(got_samples, store, mode="overwrite", **options)
            sizes.append(info.file_bytes + (store / "index.json").stat().st_size)
            back = list(open_store(store))
            same = same and len(back) == len(expected) and all(_same(a, b) for a, b in zip(expected, back))
        ok &= same
        src_bytes = sum(f.stat().st_size for f in source.files) if source.files else path.stat().st_size
        table.append(
            (name, source.kind, f"{source.records:,}", f"{src_bytes:,}", f"{sizes[0]:,}", f"{sizes[1]:,}",
             "ok" if same else "MISMATCH")
        )  # fmt: skip
        notes.append(f"  {name}: {source.description}")
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    for k, r in enumerate(table):
        out("  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))))
        if k == 0:
            out("  ".join("-" * w for w in widths))
    out("\n".join(notes))
    out(
        "bytes: sum of file sizes (stores: shards + index). Small records pay torch.save's container (about 1.5 KB "
        "each): one-record frames can make a columns file bigger; 64 KiB frames (--frame-size 64KiB) share it."
    )
    return ok


def run_demo(
    workdir: str | None = None, repeats: int = 5, out: Callable[[str], None] = print, shapes: bool = True
) -> int:
    """Run the demo; print the table; return 0 if every check passed, else 1.

    Args:
        workdir: Directory for the stores and the per-file baseline; a temporary directory
            (removed afterwards) if None.
        repeats: Timed read repetitions after one warm-up; the median is reported.
        out: Where lines go (``print`` by default).
        shapes: Also run the second part: pack the four ``torch.save`` shapes.
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
        base_rate, base_size, base_alloc = rate, size, alloc

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

            # shards, index, dictionary (not the writers' lock file, empty once no writer runs)
            store_files = [p for p in path.iterdir() if p.is_file() and p.name != LOCK_NAME]
            size, alloc = _disk_bytes(store_files)
            rate = _median_rate(n, read_store, repeats)
            label = f"tensorstore_pt {info.codec['id']}" + (f"-{info.codec['level']}" if "level" in info.codec else "")
            if "dict" in info.codec:
                label += " + dictionary"
            if "frame_target_bytes" in options:
                label += f" + {options['frame_target_bytes'] // 1024} KiB frames"
            rows.append((label, len(store_files), size, alloc, pack_s, rate, "ok" if same else "MISMATCH"))

        header = (
            "system", "files", "bytes", "bytes vs base", "allocated", "allocated vs base", "pack s", "read samples/s",
            "read vs base", "check",
        )  # fmt: skip
        table = [header]
        for label, nfiles, size, alloc, pack_s, rate, check in rows:
            table.append(
                (
                    label,
                    f"{nfiles:,}",
                    f"{size:,}",
                    f"{size / base_size:.3f}x",
                    f"{alloc:,}",
                    f"{alloc / base_alloc:.3f}x" if base_alloc else "-",
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
            "file system really uses (each small file takes at least one block). Each 'vs base' compares like with like: "
            "bytes with the per-sample files' bytes, allocated with their allocated blocks, reads with their reads."
        )
        if shapes:
            ok &= _pack_shapes(root, samples, out)
        out(
            "\nevery store verified clean and every sample read back bit-exact"
            if ok
            else "FAILED: see the check column"
        )
        return 0 if ok else 1
    finally:
        if tmp is not None:
            tmp.cleanup()
