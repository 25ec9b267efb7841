"""What the benchmark ran on: CPU, cores, memory, kernel, file system, load."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["load_average", "machine_info"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _filesystem(path: Path) -> str | None:
    """The file system type holding ``path`` (longest matching mount point in /proc/mounts)."""
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            mounts = [line.split()[:3] for line in f]
    except OSError:
        return None
    target = str(path.resolve())
    best = None
    for _, mount_point, fstype in mounts:
        if target == mount_point or target.startswith(mount_point.rstrip("/") + "/"):
            if best is None or len(mount_point) > len(best[0]):
                best = (mount_point, fstype)
    return None if best is None else f"{best[1]} (mounted at {best[0]})"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where unavailable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(workdir: Path) -> dict[str, Any]:
    """The machine record stored with every result."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "memory_bytes": _mem_total_bytes(),
        "os": platform.platform(),
        "workdir_filesystem": _filesystem(workdir),
        "load_average_start": load_average(),
    }
