"""Benchmarked systems: one adapter per system behind :class:`~benchmarks.systems.abc.System`.

Adapters of peers import their package only when used, so listing systems never needs them.
"""

from __future__ import annotations

from .abc import PackOptions, System, collate_list

__all__ = ["BASELINE", "QUICK_SYSTEMS", "PackOptions", "System", "all_systems", "collate_list", "get_systems"]

#: The system every ratio is taken against (measured in the same run).
BASELINE = "pt-files"

#: ``--quick`` runs every adapter once: the baselines, tensorstore_pt (no codec and its
#: default zstd), the peers.
QUICK_SYSTEMS = ("pt-files", "pt-list", "tspt-none", "tspt-zstd3", "mds-zstd", "litdata-zstd", "wds-tar")


def all_systems() -> list[System]:
    """Every system, in report order: baselines, tensorstore_pt configurations, peers."""
    from .peer_litdata import LitData
    from .peer_mds import MosaicMDS
    from .peer_webdataset import WebDatasetTar
    from .torch_files import TorchFiles, TorchList
    from .tspt import tspt_systems

    return [TorchFiles(), TorchList(), *tspt_systems(), MosaicMDS(), LitData(), WebDatasetTar()]


def get_systems(names: list[str] | None = None) -> list[System]:
    """The systems named (all if None), in report order; the baseline is always included.

    Raises:
        KeyError: An unknown name; the message lists the known ones.
    """
    systems = all_systems()
    if names is None:
        return systems
    known = {s.name for s in systems}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown system(s) {unknown}; known: {sorted(known)}")
    wanted = set(names) | {BASELINE}
    return [s for s in systems if s.name in wanted]
