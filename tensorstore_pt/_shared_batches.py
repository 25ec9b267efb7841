"""Batches from DataLoader workers through reused shared-memory slots instead of one new segment each.

Without this, a DataLoader worker collates each batch into new shared memory and sends it as
one file descriptor per tensor: each descriptor costs a socket connection and an
authentication handshake between the main process and the worker (``multiprocessing``'s
resource sharer, which torch's default ``file_descriptor`` sharing strategy uses), and each
segment is created, mapped, faulted in and unmapped again. On medium records (3x64x64 uint8
patches, batches of 64) that was about a third of the CPU time spent per sample with two
workers.

Here each worker process keeps a ring of ``slots`` shared-memory arenas and writes batch
``seq`` into arena ``seq % slots``: its tensors are stacked straight into the arena (the
default collate) or copied there (any other ``collate_fn``), and only a small description
(offsets, dtypes, shapes, strides) travels through the DataLoader's queue; an arena travels as
a file descriptor only the first time the main process needs it. The main process copies the
batch out into memory of its own (one storage per tensor, as the default collate makes) and
then records ``seq`` as released in a shared counter of the ring.

Safety: a worker writes into an arena only when the main process has released every earlier
batch that used it; otherwise (the main process is slow, or batches were drained by a
persistent-worker reset) that batch falls back to torch's own transport. So a batch the main
process is still copying is never overwritten, whatever the DataLoader's timing. The counter
is a plain shared int64 written after the copy: on x86-64 (total store order) the copy's
loads complete before the store is visible and the worker's check precedes its writes. Other
architectures allow those to be reordered without a fence, which Python cannot issue, so
there the transport is off and torch's is used.

Tensors travel this way when they are plain CPU strided tensors (``type(t) is torch.Tensor``,
no ``requires_grad``, not quantized, nested, conjugated, negated or named) inside dicts, lists,
tuples and named tuples; their dtypes, shapes, strides, storage offsets and aliasing (views of
one storage stay views of one storage) are kept. Anything else in a batch goes through torch's
transport as before.

Memory: each worker holds ``slots`` arenas of the largest batch it has sent (rounded up to
64 KiB), shared with the main process while the main process holds them; arenas larger than
``MAX_ARENA_BYTES`` are not made (such batches use torch's transport).
"""

from __future__ import annotations

import os
import platform
import threading
import uuid
import weakref
from typing import Any, Callable, NamedTuple

import torch
from torch.utils.data import default_collate, get_worker_info
from torch.utils.data._utils.collate import collate, collate_tensor_fn, default_collate_fn_map

__all__ = ["SharedBatchCollate", "materialize", "transport_supported"]

#: Largest arena a worker makes (bytes); larger batches go through torch's transport.
MAX_ARENA_BYTES = 1 << 30
_ALIGN_BYTES = 64
_ARENA_ROUND_BYTES = 1 << 16

# control tensor of a ring (int64, shared): [released seq, ring known to the main process,
# then per slot the arena generation the main process holds]
_RELEASED, _KNOWN, _GENERATIONS = 0, 1, 2


def transport_supported() -> bool:
    """Whether this CPU's memory order makes the release counter safe (x86-64 only, see above)."""
    return platform.machine().lower() in ("x86_64", "amd64")


