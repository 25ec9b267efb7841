"""Batches from DataLoader workers through reused shared-memory slots instead of one new segment each.

Without this, a DataLoader worker collates each batch into new shared memory and sends it as
one file descriptor per tensor: each descriptor costs a socket connection and an
authentication handshake between the main process and the worker (``multiprocessing``'s
resource sharer, which torch's default ``file_descriptor`` sharing strategy uses), and each
segment is created, mapped, faulted in and unmapped again. On medium records (3x64x64 uint8
patches, batches of 64, two workers) that was a quarter to a third of all the CPU time spent
a sample (benchmarks/dataset_throughput.py; docs/datasets.md).

Here each worker process keeps a ring of ``slots`` shared-memory arenas. It writes each
batch into a free arena: its tensors are stacked straight into it (the default collate) or
copied there (any other ``collate_fn``), and only a small description (offsets, dtypes,
shapes, strides) travels through the DataLoader's queue; an arena travels as a file
descriptor only the first time the main process needs it. The main process hands out
tensors that are views of the arena, one storage per tensor of exactly its bytes (as
default_collate makes them, except that they cannot be resized), with no copy.

Release: the arena stays the main process's until every storage it handed out for that
batch is gone (torch's ``StorageWeakRef``, checked at each later batch; any view, numpy array
or autograd reference keeps a storage alive). The main process then records the batch as
released in the ring's shared control tensor, and only then may the worker write that arena
again. A batch that the DataLoader drained unseen (a persistent-worker reset after a
``break``) is released when a later batch of the same worker arrives: a worker's batches
arrive in order. When no arena is free (the training loop keeps batches), the worker sends
that batch through torch's transport, so nothing ever waits for a slot and a batch in use is
never overwritten. The pin-memory thread copies instead (into pinned memory) and releases
at once.

Memory order: the control words are plain shared int64s. On x86-64 (total store order) the
main process's reads of a batch complete before its later release store is visible, and
the worker's check precedes its writes. Other architectures allow those to be reordered
without a fence, which Python cannot issue, so there the transport is off and torch's is used.

Tensors travel this way when they are plain CPU strided tensors (``type(t) is torch.Tensor``,
no ``requires_grad``, not quantized, nested, conjugated or negated) inside dicts, lists,
tuples and named tuples; their dtypes, shapes, strides, storage offsets and aliasing (views of
one storage stay views of one storage; one tensor twice stays one object) are kept. Anything
else in a batch goes through torch's transport as before.

Batch decoding: a StoreIterableDataset in a worker whose collate is a SharedBatchCollate
made for it yields :class:`RawRecord` (checked and decompressed, not unpickled) once that
collate has run there; the collate fills a batch of them straight into the arena with
:func:`tensorstore_pt.fastload.collate_records` (nested dicts, lists and tuples of tensors and
literal leaves, see :func:`decode_batch`) when it applies, or loads them one by one. With
``num_workers=0`` the dataset's decode thread decodes whole batches itself and yields their
samples as :class:`BatchItem`; the collate returns the decoded batch when it receives exactly
one batch's items, in order.

Memory: each worker holds ``slots`` arenas, each at most twice the largest batch it has sent
(rounded up to 64 KiB; a batch that outgrows its arena replaces it by one of the larger of the
batch and twice the arena) and at most ``MAX_ARENA_BYTES``, shared with the main process;
arenas larger than ``MAX_ARENA_BYTES`` are not made (such batches use torch's transport).
"""

from __future__ import annotations

import collections
import copy
import math
import multiprocessing.util
import os
import platform
import threading
import uuid
import weakref
from typing import Any, Callable, NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import default_collate, get_worker_info
from torch.utils.data._utils.collate import (
    collate,
    collate_float_fn,
    collate_int_fn,
    collate_str_fn,
    collate_tensor_fn,
    default_collate_fn_map,
)

from .errors import CorruptStoreError
from .fastload import collate_records
from .reader import RawRecord

__all__ = [
    "BatchItem",
    "DecodedBatch",
    "RawRecord",
    "SharedBatchCollate",
    "decode_batch",
    "materialize",
    "raw_accepted",
    "standard_collate",
    "transport_supported",
]

