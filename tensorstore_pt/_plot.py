"""Bar charts of an :class:`~tensorstore_pt.audit.AuditReport` (matplotlib, an optional extra).

matplotlib is imported when :func:`plot_audit` is called, never at package import, and the
non-interactive Agg backend is used, so this works on machines without a display.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import InvalidOptionError

__all__ = ["plot_audit"]


def _mib(n: int) -> float:
    return n / 2**20


def plot_audit(report: Any, path: str | os.PathLike[str]) -> None:
    """Draw the audit as three bar charts into one image file.

    Panels: raw bytes by part (tensor payload by key, pickle, zip container); tensor bytes by
    dtype; projected bytes on disk by codec candidate (with the current size for reference).
    Sizes are in MiB (2**20 bytes).

    Args:
        report: An :class:`~tensorstore_pt.audit.AuditReport`.
        path: The output image; the format follows the suffix (``.png``, ``.svg``, ``.pdf``).

    Raises:
        InvalidOptionError: matplotlib is not installed, or the suffix is not an image format
            matplotlib writes.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InvalidOptionError(
            "--plot needs matplotlib, which is not installed: pip install 'tensorstore_pt[plot]'"
        ) from exc
    b = report.breakdown
    fig, axes = plt.subplots(
        1, 3, figsize=(16, 4.8), constrained_layout=True, gridspec_kw={"width_ratios": [1, 0.8, 1.6]}
    )

    parts = {f"tensor: {k}": v for k, v in list(b.by_key.items())[:12]}
    rest = sum(list(b.by_key.values())[12:])
    if rest:
        parts["tensor: (other keys)"] = rest
    parts["pickle"] = b.pickle_bytes
    parts["zip container"] = b.zip_bytes
    ax = axes[0]
    ax.barh(
        list(parts), [_mib(v) for v in parts.values()], color=["#4c72b0"] * (len(parts) - 2) + ["#dd8452", "#c44e52"]
    )
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    what = (
        "the file as it is"
        if report.kind == "pt_file"
        else f"{b.records:,} {'files' if report.kind == 'pt_dir' else 'records'}"
    )
    ax.set_title(f"bytes by part ({what})")

    ax = axes[1]
    ax.bar(list(b.by_dtype), [_mib(v) for v in b.by_dtype.values()], color="#55a868")
    ax.set_ylabel("MiB")
    ax.set_title("tensor bytes by dtype")
    ax.tick_params(axis="x", rotation=30)

    ax = axes[2]
    now = report.allocated_bytes or report.disk_bytes
    labels = ["now (blocks)" if report.allocated_bytes else "now"] + [p.label for p in report.projections]
    values = [now] + [p.file_bytes for p in report.projections]
    colors = ["#8c8c8c"] + ["#c44e52" if p.label == report.recommendation else "#4c72b0" for p in report.projections]
    bars = ax.bar(labels, [_mib(v) for v in values], color=colors)
    for bar, p in zip(bars[1:], report.projections):
        ax.annotate(
            f"{p.decode_mb_s:,.0f} MB/s",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_ylabel("MiB on disk")
    ax.set_title("bytes by codec (label: decode MB/s)")
    ax.tick_params(axis="x", rotation=30)

    fig.suptitle(f"tspt audit: {report.source}", fontsize=10)
    try:
        fig.savefig(os.fspath(path), dpi=110)
    except ValueError as exc:
        raise InvalidOptionError(f"--plot {os.fspath(path)!r}: {exc}") from exc
    finally:
        plt.close(fig)
