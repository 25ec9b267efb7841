"""Epoch order and rank/worker partitioning for the iterable dataset. Pure numpy, no torch.

Three numberings are used throughout (see docs/datasets.md):

- **record** ``i`` in ``[0, N)``: a position in the store;
- **global position** ``g`` in ``[0, N)``: a place in the epoch's order, the same for every
  rank and worker; ``EpochOrder.records_at(g)`` maps it to a record;
- **rank position** ``j`` in ``[0, L)``: a place in one rank's share of the epoch;
  ``RankSplit.global_positions(j)`` maps it to global positions (with wrap-around when the
  ranks are padded to equal length).

Within a rank, rank positions are dealt to DataLoader workers round-robin in chunks of
``chunk`` (the batch size), counted from the resume position ``start``. PyTorch's DataLoader
takes one batch from each worker in turn, so it delivers rank positions ``start, start+1, ...``
in order, whatever the number of workers.

Everything here is a function of its arguments: no global state, no Python object per record.
Permutations come from a counter-based hash (SplitMix64), not from a random generator's
stream, so an epoch's order is the same on every platform and numpy version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

__all__ = [
    "EQUALIZE_MODES",
    "BlockLayout",
    "EpochOrder",
    "RankSplit",
    "keyed_permutation",
    "mix_key",
    "plan_runs",
    "split_by_bytes",
    "worker_sample_count",
    "worker_segments",
]

#: How ranks are made equal: ``off`` (ranks differ by at most one sample), ``pad`` (wrap around
#: to the start of the epoch order), ``drop`` (leave out the tail of the epoch order).
EQUALIZE_MODES = ("off", "pad", "drop")

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_STREAM_BLOCKS = 1
_STREAM_WINDOW = 2


def _splitmix64(x: int) -> int:
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_key(*values: int) -> int:
    """Hash non-negative ints into one 64-bit key (order matters)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h