#: Largest arena a worker makes (bytes); larger batches go through torch's transport.
MAX_ARENA_BYTES = 1 << 30
_ALIGN_BYTES = 64
_ARENA_ROUND_BYTES = 1 << 16

# control tensor of a ring (int64, shared): [ring known to the main process], then per slot
# [arena generation the main process holds, seq last written (worker), seq released (main)]
_KNOWN = 0
_GENERATION, _WRITTEN, _RELEASED = 0, 1, 2


def transport_supported() -> bool:
    """Whether this CPU's memory order makes the shared release words safe (x86-64 only, see above)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def _resolve_collate(cls: type) -> Any:
    """The entry of ``default_collate_fn_map`` that torch's ``collate`` picks for an object of
    type ``cls`` (its own type first, then the first key it is an instance of), or None."""
    fns = default_collate_fn_map
    if cls in fns:
        return fns[cls]
    for key in fns:
        if issubclass(cls, key):
            return fns[key]
    return None


def standard_collate() -> bool:
    """Whether ``default_collate`` collates what :func:`~tensorstore_pt.fastload.collate_records`
    covers in torch's own way: no entry of ``default_collate_fn_map`` (which users may extend)
    catches a dict, OrderedDict, list or tuple, and tensors, ints, bools, floats, str and bytes
    go to torch's own functions for them. :func:`collate_records` then makes what that way makes."""
    want = {
        torch.Tensor: collate_tensor_fn,
        int: collate_int_fn,
        bool: collate_int_fn,
        float: collate_float_fn,
        str: collate_str_fn,
        bytes: collate_str_fn,
        dict: None,
        collections.OrderedDict: None,
        list: None,
        tuple: None,
    }
    return all(_resolve_collate(cls) is fn for cls, fn in want.items())


def collate_leaves(values: list[Any]) -> Any:
    """default_collate of one leaf position's values (the ``leaf`` of :func:`collate_records`)."""
    return collate(values, collate_fn_map=default_collate_fn_map)


#: Batch decoding (an internal switch, for benchmarks and tests): ``"all"`` (default): nested
#: containers and leaves, in workers and, under a StoreDataLoader with ``num_workers=0``, in the
#: decode thread; ``"dicts"``: as before nested containers were covered (plain dicts of tensors,
#: in workers only); ``"off"``: every record is loaded on its own. Read when a worker collates a
#: batch (a forked worker keeps its parent's value) and when a StoreDataLoader starts an
#: iteration with ``num_workers=0``.
BATCH_DECODE = "all"


