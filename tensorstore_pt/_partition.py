"""Epoch order and rank/worker partitioning for the iterable dataset. Pure numpy, no torch.

Three numberings are used throughout (see docs/datasets.md):

- **record** ``i`` in ``[0, N)``: a position in the store;
- **global position** ``g`` in ``[0, N)``: a place in the epoch's order, the same for every
  rank and worker; ``EpochOrder.records_at(g)`` maps it to a record;
- **plan position** ``p`` in ``[0, M)``: a place in the plan the ranks' shares are cut from,
  the whole epoch order (``p == g``, M = N) or, after an elastic resume, what the saving run
  had not delivered (:class:`EpochPlan`, :func:`rest_of_epoch`);
- **rank position** ``j`` in ``[0, L)``: a place in one rank's share of the plan;
  ``RankSplit.global_positions(j)`` maps it to global positions (with wrap-around to the
  plan's start when the ranks are padded to equal length).

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
    "EpochPlan",
    "RankSplit",
    "keyed_permutation",
    "mix_key",
    "plan_runs",
    "rank_shares",
    "rest_of_epoch",
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


class EpochPlan:
    """The ordered global positions a rank split is cut from.

    A fresh epoch's plan is the whole epoch order, ``[0, N)``. After an elastic resume (a
    state saved with another world size or equalize mode) it is what the saving run had not
    yet delivered, in epoch order (:func:`rest_of_epoch`). A plan is a list of disjoint
    half-open global-position intervals ``[lo, hi)``, in the order they are consumed; a
    **plan position** ``p`` in ``[0, M)`` (M: the plan's length) is a place in their
    concatenation.

    Memory: 24 bytes an interval; an elastic resume adds at most ``world_size`` intervals
    to its plan (adjacent ones are merged).
    """

    __slots__ = ("intervals", "_ends")

    def __init__(self, intervals: np.ndarray) -> None:
        iv = np.asarray(intervals, dtype=np.int64).reshape(-1, 2)
        iv = iv[iv[:, 1] > iv[:, 0]]
        if len(iv) > 1:  # merge intervals that continue one another
            keep = np.ones(len(iv), dtype=bool)
            keep[1:] = iv[1:, 0] != iv[:-1, 1]
            first = np.flatnonzero(keep)
            last = np.append(first[1:] - 1, len(iv) - 1)
            iv = np.stack([iv[first, 0], iv[last, 1]], axis=1)
        self.intervals = iv
        self._ends = np.cumsum(iv[:, 1] - iv[:, 0])

    @classmethod
    def whole(cls, records: int) -> EpochPlan:
        """The plan of a fresh epoch: global positions ``[0, records)``."""
        return cls(np.array([[0, int(records)]], dtype=np.int64))

    def __len__(self) -> int:
        """M, the positions in the plan."""
        return int(self._ends[-1]) if len(self._ends) else 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EpochPlan) and np.array_equal(self.intervals, other.intervals)

    def __hash__(self) -> int:
        return hash(self.intervals.tobytes())

    def __repr__(self) -> str:
        return f"EpochPlan({self.intervals.tolist()!r})"

    def is_whole(self, records: int) -> bool:
        """Whether this is the whole epoch order ``[0, records)``."""
        return len(self.intervals) == 1 and self.intervals[0, 0] == 0 and self.intervals[0, 1] == records

    def to_list(self) -> list[list[int]]:
        """The intervals as ``[[lo, hi], ...]`` (JSON-serialisable)."""
        return self.intervals.tolist()

    def global_positions(self, p: np.ndarray) -> np.ndarray:
        """Map plan positions (int64, each in ``[0, M)``) to global positions (int64)."""
        p = np.asarray(p, dtype=np.int64)
        i = np.searchsorted(self._ends, p, side="right")
        return self.intervals[i, 0] + p - (self._ends[i] - (self.intervals[i, 1] - self.intervals[i, 0]))

    def run_end(self, p: int) -> int:
        """The end (exclusive) of the interval holding plan position ``p``, in plan positions."""
        return int(self._ends[int(np.searchsorted(self._ends, p, side="right"))])

    def take(self, ranges: list[tuple[int, int]] | np.ndarray) -> EpochPlan:
        """The plan of plan-position ranges ``[a, b)`` (each within ``[0, M]``), concatenated in
        the order given. Vectorised: O((ranges + intervals) log intervals), no Python loop."""
        r = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        r = r[r[:, 1] > r[:, 0]]
        if not len(r):
            return EpochPlan(np.zeros((0, 2), np.int64))
        lengths = self.intervals[:, 1] - self.intervals[:, 0]
        starts = self._ends - lengths
        i0 = np.searchsorted(self._ends, r[:, 0], side="right")
        i1 = np.searchsorted(self._ends, r[:, 1] - 1, side="right")
        counts = i1 - i0 + 1
        which = np.repeat(np.arange(len(r)), counts)  # the range each output interval comes from
        iv = i0[which] + np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        lo = np.maximum(starts[iv], r[which, 0])
        hi = np.minimum(self._ends[iv], r[which, 1])
        base = self.intervals[iv, 0] - starts[iv]
        return EpochPlan(np.stack([base + lo, base + hi], axis=1))


@dataclass(frozen=True)
class RankSplit:
    """One rank's share of the epoch's plan (the whole epoch order, or the rest after an elastic resume).

    Attributes:
        records: N, records in the store (global positions per epoch).
        world_size: Number of ranks.
        rank: This rank.
        mode: ``off``, ``pad`` or ``drop`` (see :data:`EQUALIZE_MODES`).
        base: The plan position of this rank's first sample.
        length: L, this rank's samples per epoch.
        padded: Samples repeated across all ranks (``pad``), wrapping to the plan's start.
        dropped: Samples left out across all ranks (``drop``): the end of the plan.
        plan: The plan split, or None for the whole epoch order ``[0, N)``.
    """

    records: int
    world_size: int
    rank: int
    mode: str
    base: int
    length: int
    padded: int
    dropped: int
    plan: EpochPlan | None = None

    @classmethod
    def compute(cls, records: int, world_size: int, rank: int, mode: str, plan: EpochPlan | None = None) -> RankSplit:
        """Split the plan (default: the whole epoch order) among ``world_size`` ranks, contiguously."""
        r, k = int(world_size), int(rank)
        if plan is not None and plan.is_whole(records):
            plan = None
        n = int(records) if plan is None else len(plan)
        if mode == "off":
            base, end = k * n // r, (k + 1) * n // r
            return cls(int(records), r, k, mode, base, end - base, 0, 0, plan)
        if mode == "pad":
            length = -(-n // r)
            return cls(int(records), r, k, mode, (k * length) % n if n else 0, length, r * length - n, 0, plan)
        if mode == "drop":
            length = n // r
            return cls(int(records), r, k, mode, k * length, length, 0, n - r * length, plan)
        raise ValueError(f"equalize mode: expected one of {EQUALIZE_MODES}, found {mode!r}")

    @property
    def plan_length(self) -> int:
        """M, the positions in the plan split (N for a whole epoch)."""
        return self.records if self.plan is None else len(self.plan)

    def plan_positions(self, j: np.ndarray) -> np.ndarray:
        """Map rank positions (int64, each in ``[0, length)``) to plan positions."""
        p = self.base + np.asarray(j, dtype=np.int64)
        return p % self.plan_length if self.mode == "pad" else p

    def global_positions(self, j: np.ndarray) -> np.ndarray:
        """Map rank positions (int64, each in ``[0, length)``) to global positions."""
        p = self.plan_positions(j)
        return p if self.plan is None else self.plan.global_positions(p)

    def run_end(self, j: int) -> int:
        """The end (exclusive) of the run of consecutive global positions from rank position ``j`` on."""
        p = int(self.plan_positions(np.array([j]))[0])
        end = self.records if self.plan is None else self.plan.run_end(p)
        return min(self.length, j + end - p)


def rank_shares(records: int, world_size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's ``(base, length)`` of ``RankSplit.compute(records, world_size, k, mode)``
    (``records``: the plan's length), as two int64 arrays of shape (world_size,).

    Vectorised and free of int64 overflow for any ``records < 2**62`` and ``world_size``
    (``k * n // w`` is computed as ``k * (n // w) + k * (n % w) // w``). Memory: 16 bytes a rank.
    """
    n, w = int(records), int(world_size)
    if w < 1:
        raise ValueError(f"world_size: expected an int >= 1, found {w}")
    k = np.arange(w, dtype=np.int64)
    if mode == "off":
        q, rem = divmod(n, w)
        edges = np.arange(w + 1, dtype=np.int64)
        # edges * rem < (w + 1) * w: in Python ints where that could overflow int64
        bounds = edges * q + (edges * rem) // w if w < 2**31 else np.array([e * n // w for e in range(w + 1)], np.int64)
        return bounds[:-1], np.diff(bounds)
    if mode == "pad":
        length = -(-n // w)
        base = (k * length) % n if n else np.zeros(w, np.int64)
        return base, np.full(w, length, dtype=np.int64)
    if mode == "drop":
        length = n // w
        return k * length, np.full(w, length, dtype=np.int64)
    raise ValueError(f"equalize mode: expected one of {EQUALIZE_MODES}, found {mode!r}")


def rest_of_epoch(
    records: int, world_size: int, mode: str, samples: int | list[int], plan: EpochPlan | None = None
) -> EpochPlan:
    """What the ranks of a split have not yet delivered: the plan an elastic resume splits anew.

    Rank ``k`` of the split ``RankSplit.compute(records, world_size, k, mode, plan)`` has
    delivered its first ``min(samples, L_k)`` samples (``samples`` an int: the DDP case,
    every rank in step), or its first ``samples[k]`` (a list, one count per rank).

    The rest is every position of the plan that no rank delivered, each once, in plan order:
    a ``pad`` repeat already delivered counts as delivering its position, a ``pad`` repeat not
    yet delivered is not carried over (it would be a duplicate), and the positions ``drop``
    would have left out are carried over (the new split decides what to leave out). So
    ``rest_of_epoch(..., samples=0, plan=p)`` is ``p``.

    Raises:
        ValueError: ``samples`` is negative, a list of the wrong length, or past a rank's share.

    Returns:
        An :class:`EpochPlan`. Cost O(W log W + intervals) in numpy (16 bytes a rank a few
        times over), no Python loop over ranks and no O(N) work.
    """
    n = int(records) if plan is None else len(plan)
    w = int(world_size)
    bases, lengths = rank_shares(n, w, mode)
    if isinstance(samples, (list, tuple)):
        if len(samples) != w:
            raise ValueError(f"samples: expected one count per rank ({w}), found {len(samples)}")
        counts = [int(s) for s in samples]
        done = np.array([min(max(c, -1), 2**62) for c in counts], dtype=np.int64)
        bad = (done < 0) | (done > lengths)
        if bad.any():
            k = int(np.argmax(bad))
            raise ValueError(f"samples of rank {k}: expected 0 <= samples <= {int(lengths[k])}, found {counts[k]}")
    else:
        s = int(samples)
        if s < 0:
            raise ValueError(f"samples of rank 0: expected 0 <= samples <= {int(lengths[0])}, found {s}")
        done = np.minimum(lengths, min(s, 2**62))
    a, b = bases, bases + done
    wraps = b > n  # pad: the share wraps around to the plan's start (at most once)
    lo = np.concatenate([a, np.zeros(int(wraps.sum()), np.int64)])
    hi = np.concatenate([np.where(wraps, n, b), b[wraps] - n])
    keep = hi > lo
    lo, hi = lo[keep], hi[keep]
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    reach = np.maximum.accumulate(hi) if len(hi) else hi
    before = np.concatenate([np.zeros(1, np.int64), reach])[: len(lo)]  # the furthest end before each
    gap = lo > before
    gaps = np.stack([before[gap], lo[gap]], axis=1)
    tail = int(reach[-1]) if len(reach) else 0
    if tail < n:
        gaps = np.concatenate([gaps, np.array([[tail, n]], dtype=np.int64)])
    source = plan if plan is not None else EpochPlan.whole(records)
    return source.take(gaps)


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
        j_end = min(split.run_end(j), j + (w_end - g0))
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