class _Ref(NamedTuple):
    """A tensor of a packed batch: bytes ``[offset, offset + nbytes)`` of the arena hold its storage."""

    region: int
    dtype: torch.dtype
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Region(NamedTuple):
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

        return pin_memory(materialize(self), device)


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
    if tp is list:
        return [_walk(v, kind, leaf) for v in obj]
    if tp is tuple:
        return tuple(_walk(v, kind, leaf) for v in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return tp(*(_walk(v, kind, leaf) for v in obj))
    return obj


class _Arena:
    __slots__ = ("tensor", "generation", "used")

    def __init__(self, nbytes: int, generation: int) -> None:
        self.tensor = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        self.generation = generation
        self.used = 0

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def alloc(self, nbytes: int) -> int | None:
        start = -(-self.used // _ALIGN_BYTES) * _ALIGN_BYTES
        if start + nbytes > self.nbytes:
            return None
        self.used = start + nbytes
        return start


class _WorkerRing:
    """One worker process's arenas and its control tensor (made in the worker, lazily)."""

    def __init__(self, token: str, slots: int) -> None:
        self.token = token
        self.id = uuid.uuid4().hex
        self.pid = os.getpid()
        self.slots = slots
        self.control = torch.zeros(_GENERATIONS + slots, dtype=torch.int64).share_memory_()
        self.arenas: list[_Arena | None] = [None] * slots
        self.seq = 0
        self.current: _Arena | None = None  # the arena the batch being collated is written to
        self.map = {**default_collate_fn_map, torch.Tensor: self._collate_tensors}

    # -- collation straight into the arena
    def _collate_tensors(self, batch: list[torch.Tensor], *, collate_fn_map: Any = None) -> torch.Tensor:
        elem = batch[0]
        arena = self.current
        if arena is not None and _packable(elem):
            # As torch's default_collate does in a worker: stack into an ``out`` of the first
            # sample's dtype and shape (torch.stack raises for a sample of another shape).
            nbytes = len(batch) * elem.numel() * elem.element_size()
            start = arena.alloc(nbytes)
            if start is not None:
                out = arena.tensor[start : start + nbytes].view(elem.dtype).view(len(batch), *elem.shape)
                return torch.stack(batch, 0, out=out)
        if elem.is_nested or elem.layout != torch.strided:
            return collate_tensor_fn(batch)  # torch's own error for nested and sparse tensors
        return torch.stack(batch, 0)  # private memory; pack() copies it into the arena

    def collate(self, samples: list[Any], slot_arena: _Arena | None) -> Any:
        self.current = slot_arena
        try:
            return collate(samples, collate_fn_map=self.map)
        finally:
            self.current = None

    # -- the ring
    def free_slot(self) -> tuple[int, int] | None:
        """(seq, slot) for the next batch, or None when that slot's last batch is not released."""
        seq = self.seq + 1
        slot = seq % self.slots
        if seq - self.slots > int(self.control[_RELEASED]):
            return None
        self.seq = seq
        return seq, slot

    def pack(self, batch: Any, seq: int, slot: int) -> PackedBatch | None:
        """Move ``batch``'s tensors into arena ``slot`` (growing it if needed) and describe them.

        Returns None when nothing in ``batch`` can travel this way, or it is too large; then
        no tensor of ``batch`` may refer to the arena (see :meth:`unpack_fallback`).
        """
        arena = self.arenas[slot]
        in_arena = arena.tensor.untyped_storage().data_ptr() if arena is not None else -1
        regions: list[_Region] = []
        seen: dict[tuple[int, int], int] = {}
        foreign: list[tuple[int, torch.UntypedStorage]] = []  # (region, storage) to copy in
        used = arena.used if arena is not None else 0

        refs: dict[int, _Ref] = {}  # one _Ref per tensor object: a tensor twice in a batch stays one

        def leaf(t: torch.Tensor) -> Any:
            ref = refs.get(id(t))
            if ref is None:
                ref = refs[id(t)] = describe(t)
            return ref

        def describe(t: torch.Tensor) -> Any:
            nonlocal used
            if not _packable(t):
                return t
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr == in_arena and arena is not None:  # stacked straight into the arena
                off = t.data_ptr() - ptr
                regions.append(_Region(off, t.numel() * t.element_size()))
                return _Ref(len(regions) - 1, t.dtype, 0, tuple(t.shape), tuple(t.stride()))
            key = (ptr, st.nbytes())
            r = seen.get(key)
            if r is None:
                start = -(-used // _ALIGN_BYTES) * _ALIGN_BYTES
                used = start + st.nbytes()
                regions.append(_Region(start, st.nbytes()))
                r = seen[key] = len(regions) - 1
                foreign.append((r, st))
            return _Ref(r, t.dtype, t.storage_offset(), tuple(t.shape), tuple(t.stride()))

        skeleton = _walk(batch, torch.Tensor, leaf)
        if not regions:
            return None
        if arena is None or used > arena.nbytes:
            if used > MAX_ARENA_BYTES:
                return None
            size = -(-max(used, 2 * arena.nbytes if arena is not None else 0) // _ARENA_ROUND_BYTES)
            fresh = _Arena(min(size * _ARENA_ROUND_BYTES, MAX_ARENA_BYTES), arena.generation + 1 if arena else 1)
            if arena is not None and arena.used:
                fresh.tensor[: arena.used].copy_(arena.tensor[: arena.used])
            self.arenas[slot] = arena = fresh
        dst = arena.tensor
        for r, st in foreign:
            off, n = regions[r]
            if n:
                dst[off : off + n].copy_(torch.empty(0, dtype=torch.uint8).set_(st, 0, (n,), (1,)))
        send_arena = int(self.control[_GENERATIONS + slot]) != arena.generation
        send_control = not int(self.control[_KNOWN])
        return PackedBatch(
            token=self.token,
            ring=self.id,
            pid=self.pid,
            seq=seq,
            slot=slot,
            generation=arena.generation,
            regions=regions,
            skeleton=skeleton,
            arena=arena.tensor if send_arena else None,
            control=self.control if send_control else None,
        )

    def unpack_fallback(self, batch: Any, slot: int) -> Any:
        """``batch`` with copies of the tensors collated into arena ``slot`` (which will be reused)."""
        arena = self.arenas[slot]
        if arena is None:
            return batch
        ptr = arena.tensor.untyped_storage().data_ptr()
        return _walk(batch, torch.Tensor, lambda t: t.clone() if t.untyped_storage().data_ptr() == ptr else t)

    def start_batch(self) -> tuple[int, int, _Arena | None] | None:
        got = self.free_slot()
        if got is None:
            return None
        seq, slot = got
        arena = self.arenas[slot]
        if arena is not None:
            arena.used = 0
        return seq, slot, arena


_worker_rings: dict[str, _WorkerRing] = {}


class _MainSide:
    """The main process's view of the workers' rings: arenas and control tensors by ring id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rings: dict[str, tuple[int, torch.Tensor, dict[int, tuple[int, torch.Tensor]]]] = {}

    def keep_only(self, pids: set[int]) -> None:
        with self.lock:
            for rid in [r for r, (pid, _, _) in self.rings.items() if pid not in pids]:
                _, control, _ = self.rings.pop(rid)
                control[_KNOWN:] = 0  # should that worker still live, it sends everything again


_main_sides: weakref.WeakValueDictionary[str, _MainSide] = weakref.WeakValueDictionary()


def materialize(batch: Any) -> Any:
    """The batch a :class:`PackedBatch` stands for, in memory of this process; anything else as is.

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
        ring = side.rings.get(batch.ring)
        if ring is None:
            if batch.control is None:
                raise RuntimeError(f"a shared-memory batch refers to worker ring {batch.ring} never received")
            ring = side.rings[batch.ring] = (batch.pid, batch.control, {})
            batch.control[_KNOWN] = 1
        _, control, arenas = ring
        if batch.arena is not None:
            arenas[batch.slot] = (batch.generation, batch.arena)
            control[_GENERATIONS + batch.slot] = batch.generation
        held = arenas.get(batch.slot)
        if held is None or held[0] != batch.generation:
            raise RuntimeError(
                f"a shared-memory batch refers to arena generation {batch.generation} of slot {batch.slot}, "
                f"this process holds {held[0] if held else None}"
            )
        src = held[1].numpy()
        storages = []
        for off, n in batch.regions:
            out = torch.empty(n, dtype=torch.uint8)
            # numpy's copy: one thread. torch's copy_ of a large tensor is split over the
            # intra-op threads, which wait on cores the workers are using (~1 ms per MiB here).
            out.numpy()[:] = src[off : off + n]
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
        if batch.seq > int(control[_RELEASED]):
            control[_RELEASED] = batch.seq  # after the copies: the worker may now reuse the slot
    return result


class SharedBatchCollate:
    """A DataLoader ``collate_fn`` that sends worker batches through a reused shared-memory ring.

    In the main process (``num_workers=0``) it is ``collate_fn`` itself. In a worker it
    collates (straight into the ring's arena when ``collate_fn`` is torch's
    ``default_collate``) and returns a :class:`PackedBatch`, which :func:`materialize` turns
    back into the batch in the main process.

    Args:
        collate_fn: The collate function the DataLoader would use.
        slots: Arenas per worker (at least the DataLoader's ``prefetch_factor + 2``, so that
            the worker can run that far ahead of the main process without a fallback).

    Fork/spawn safety: pickles to its settings; each worker process makes its own ring on
    first use.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any], slots: int) -> None:
        self.collate_fn = collate_fn
        self.slots = max(2, int(slots))
        self.token = uuid.uuid4().hex
        self._main = _MainSide()
        _main_sides[self.token] = self._main

    def __getstate__(self) -> dict[str, Any]:
        return {"collate_fn": self.collate_fn, "slots": self.slots, "token": self.token}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._main = _MainSide()  # only the instance in the main process receives batches

    def keep_rings_of(self, pids: set[int]) -> None:
        """Forget the rings of worker processes other than ``pids`` (main process)."""
        self._main.keep_only(pids)

    def __call__(self, samples: Any) -> Any:
        if get_worker_info() is None or not transport_supported():
            return self.collate_fn(samples)
        key = f"{self.token}:{os.getpid()}"
        ring = _worker_rings.get(key)
        if ring is None:
            ring = _worker_rings[key] = _WorkerRing(self.token, self.slots)
        got = ring.start_batch()
        if got is None:  # the main process still holds that slot's last batch
            return self.collate_fn(samples)
        seq, slot, arena = got
        if self.collate_fn is default_collate and default_collate_fn_map.get(torch.Tensor) is collate_tensor_fn:
            batch = ring.collate(samples, arena)
        else:
            batch = self.collate_fn(samples)
        packed = ring.pack(batch, seq, slot)
        if packed is None:
            ring.seq -= 1  # the slot stays free for the next batch
            return ring.unpack_fallback(batch, slot)
        return packed