def _alloc_private(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def decode_batch(samples: list[RawRecord], alloc: Any = _alloc_private) -> Any:
    """``default_collate([s.load() for s in samples])`` decoded in one go, or None.

    :func:`~tensorstore_pt.fastload.collate_records` over the records' buffers with torch's
    leaf collation, when ``default_collate`` is torch's own (:func:`standard_collate`); None
    when it does not apply (then load the records one by one).
    """
    if BATCH_DECODE == "off" or not standard_collate():
        return None
    try:
        inputs = [s.batch_input() for s in samples]
    except CorruptStoreError:  # a container-free record's length: the one-by-one path raises it
        return None
    return collate_records(inputs, alloc, collate_leaves, dicts_only=BATCH_DECODE == "dicts")


class DecodedBatch:
    """A batch the main process's decode thread decoded in one go (``num_workers=0``).

    ``batch`` is what ``default_collate`` makes of ``records`` loaded one by one (see
    :func:`decode_batch`); the records are kept until the batch is taken, so that a sample
    collated on its own (:meth:`BatchItem.load`) is still the record as loaded.
    """

    __slots__ = ("batch", "records")

    def __init__(self, batch: Any, records: list[RawRecord]) -> None:
        self.batch = batch
        self.records: list[RawRecord] | None = records


class BatchItem:
    """Sample ``index`` of a :class:`DecodedBatch`, as the dataset hands it to the DataLoader.

    The DataLoader's fetcher collects a batch's samples and calls the collate, which (a
    :class:`SharedBatchCollate`) returns the decoded batch when it gets exactly its items in
    order, and otherwise loads each item (:meth:`load`). Not pickled (main process only).
    """

    __slots__ = ("whole", "index")

    def __init__(self, whole: DecodedBatch, index: int) -> None:
        self.whole, self.index = whole, index

    def load(self) -> Any:
        """The sample as :meth:`RawRecord.load` makes it (raises as that does)."""
        records = self.whole.records
        if records is None:
            raise RuntimeError("a sample of a batch that was already handed out, collated again")
        return records[self.index].load()

    def __reduce__(self) -> Any:
        raise TypeError("a BatchItem belongs to the process that decoded it; it is not sent between processes")


def _whole_batch(samples: list[Any]) -> DecodedBatch | None:
    """The DecodedBatch whose items ``samples`` are, all of them in order; else None."""
    first = samples[0]
    if type(first) is not BatchItem:
        return None
    whole = first.whole
    records = whole.records
    if records is None or len(samples) != len(records):
        return None
    for i, s in enumerate(samples):
        if type(s) is not BatchItem or s.whole is not whole or s.index != i:
            return None
    return whole


def _loaded(samples: Any) -> Any:
    """``samples`` (a batch's list) with its RawRecords and BatchItems loaded; anything else (one sample) as is."""
    if type(samples) is not list:
        return samples
    return [s.load() if type(s) is RawRecord or type(s) is BatchItem else s for s in samples]


_raw_accepted: set[str] = set()


def raw_accepted(dataset_id: str) -> bool:
    """Whether, in this process, the dataset ``dataset_id`` feeds a collate that takes :class:`RawRecord`.

    True in a DataLoader worker once a :class:`SharedBatchCollate` made for that dataset
    (``dataset_id``) around torch's ``default_collate`` (which it decodes a batch of
    RawRecords for in one go) has run there, on x86-64: the worker's samples all go to that
    collate. A
    StoreIterableDataset in the worker then yields RawRecords (when it has no transform and
    ``on_error="raise"``).
    """
    return dataset_id in _raw_accepted


class _Ref(NamedTuple):
    """A tensor of a packed batch: its storage is region ``region`` of the batch (see _Region)."""

    region: int
    dtype: torch.dtype
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Region(NamedTuple):
    """Bytes ``[offset, offset + nbytes)`` of the arena: one storage of the batch."""

    offset: int
    nbytes: int


class PackedBatch:
    """What a worker sends instead of a batch: where its tensors lie in one of its arenas."""

    __slots__ = ("token", "ring", "pid", "seq", "slot", "generation", "regions", "skeleton", "arena", "control")

    def __init__(self, **fields: Any) -> None:
        for k in self.__slots__:
            setattr(self, k, fields[k])

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for k, v in zip(self.__slots__, state):
            setattr(self, k, v)

    def pin_memory(self, device: Any = None) -> Any:
        """Called by the DataLoader's pin-memory thread: copy out of the arena, then pin."""
        from torch.utils.data._utils.pin_memory import pin_memory

        return pin_memory(materialize(self, copy=True), device)


def _packable(t: Any) -> bool:
    return (
        type(t) is torch.Tensor
        and t.device.type == "cpu"
        and t.layout == torch.strided
        and not t.requires_grad
        and not t.is_quantized
        and not t.is_nested
        and not t.is_conj()
        and not t.is_neg()
        and not any(getattr(t, "names", None) or ())  # named tensors (gone in newer torch)
    )


def _walk(obj: Any, kind: type, leaf: Callable[[Any], Any]) -> Any:
    """Rebuild dicts, lists, tuples and named tuples with each object of type ``kind`` replaced by ``leaf(obj)``."""
    tp = type(obj)
    if tp is kind:
        return leaf(obj)
    if tp is dict:
        return {k: _walk(v, kind, leaf) for k, v in obj.items()}
    if tp is collections.OrderedDict or tp is collections.defaultdict:
        clone = copy.copy(obj)  # keeps the order, and a defaultdict's factory
        for k, v in obj.items():
            clone[k] = _walk(v, kind, leaf)
        return clone
    if tp is list:
        return [_walk(v, kind, leaf) for v in obj]
    if tp is tuple:
        return tuple(_walk(v, kind, leaf) for v in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return tp(*(_walk(v, kind, leaf) for v in obj))
    return obj


class _Arena:
    __slots__ = ("tensor", "generation", "used", "allocs")

    def __init__(self, nbytes: int, generation: int) -> None:
        self.tensor = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        self.generation = generation
        self.used = 0
        self.allocs = 0  # tensors the collate placed in it for the batch being made

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def alloc(self, nbytes: int) -> int | None:
        start = -(-self.used // _ALIGN_BYTES) * _ALIGN_BYTES
        if start + nbytes > self.nbytes:
            return None
        self.used = start + nbytes
        self.allocs += 1
        return start


def _ctl(slot: int, field: int) -> int:
    """Index of ``field`` (_GENERATION, _WRITTEN or _RELEASED) of ``slot`` in a control tensor."""
    return 1 + 3 * slot + field


class _WorkerRing:
    """One worker process's arenas and its control tensor (made in the worker, lazily)."""

    def __init__(self, token: str, slots: int) -> None:
        self.token = token
        self.id = uuid.uuid4().hex
        self.pid = os.getpid()
        self.slots = slots
        self.control = torch.zeros(1 + 3 * slots, dtype=torch.int64).share_memory_()
        self.arenas: list[_Arena | None] = [None] * slots
        self.generations = [0] * slots  # per slot, never reused: the main process tells arenas apart by it
        self.seq = 0
        self.last_slot = slots - 1
        self.current: _Arena | None = None  # the arena the batch being collated is written to
        self.map = {**default_collate_fn_map, torch.Tensor: self._collate_tensors}

    def close(self) -> None:
        """Drop the arenas and the control tensor now (the ring refers to itself through
        ``map``, so only the cycle collector would free it otherwise)."""
        self.arenas = [None] * self.slots
        self.current = None
        self.map = {}
        self.control = torch.zeros(0, dtype=torch.int64)

    # -- collation straight into the arena
    def _collate_tensors(self, batch: list[torch.Tensor], *, collate_fn_map: Any = None) -> torch.Tensor:
        elem = batch[0]
        if not _packable(elem):
            return collate_tensor_fn(batch)  # torch's own, as in any worker (and its errors)
        # As torch's default_collate does in a worker: stack into an ``out`` of the first
        # sample's dtype and shape (so the batch's dtype is the first sample's, and torch.stack
        # raises for a sample of another shape, or one that requires grad).
        return torch.stack(batch, 0, out=self.alloc_out((len(batch), *elem.shape), elem.dtype))

    def alloc_out(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor for a batch: in the current arena if it has room, else in
        private memory (which :meth:`pack` copies into a larger arena)."""
        arena = self.current
        nbytes = math.prod(shape) * dtype.itemsize
        start = arena.alloc(nbytes) if arena is not None else None
        if start is None:
            return torch.empty(shape, dtype=dtype)
        return arena.tensor[start : start + nbytes].view(dtype).view(shape)  # type: ignore[union-attr]

    def collate_raw(self, samples: list[RawRecord], slot_arena: _Arena | None) -> Any:
        """default_collate of the loaded records, decoded straight into the arena when it can be."""
        self.current = slot_arena
        try:
            return decode_batch(samples, self.alloc_out)
        finally:
            self.current = None

    def collate(self, samples: list[Any], slot_arena: _Arena | None) -> Any:
        self.current = slot_arena
        try:
            return collate(samples, collate_fn_map=self.map)
        finally:
            self.current = None

    # -- the ring
    def start_batch(self) -> tuple[int, _Arena | None] | None:
        """(slot, its arena) for the next batch: the first free slot after the last one used.

        A slot is free when the main process has released the last batch written to it
        (written == released), or it was never used. None when every slot is still held.
        """
        c = self.control.tolist()
        for k in range(1, self.slots + 1):
            slot = (self.last_slot + k) % self.slots
            if c[_ctl(slot, _WRITTEN)] == c[_ctl(slot, _RELEASED)]:
                arena = self.arenas[slot]
                if arena is not None:
                    arena.used = arena.allocs = 0
                return slot, arena
        return None

    def pack(self, batch: Any, slot: int) -> PackedBatch | None:
        """Move ``batch``'s tensors into arena ``slot`` (growing it if needed) and describe them.

        Returns None when nothing in ``batch`` can travel this way, it is too large, or a
        tensor the collate placed in the arena sits in a container this cannot describe; then
        the slot stays free, and if tensors of ``batch`` are in its arena, the arena is given
        up to the batch (torch's transport shares it; the slot gets a new arena next time).
        """
        arena = self.arenas[slot]
        in_arena = arena.tensor.untyped_storage().data_ptr() if arena is not None else -1
        regions: list[_Region] = []
        seen: dict[int, int] = {}
        resident = 0  # tensors found in the arena
        foreign: list[tuple[int, torch.UntypedStorage]] = []  # (region, storage) to copy in
        used = arena.used if arena is not None else 0
        refs: dict[int, _Ref] = {}  # one _Ref per tensor object: a tensor twice in a batch stays one

        def leaf(t: torch.Tensor) -> Any:
            ref = refs.get(id(t))
            if ref is None:
                ref = refs[id(t)] = describe(t)
            return ref

        def describe(t: torch.Tensor) -> Any:
            nonlocal used, resident
            if not _packable(t):
                return t
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr == in_arena:  # stacked straight into the arena
                resident += 1
                off = t.data_ptr() - ptr
                regions.append(_Region(off, t.numel() * t.element_size()))
                return _Ref(len(regions) - 1, t.dtype, 0, tuple(t.shape), tuple(t.stride()))
            key = st._cdata  # the storage itself (two empty storages are not one)
            r = seen.get(key)
            if r is None:
                start = -(-used // _ALIGN_BYTES) * _ALIGN_BYTES
                used = start + st.nbytes()
                regions.append(_Region(start, st.nbytes()))
                r = seen[key] = len(regions) - 1
                foreign.append((r, st))
            return _Ref(r, t.dtype, t.storage_offset(), tuple(t.shape), tuple(t.stride()))

        skeleton = _walk(batch, torch.Tensor, leaf)
        if arena is not None and arena.allocs and (resident != arena.allocs or used > MAX_ARENA_BYTES):
            self.arenas[slot] = None  # tensors of this batch stay in it: it leaves with the batch
            return None
        if not regions or used > MAX_ARENA_BYTES:
            return None
        if arena is None or used > arena.nbytes:
            size = -(-max(used, 2 * arena.nbytes if arena is not None else 0) // _ARENA_ROUND_BYTES)
            self.generations[slot] += 1
            fresh = _Arena(min(size * _ARENA_ROUND_BYTES, MAX_ARENA_BYTES), self.generations[slot])
            if arena is not None and arena.used:
                fresh.tensor[: arena.used].copy_(arena.tensor[: arena.used])
            self.arenas[slot] = arena = fresh
        dst = arena.tensor
        for r, st in foreign:
            off, n = regions[r]
            if n:
                dst[off : off + n].copy_(torch.empty(0, dtype=torch.uint8).set_(st, 0, (n,), (1,)))
        self.seq += 1
        self.last_slot = slot
        c = self.control
        c[_ctl(slot, _WRITTEN)] = self.seq  # the slot is the main process's until it releases this seq
        return PackedBatch(
            token=self.token,
            ring=self.id,
            pid=self.pid,
            seq=self.seq,
            slot=slot,
            generation=arena.generation,
            regions=regions,
            skeleton=skeleton,
            arena=arena.tensor if int(c[_ctl(slot, _GENERATION)]) != arena.generation else None,
            control=c if not int(c[_KNOWN]) else None,
        )


_worker_rings: dict[str, _WorkerRing] = {}
_exit_hook_pid = 0


def _drop_rings_at_exit() -> None:
    """Register (once per process) dropping this worker's rings when the process exits.

    A DataLoader worker ends through ``multiprocessing``'s exit path, which skips the
    interpreter's teardown: without this its arenas would never be released, and under the
    ``file_system`` sharing strategy their files would stay in /dev/shm until the main
    process exits. ``multiprocessing`` runs finalizers with an exit priority on that path.
    """
    global _exit_hook_pid
    if _exit_hook_pid != os.getpid():
        _exit_hook_pid = os.getpid()
        multiprocessing.util.Finalize(None, _close_worker_rings, exitpriority=0)


def _close_worker_rings() -> None:
    for ring in _worker_rings.values():
        ring.close()
    _worker_rings.clear()


class _Held(NamedTuple):
    """A batch handed out without a copy: its slot is released once all its storages are gone."""

    seq: int
    control: torch.Tensor
    storages: list[StorageWeakRef]


class _MainSide:
    """The main process's view of the workers' rings: arenas, control tensors and held slots."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # ring id -> (worker pid, control tensor, {slot: (generation, arena)})
        self.rings: dict[str, tuple[int, torch.Tensor, dict[int, tuple[int, torch.Tensor]]]] = {}
        self.held: dict[tuple[str, int], _Held] = {}

    def forget_dead(self) -> None:
        """Forget the rings of worker processes that have exited (their arenas stay mapped while
        tensors handed out from them live). A ring of a live worker is never touched: its
        batches may still be held, and that worker may still send more."""
        with self.lock:
            for rid in [r for r, (pid, _, _) in self.rings.items() if not _alive(pid)]:
                del self.rings[rid]
                for key in [k for k in self.held if k[0] == rid]:
                    del self.held[key]

    def poll(self) -> None:
        """Release the slots of handed-out batches whose tensors are all gone (lock held)."""
        for key in [k for k, h in self.held.items() if all(ref.expired() for ref in h.storages)]:
            h = self.held.pop(key)
            h.control[_ctl(key[1], _RELEASED)] = h.seq

    def release_drained(self, ring: str, control: torch.Tensor, seq: int) -> None:
        """Release slots whose batches were drained unseen (lock held).

        A worker's batches arrive in order, so when batch ``seq`` arrives, an older batch
        written to a slot that this process neither holds nor released was taken out of the
        queue by the DataLoader (a persistent-worker reset) and will never arrive.
        """
        c = control.tolist()
        for slot in range((len(c) - 1) // 3):
            written, released = c[_ctl(slot, _WRITTEN)], c[_ctl(slot, _RELEASED)]
            if written != released and written < seq and (ring, slot) not in self.held:
                control[_ctl(slot, _RELEASED)] = written


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists
        return True
    return True


_main_sides: weakref.WeakValueDictionary[str, _MainSide] = weakref.WeakValueDictionary()


def materialize(batch: Any, copy: bool = False) -> Any:
    """The batch a :class:`PackedBatch` stands for; anything else as is.

    Args:
        batch: What the DataLoader's queue delivered.
        copy: Copy the tensors out of the arena into memory of this process and release the
            slot at once (for the pin-memory thread, which copies again into pinned memory).
            Otherwise the tensors are views of the arena, one storage per tensor (as
            default_collate makes them; not resizable), and the slot is released once every
            one of those storages is gone (checked at each later batch).

    Raises:
        RuntimeError: The batch refers to an arena this process never received (cannot
            happen unless a worker's message was lost; it is not silently filled).
    """
    if type(batch) is not PackedBatch:
        return batch
    side = _main_sides.get(batch.token)
    if side is None:
        raise RuntimeError("a shared-memory batch arrived for a loader that no longer exists")
    with side.lock:
        side.poll()
        ring = side.rings.get(batch.ring)
        if ring is None:
            if batch.control is None:
                raise RuntimeError(f"a shared-memory batch refers to worker ring {batch.ring} never received")
            ring = side.rings[batch.ring] = (batch.pid, batch.control, {})
            batch.control[_KNOWN] = 1
        _, control, arenas = ring
        side.release_drained(batch.ring, control, batch.seq)
        if batch.arena is not None:
            arenas[batch.slot] = (batch.generation, batch.arena)
            control[_ctl(batch.slot, _GENERATION)] = batch.generation
        held = arenas.get(batch.slot)
        if held is None or held[0] != batch.generation:
            raise RuntimeError(
                f"a shared-memory batch refers to arena generation {batch.generation} of slot {batch.slot}, "
                f"this process holds {held[0] if held else None}"
            )
        src = held[1].numpy()
        storages = []
        for off, n in batch.regions:
            if copy:
                out = torch.empty(n, dtype=torch.uint8)
                # numpy's copy: one thread. torch's copy_ of a large tensor is split over the
                # intra-op threads, which wait on cores the workers are using (~1 ms per MiB here).
                out.numpy()[:] = src[off : off + n]
            else:
                out = torch.from_numpy(src[off : off + n])  # keeps the arena mapped while it lives
            storages.append(out.untyped_storage())
        made: dict[int, torch.Tensor] = {}  # by _Ref identity: the same tensor object comes back once

        def build(r: _Ref) -> torch.Tensor:
            t = made.get(id(r))
            if t is None:
                t = made[id(r)] = torch.empty(0, dtype=r.dtype).set_(
                    storages[r.region], r.storage_offset, r.size, r.stride
                )
            return t

        result = _walk(batch.skeleton, _Ref, build)
        if copy:
            control[_ctl(batch.slot, _RELEASED)] = batch.seq  # after the copies
        else:
            side.held[(batch.ring, batch.slot)] = _Held(batch.seq, control, [StorageWeakRef(s) for s in storages])
    return result


class SharedBatchCollate:
    """A DataLoader ``collate_fn`` that sends worker batches through a reused shared-memory ring.

    In the main process (``num_workers=0``) it is ``collate_fn`` itself. In a worker it
    collates (straight into the ring's arena when ``collate_fn`` is torch's
    ``default_collate``) and returns a :class:`PackedBatch`, which :func:`materialize` turns
    back into the batch in the main process (views of the arena, no copy). When no arena is
    free, or nothing in the batch can use one, it returns the batch itself.

    Args:
        collate_fn: The collate function the DataLoader would use.
        slots: Arenas per worker: the DataLoader's ``prefetch_factor`` batches in flight,
            plus the batches the training loop holds, plus one (fewer means more batches
            through torch's transport, never a wait).
        dataset_id: The ``_id`` of the StoreIterableDataset this collate receives samples from:
            in a worker, that dataset then yields :class:`RawRecord` to it (None: never).

    Fork/spawn safety: pickles to its settings; each worker process makes its own ring on
    first use.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any], slots: int, dataset_id: str | None = None) -> None:
        self.collate_fn = collate_fn
        self.dataset_id = dataset_id
        self.slots = max(2, int(slots))
        self.token = uuid.uuid4().hex
        self._main = _MainSide()
        _main_sides[self.token] = self._main

    def __getstate__(self) -> dict[str, Any]:
        return {"collate_fn": self.collate_fn, "slots": self.slots, "token": self.token, "dataset_id": self.dataset_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # A copy (copy.deepcopy of the loader, or an unpickled loader) shares the main side
        # of its token, and keeps it alive; in a worker this is an unused empty one.
        side = _main_sides.get(self.token)
        if side is None:
            side = _main_sides[self.token] = _MainSide()
        self._main = side

    def forget_dead_workers(self) -> None:
        """Forget the rings of worker processes that have exited (main process)."""
        self._main.forget_dead()

    def __call__(self, samples: Any) -> Any:
        if type(samples) is RawRecord or type(samples) is BatchItem:  # batch_size=None: one sample at a time
            samples = samples.load()
        if type(samples) is list and samples and type(samples[0]) is BatchItem:  # num_workers=0
            whole = _whole_batch(samples) if self.collate_fn is default_collate else None
            if whole is not None:
                batch, whole.batch, whole.records = whole.batch, None, None
                return batch
            samples = _loaded(samples)
        raw = type(samples) is list and len(samples) > 0 and all(type(s) is RawRecord for s in samples)
        in_worker = get_worker_info() is not None
        default = self.collate_fn is default_collate and default_collate_fn_map.get(torch.Tensor) is collate_tensor_fn
        if self.dataset_id is not None and in_worker and default and transport_supported():
            # Only a collate that decodes a batch of RawRecords in one go takes them: any other
            # would load them one record's pickle at a time, slower than the dataset's bulk
            # read (a column block's records loaded together).
            _raw_accepted.add(self.dataset_id)
        if not in_worker or not transport_supported():
            return self.collate_fn(_loaded(samples))
        key = f"{self.token}:{os.getpid()}"
        ring = _worker_rings.get(key)
        if ring is None:
            _drop_rings_at_exit()
            ring = _worker_rings[key] = _WorkerRing(self.token, self.slots)
        got = ring.start_batch()
        if got is None:  # the main process still holds every slot
            return self.collate_fn(_loaded(samples))
        slot, arena = got
        batch = ring.collate_raw(samples, arena) if raw and default else None
        if batch is None:
            samples = _loaded(samples)
            batch = ring.collate(samples, arena) if default else self.collate_fn(samples)
        packed = ring.pack(batch, slot)
        return batch if packed is None else packed