def keyed_permutation(n: int, key: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined by ``key`` alone.

    Sorts SplitMix64 hashes of ``key + idx * golden``: the same result on every platform and
    numpy version. Cost O(n log n) time, 16 bytes a position of memory.

    Returns:
        int64 array of shape (n,).
    """
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) * np.uint64(_GOLDEN) + np.uint64(key & _MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return np.argsort(z, kind="stable").astype(np.int64, copy=False)


@dataclass(frozen=True)
class BlockLayout:
    """The store cut into blocks: contiguous runs of records that never cross a shard.

    Attributes:
        starts: int64 (blocks,), the first record of each block, in store order.
        lengths: int64 (blocks,), records in each block (``block_records``, less at shard ends).
        records: N, records in the store.
        block_records: The block length in records.
        window_records: The shuffle window in global positions (also the unit of reads).

    Memory: 16 bytes a block, i.e. ``16 * N / block_records`` bytes.
    """

    starts: np.ndarray
    lengths: np.ndarray
    records: int
    block_records: int
    window_records: int

    @classmethod
    def build(cls, shard_bounds: np.ndarray, block_records: int, window_records: int) -> BlockLayout:
        """Cut shards ``[first, end)`` (int64 (shards, 2)) into blocks of ``block_records``."""
        starts: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        for first, end in np.asarray(shard_bounds, dtype=np.int64).reshape(-1, 2).tolist():
            s = np.arange(first, end, block_records, dtype=np.int64)
            starts.append(s)
            lengths.append(np.minimum(s + block_records, end) - s)
        st = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        ln = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        return cls(st, ln, int(ln.sum()), int(block_records), int(window_records))


class EpochOrder:
    """The order of one epoch: a function of (layout, shuffle, seed, epoch) alone.

    With ``shuffle``, the blocks are permuted (key ``(seed, epoch, 1)``), laid end to end, and
    then the global positions are shuffled inside consecutive windows of ``window_records``
    (window ``w`` with key ``(seed, epoch, 2, w)``). Without it, global position g is record g.

    Memory: the block permutation (24 bytes a block) plus the two most recent window
    permutations (16 bytes a window position).
    """

    def __init__(self, layout: BlockLayout, *, shuffle: bool, seed: int, epoch: int) -> None:
        self.layout = layout
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self._windows: dict[int, np.ndarray] = {}
        if self.shuffle:
            self._perm = keyed_permutation(len(layout.starts), mix_key(seed, epoch, _STREAM_BLOCKS))
            seq_lengths = layout.lengths[self._perm]
            self._seq_starts = np.concatenate([[0], np.cumsum(seq_lengths)]).astype(np.int64)
            self._block_starts = layout.starts[self._perm]

    def _window(self, w: int) -> np.ndarray:
        perm = self._windows.get(w)
        if perm is None:
            size = min(self.layout.window_records, self.layout.records - w * self.layout.window_records)
            perm = keyed_permutation(size, mix_key(self.seed, self.epoch, _STREAM_WINDOW, w))
            if len(self._windows) >= 2:
                self._windows.pop(next(iter(self._windows)))
            self._windows[w] = perm
        return perm

    def records_at(self, g: np.ndarray) -> np.ndarray:
        """Map global positions (int64 array, each in ``[0, N)``) to records (int64 array)."""
        g = np.asarray(g, dtype=np.int64)
        if not self.shuffle or g.size == 0:
            return g.copy()
        window = self.layout.window_records
        wins = g // window
        s = np.empty_like(g)
        for w in np.unique(wins).tolist():
            sel = wins == w
            s[sel] = w * window + self._window(w)[g[sel] - w * window]
        bi = np.searchsorted(self._seq_starts, s, side="right") - 1
        return self._block_starts[bi] + (s - self._seq_starts[bi])

    def all_records(self) -> np.ndarray:
        """The whole epoch order (int64 (N,)): for tests and measurements, O(N) memory."""
        return self.records_at(np.arange(self.layout.records, dtype=np.int64))


@dataclass(frozen=True)
class RankSplit:
    """One rank's share of the epoch order.

    Attributes:
        records: N, records in the store (global positions per epoch).
        world_size: Number of ranks.
        rank: This rank.
        mode: ``off``, ``pad`` or ``drop`` (see :data:`EQUALIZE_MODES`).
        base: The global position of this rank's first sample.
        length: L, this rank's samples per epoch.
        padded: Samples repeated across all ranks (``pad``), wrapping to the order's start.
        dropped: Samples left out across all ranks (``drop``): the end of the order.
    """

    records: int
    world_size: int
    rank: int
    mode: str
    base: int
    length: int
    padded: int
    dropped: int

    @classmethod
    def compute(cls, records: int, world_size: int, rank: int, mode: str) -> RankSplit:
        n, r, k = int(records), int(world_size), int(rank)
        if mode == "off":
            base, end = k * n // r, (k + 1) * n // r
            return cls(n, r, k, mode, base, end - base, 0, 0)
        if mode == "pad":
            length = -(-n // r)
            return cls(n, r, k, mode, (k * length) % n if n else 0, length, r * length - n, 0)
        if mode == "drop":
            length = n // r
            return cls(n, r, k, mode, k * length, length, 0, n - r * length)
        raise ValueError(f"equalize mode: expected one of {EQUALIZE_MODES}, found {mode!r}")

    def global_positions(self, j: np.ndarray) -> np.ndarray:
        """Map rank positions (int64, each in ``[0, length)``) to global positions."""
        g = self.base + np.asarray(j, dtype=np.int64)
        return g % self.records if self.mode == "pad" else g


def worker_sample_count(length: int, start: int, chunk: int, num_workers: int, worker: int) -> int:
    """Samples worker ``worker`` of ``num_workers`` yields from rank positions ``[start, length)``."""
    n = max(0, length - start)
    chunks = -(-n // chunk)
    if worker >= chunks:
        return 0
    mine = (chunks - worker + num_workers - 1) // num_workers
    samples = mine * chunk
    if (chunks - 1) % num_workers == worker:
        samples -= chunks * chunk - n
    return samples


def worker_segments(
    split: RankSplit, window_records: int, start: int, chunk: int, num_workers: int, worker: int
) -> Iterator[np.ndarray]:
    """Yield this worker's rank positions in order, cut where the global window changes.

    Rank position ``j >= start`` belongs to worker ``((j - start) // chunk) % num_workers``.
    Each yielded int64 array holds the worker's positions whose global positions fall in one
    window of the epoch order (one read group), in increasing ``j``.

    Memory: O(window_records / num_workers + chunks in a window) per segment; nothing
    proportional to the rank's length.
    """
    j = start
    n = split.records
    while j < split.length:
        g0 = int(split.global_positions(np.array([j]))[0])
        w_end = min((g0 // window_records + 1) * window_records, n)
        j_end = min(split.length, j + (w_end - g0))
        c0, c1 = (j - start) // chunk, (j_end - 1 - start) // chunk
        first = c0 + (worker - c0) % num_workers  # this worker's first chunk in the segment
        chunks = np.arange(first, c1 + 1, num_workers, dtype=np.int64)
        if chunks.size:
            lo = np.maximum(start + chunks * chunk, j)
            hi = np.minimum(start + (chunks + 1) * chunk, j_end)
            lengths = hi - lo
            ends = np.cumsum(lengths)
            # concatenated aranges [lo, hi): position k of the output is lo[i] + (k - ends[i-1])
            yield np.repeat(lo - (ends - lengths), lengths) + np.arange(int(ends[-1]), dtype=np.int64)
        j = j_end


def split_by_bytes(sizes: np.ndarray, cap_bytes: int) -> list[tuple[int, int]]:
    """Cut a sequence of items of ``sizes`` bytes into consecutive pieces of about ``cap_bytes``.

    An item goes to the piece in which it starts (``cumulative bytes before it // cap_bytes``),
    so a piece holds at most ``cap_bytes`` plus one item, and at least one item.

    Returns:
        ``[(lo, hi), ...]`` index ranges covering ``range(len(sizes))`` in order.
    """
    n = len(sizes)
    if n == 0:
        return []
    before = np.cumsum(sizes, dtype=np.int64) - np.asarray(sizes, dtype=np.int64)
    bucket = before // max(1, int(cap_bytes))
    cuts = (np.flatnonzero(bucket[1:] != bucket[:-1]) + 1).tolist()
    edges = [0, *cuts, n]
    return list(zip(edges[:-1], edges[1:]))


def plan_runs(
    offsets: np.ndarray, ends: np.ndarray, shard: np.ndarray, max_gap_bytes: int, gap_budget_bytes: int
) -> np.ndarray:
    """Group frames (sorted by record) into runs read with one positional read each.

    Two neighbouring frames of one shard are merged into one read when the bytes between
    them are at most ``max_gap_bytes``; the smallest gaps are merged first, and no more than
    ``gap_budget_bytes`` of gap bytes in total, so a read group never fetches more than its
    frames plus the budget.

    Args:
        offsets, ends: int64 arrays, each frame's byte range in its shard (half-open).
        shard: int64 array, each frame's shard.

    Returns:
        int64 array of the indices where a new run starts (for ``np.split``).
    """
    if len(offsets) < 2:
        return np.zeros(0, dtype=np.int64)
    gaps = offsets[1:] - ends[:-1]
    ok = (shard[1:] == shard[:-1]) & (gaps >= 0) & (gaps <= max_gap_bytes)
    merge = np.zeros(len(gaps), dtype=bool)
    idx = np.flatnonzero(ok)
    if idx.size:
        by_size = idx[np.argsort(gaps[idx], kind="stable")]
        within = np.cumsum(gaps[by_size]) <= gap_budget_bytes
        merge[by_size[within]] = True
    return np.flatnonzero(~merge) + 1
