"""Worker batches through reused shared-memory slots (tensorstore_pt._shared_batches).

The transport must be invisible: every batch equals what torch's own transport delivers
(values, dtypes, shapes, strides, storage offsets, aliasing), batches the training loop keeps
are never overwritten, and whenever a slot is not free the batch still arrives (by torch's
transport).
"""

from __future__ import annotations

import collections
import os
import pickle
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest
import torch
from strategies import saved
from torch.utils.data import default_collate

import tensorstore_pt as tspt
import tensorstore_pt._shared_batches as sb
import tensorstore_pt.dataset as dataset_module
from tensorstore_pt import InvalidOptionError, StoreDataLoader, StoreIterableDataset

pytestmark = pytest.mark.skipif(not sb.transport_supported(), reason="the slot transport is x86-64 only")

Pair = collections.namedtuple("Pair", ["left", "right"])
N = 45


def _sample(i: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(i)
    return {
        "image": torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g),
        "label": torch.tensor(i),
        "f64": torch.randn(5, dtype=torch.float64, generator=g),
        "bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "c64": torch.randn(4, dtype=torch.complex64, generator=g),
        "flag": torch.tensor(i % 2 == 0),
        "name": f"sample-{i}",
        "score": float(i) / 3,
        "nested": {"pair": (torch.full((2,), i, dtype=torch.int16), torch.arange(i % 3 + 1).sum())},
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ring") / "s"
    tspt.write_store((_sample(i) for i in range(N)), path, max_shard_bytes=20_000)
    return path


def _expected(batch_size: int) -> list[Any]:
    samples = [_sample(i) for i in range(N)]
    return [default_collate(samples[i : i + batch_size]) for i in range(0, N, batch_size)]


def assert_same(a: Any, b: Any, path: str = "batch") -> None:
    """Equal values, types, dtypes, shapes and strides, all the way down."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


class _Count:
    """Counts what reaches the main process: PackedBatch (slot transport) or anything else."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.packed = self.plain = 0
        real = dataset_module.materialize

        def counting(batch: Any) -> Any:
            if type(batch) is sb.PackedBatch:
                self.packed += 1
            else:
                self.plain += 1
            return real(batch)

        monkeypatch.setattr(dataset_module, "materialize", counting)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_batches_equal_torch_transport_and_are_kept_intact(
    store: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = _Count(monkeypatch)
    loader = StoreDataLoader(StoreIterableDataset(store), batch_size=4, num_workers=2, multiprocessing_context=method)
    kept = list(loader)  # every batch kept: none may be overwritten by later ones
    time.sleep(0.2)  # let the workers run on; they would be writing into reused slots now
    expected = _expected(4)
    assert len(kept) == len(expected)
    for i, (got, want) in enumerate(zip(kept, expected)):
        assert_same(got, want, f"batch {i}")
    assert count.packed >= 4, (count.packed, count.plain)  # the ring really carried them (while slots were free)
    # each tensor owns a storage of exactly its own bytes, like default_collate's
    image = kept[0]["image"]
    assert image.untyped_storage().nbytes() == image.numel() * image.element_size()
    assert kept[0]["image"].untyped_storage().data_ptr() != kept[0]["label"].untyped_storage().data_ptr()


def test_same_batches_with_and_without_the_ring(store: Path) -> None:
    def run(ring: bool) -> list[Any]:
        ds = StoreIterableDataset(store, shuffle=True, seed=3)
        return list(StoreDataLoader(ds, batch_size=5, num_workers=2, batch_ring=ring, persistent_workers=True))

    a, b = run(True), run(False)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert_same(x, y)


def test_persistent_workers_break_and_resume_across_epochs(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A break leaves prefetched batches that the next epoch's reset drains unseen: slots are reused correctly."""
    count = _Count(monkeypatch)
    loader = StoreDataLoader(StoreIterableDataset(store), batch_size=3, num_workers=2, persistent_workers=True)
    expected = _expected(3)
    for epoch in range(4):
        seen = 0
        for batch in loader:  # compared and dropped at once: slots are released and reused
            assert_same(batch, expected[seen], f"epoch {epoch} batch {seen}")
            seen += 1
            if epoch % 2 == 0 and seen == 4:
                break
        if epoch % 2 == 0:  # the rest of this epoch comes next
            for batch in loader:
                assert_same(batch, expected[seen], f"epoch {epoch} batch {seen}")
                seen += 1
        assert seen == len(expected)
    assert count.packed > 2 * len(expected)


def _aliasing_collate(samples: list[Any]) -> Any:
    base = torch.stack([s["image"] for s in samples]).float()
    return {
        "base": base,
        "tail": base[1:],  # a view at a storage offset
        "t": base.transpose(0, 1),  # non-contiguous strides
        "again": base,  # the same tensor twice
        "grad": torch.ones(2, requires_grad=True),  # not for the ring: torch's transport
        "names": [s["name"] for s in samples],
        "pair": Pair(torch.tensor([len(samples)]), "x"),
    }


def test_custom_collate_keeps_views_strides_offsets_and_aliasing(store: Path) -> None:
    loader = StoreDataLoader(StoreIterableDataset(store), batch_size=4, num_workers=2, collate_fn=_aliasing_collate)
    reference = StoreDataLoader(StoreIterableDataset(store), batch_size=4, num_workers=0, collate_fn=_aliasing_collate)
    for got, want in zip(loader, reference):
        assert_same({k: v for k, v in got.items() if k != "grad"}, {k: v for k, v in want.items() if k != "grad"})
        assert torch.equal(got["grad"].detach(), want["grad"].detach()) and got["grad"].requires_grad
        ptr = got["base"].untyped_storage().data_ptr()
        assert got["tail"].untyped_storage().data_ptr() == ptr and got["t"].untyped_storage().data_ptr() == ptr
        assert got["again"] is got["base"]  # as pickling keeps it
        assert got["tail"].storage_offset() == want["tail"].storage_offset()
        got["base"][0, 0, 0, 0] = -1.0  # still one storage: a write shows through every view
        assert float(got["t"][0, 0, 0, 0]) == -1.0
        if len(got["base"]) > 1:
            assert got["tail"].storage_offset() > 0
            got["base"][1, 0, 0, 0] = -2.0
            assert float(got["tail"][0, 0, 0, 0]) == -2.0
        assert isinstance(got["pair"], Pair)


# ----------------------------------------------------------------------------- the ring itself


def _collate_for_test(slots: int) -> tuple[sb.SharedBatchCollate, sb._WorkerRing]:
    collate = sb.SharedBatchCollate(default_collate, slots)
    return collate, sb._WorkerRing(collate.token, slots)


def _batch(n: int, fill: int) -> list[dict[str, Any]]:
    return [{"x": torch.full((1000,), fill + i, dtype=torch.int32), "s": "a"} for i in range(n)]


def _send(ring: sb._WorkerRing, samples: list[Any]) -> Any:
    got = ring.start_batch()
    if got is None:
        return None
    slot, arena = got
    packed = ring.pack(ring.collate(samples, arena), slot)
    assert packed is not None
    return pickle.loads(ForkingPickler.dumps(packed))  # what the DataLoader's queue does


def _firsts(batch: Any) -> list[int]:
    return batch["x"][:, 0].tolist()


def test_a_slot_is_reused_only_once_every_tensor_of_its_batch_is_gone() -> None:
    _collate, ring = _collate_for_test(slots=3)
    sent = [_send(ring, _batch(4, 10 * k)) for k in range(3)]
    assert all(type(p) is sb.PackedBatch for p in sent) and len({p.slot for p in sent}) == 3
    assert ring.start_batch() is None  # all three slots written, none released
    first = sb.materialize(sent[0])  # no copy: views of the arena
    assert _firsts(first) == [0, 1, 2, 3]
    keep = first["x"][1:]  # a view keeps the batch's storage alive
    del first
    second = sb.materialize(sent[1])
    assert ring.start_batch() is None  # batch 1 still has a live view, batch 2 is held
    assert keep[:, 0].tolist() == [1, 2, 3]
    del keep, second
    third = sb.materialize(sent[2])  # each batch checks the earlier ones: 1 and 2 are gone now
    slot, _ = ring.start_batch()
    assert slot == sent[0].slot
    later = _send(ring, _batch(4, 100))
    assert later.slot == sent[0].slot and later.arena is None  # the arena is not sent again
    assert _firsts(third) == [20, 21, 22, 23] and _firsts(sb.materialize(later)) == [100, 101, 102, 103]


def test_a_copied_batch_releases_its_slot_at_once() -> None:
    _collate, ring = _collate_for_test(slots=2)
    a, b = _send(ring, _batch(2, 0)), _send(ring, _batch(2, 5))
    assert ring.start_batch() is None
    got = sb.materialize(a, copy=True)
    assert ring.start_batch()[0] == a.slot
    c = _send(ring, _batch(2, 50))  # overwrites a's slot: the copy is unaffected
    assert _firsts(got) == [0, 1] and _firsts(sb.materialize(b)) == [5, 6] and _firsts(sb.materialize(c)) == [50, 51]
    assert not got["x"].is_shared()  # memory of its own


def test_batches_drained_unseen_free_their_slots() -> None:
    """A persistent-worker reset takes prefetched batches out of the queue; they never arrive."""
    _collate, ring = _collate_for_test(slots=4)
    sent = [_send(ring, _batch(2, 10 * k)) for k in range(3)]  # slots 0, 1, 2
    assert _firsts(sb.materialize(sent[2], copy=True)) == [20, 21]  # 0 and 1 were drained
    assert ring.start_batch()[0] == 3  # never used
    _send(ring, _batch(2, 30))
    assert ring.start_batch()[0] == 0  # released as drained


def test_a_larger_batch_grows_its_slot_and_resends_it() -> None:
    _collate, ring = _collate_for_test(slots=2)
    small = _send(ring, _batch(2, 0))
    sb.materialize(small, copy=True)
    sb.materialize(_send(ring, _batch(2, 5)), copy=True)
    big = _send(ring, [{"x": torch.full((300_000,), i, dtype=torch.int32), "s": "b"} for i in range(3)])
    assert big.slot == small.slot and big.generation == small.generation + 1 and big.arena is not None
    out = sb.materialize(big)
    assert out["x"].shape == (3, 300_000) and torch.equal(out["x"][:, -1], torch.arange(3, dtype=torch.int32))
    assert out["s"] == ["b", "b", "b"]


def test_too_large_or_tensorless_batches_use_torch_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    collate, ring = _collate_for_test(slots=2)
    slot, arena = ring.start_batch()
    assert ring.pack({"s": ["a", "b"]}, slot) is None  # nothing for the ring
    monkeypatch.setattr(sb, "MAX_ARENA_BYTES", 1000)
    batch = ring.collate(_batch(4, 0), arena)
    assert ring.pack(batch, slot) is None
    assert ring.start_batch()[0] == slot  # still free
    # through the collate_fn: a plain batch whose tensors do not point into any arena
    monkeypatch.setattr(sb, "get_worker_info", lambda: object())
    out = collate(_batch(4, 7))
    assert type(out) is dict and torch.equal(out["x"][:, 0], torch.arange(7, 11, dtype=torch.int32))
    rings = [r for k, r in sb._worker_rings.items() if k.startswith(collate.token)]
    assert rings and all(
        out["x"].untyped_storage().data_ptr() != a.tensor.untyped_storage().data_ptr()
        for r in rings
        for a in r.arenas
        if a is not None
    )
    assert rings[0].seq == 0  # the refused batch did not use up a slot


def test_unknown_ring_or_generation_is_an_error_not_garbage() -> None:
    _collate, ring = _collate_for_test(slots=2)
    p = _send(ring, _batch(2, 0))
    p.control = None
    p.ring = "not-a-ring"
    with pytest.raises(RuntimeError, match="never received"):
        sb.materialize(p)
    q = _send(ring, _batch(2, 0))
    sb.materialize(q, copy=True)
    q.generation += 5
    q.arena = None  # a batch that claims an arena generation this process never received
    with pytest.raises(RuntimeError, match="generation"):
        sb.materialize(q)


def test_batch_ring_option(store: Path) -> None:
    with pytest.raises(InvalidOptionError, match="batch_ring: expected a bool, found 'yes'"):
        StoreDataLoader(StoreIterableDataset(store), batch_ring="yes")
    off = StoreDataLoader(StoreIterableDataset(store), batch_size=4, num_workers=2, batch_ring=False)
    assert off.collate_fn is default_collate
    on = StoreDataLoader(StoreIterableDataset(store), batch_size=4, num_workers=2)
    assert isinstance(on.collate_fn, sb.SharedBatchCollate) and on.collate_fn.collate_fn is default_collate
    w0 = StoreDataLoader(StoreIterableDataset(store), batch_size=4).collate_fn  # no workers: takes whole batches
    assert isinstance(w0, sb.SharedBatchCollate) and w0.collate_fn is default_collate


# ----------------------------------------------------------------------------- odd batches (a helper's review)


class MyDict(dict):
    """A dict subclass the ring cannot describe (default_collate keeps the type)."""


def _to_mydict(sample: Any) -> Any:
    return MyDict(image=sample["image"], label=sample["label"])


def _to_ordered(sample: Any) -> Any:
    return {"label": sample["label"], "od": collections.OrderedDict(image=sample["image"], f64=sample["f64"])}


def _first_int32(sample: Any) -> Any:
    label = sample["label"]
    return label.to(torch.int32) if int(label) % 4 == 0 else label  # the first of each batch of 4


def _requires_grad(sample: Any) -> Any:
    return sample["f64"].clone().requires_grad_()


def _kept_intact(loader: Any, reference: Any) -> None:
    """Keep part of every batch, let the loader run on, then compare with the reference run."""
    kept = [batch for batch in loader]
    time.sleep(0.2)
    want = list(reference)
    assert len(kept) == len(want)
    for i, (got, ref) in enumerate(zip(kept, want)):
        assert_same(got, ref, f"batch {i}")


def test_tensors_in_containers_it_cannot_describe_are_never_overwritten(store: Path) -> None:
    for transform in (_to_mydict, _to_ordered):

        def make(ring: bool, workers: int, transform: Any = transform) -> Any:
            ds = StoreIterableDataset(store, transform=transform)
            # one worker, small batches: each of its 4 arenas is reused about 5 times
            return StoreDataLoader(
                ds, batch_size=2, num_workers=workers, batch_ring=ring, prefetch_factor=1 if workers else None
            )

        seen = []
        for batch in make(True, 1):  # keep only the inner tensors, as a logging loop might
            seen.append(batch["od"] if "od" in batch else batch["image"])
        time.sleep(0.2)
        ref = [b["od"] if "od" in b else b["image"] for b in make(False, 0)]
        for i, (got, want) in enumerate(zip(seen, ref)):
            assert_same(got, want, f"{transform.__name__} batch {i}")
        _kept_intact(make(True, 1), make(False, 0))


def test_a_superseded_iterator_that_is_still_used_keeps_its_batches(store: Path) -> None:
    loader = StoreDataLoader(StoreIterableDataset(store), batch_size=2, num_workers=2)
    it1 = iter(loader)
    kept = [next(it1) for _ in range(6)]
    it2 = iter(loader)  # new workers; it1's are still alive
    kept.append(next(it2))
    kept += [next(it1) for _ in range(6)]
    ids = [b["label"].tolist() for b in kept]
    time.sleep(0.2)
    assert ids[:6] == [[2 * k, 2 * k + 1] for k in range(6)] and ids[7:] == [[2 * k, 2 * k + 1] for k in range(6, 12)]
    assert [b["label"].tolist() for b in kept] == ids  # nothing changed after delivery
    del it1, it2


def test_batch_dtype_is_the_first_samples_as_in_torch(store: Path) -> None:
    def dtypes(ring: bool) -> list[torch.dtype]:
        ds = StoreIterableDataset(store, transform=_first_int32)
        loader = StoreDataLoader(ds, batch_size=4, num_workers=1, prefetch_factor=1, batch_ring=ring)
        return [b["label"].dtype if isinstance(b, dict) else b.dtype for b in loader]

    assert dtypes(True) == dtypes(False) == [torch.int32] * len(_expected(4))


def test_samples_that_require_grad_raise_as_in_torch(store: Path) -> None:
    for ring in (True, False):
        ds = StoreIterableDataset(store, transform=_requires_grad)
        loader = StoreDataLoader(ds, batch_size=4, num_workers=1, batch_ring=ring, timeout=60)
        with pytest.raises(RuntimeError, match="automatic differentiation"):
            next(iter(loader))


def _empties(samples: list[Any]) -> Any:
    return {"n": torch.tensor(len(samples)), "e1": torch.empty(0), "e2": torch.empty(0, 3, dtype=torch.float64)}


def test_distinct_storages_stay_distinct(store: Path) -> None:
    loader = StoreDataLoader(StoreIterableDataset(store), batch_size=4, num_workers=1, collate_fn=_empties)
    batch = next(iter(loader))
    assert batch["e1"].dtype == torch.float32 and batch["e2"].shape == (0, 3)
    assert batch["e1"].untyped_storage()._cdata != batch["e2"].untyped_storage()._cdata


def test_deepcopy_of_a_loader_works_without_the_original(store: Path) -> None:
    import copy

    loader = StoreDataLoader(StoreIterableDataset(store), batch_size=4, num_workers=2)
    twin = copy.deepcopy(loader)
    del loader
    for i, (got, want) in enumerate(zip(twin, _expected(4))):
        assert_same(got, want, f"batch {i}")


def _shm_files(pids: set[int]) -> set[str]:
    """/dev/shm files made by ``pids`` (torch names its file_system segments ``torch_<pid>_...``);
    other processes on the machine (other test runs) come and go there too."""
    return {
        f
        for f in os.listdir("/dev/shm")
        if f.split("_")[:1] == ["torch"] and f.split("_")[1:2] in ([str(p)] for p in pids)
    }


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_no_shared_memory_left_behind_by_exited_workers(store: Path) -> None:
    """Under the file_system strategy each arena is a /dev/shm file that only goes once every process let go."""
    before = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        loader = StoreDataLoader(StoreIterableDataset(store), batch_size=2, num_workers=2)  # non-persistent
        counts, pids = [], set()
        for _ in range(4):
            it = iter(loader)
            batch = next(it)
            workers = {w.pid for w in it._inner._workers}
            pids |= workers
            assert _shm_files(workers)  # the filter sees the arenas while they are in use
            for batch in it:  # noqa: B007 - drained; the last batch is dropped just below
                pass
            del batch, it
            time.sleep(0.2)
            counts.append(len(_shm_files(pids)))
        assert len(pids) == 8  # two new workers an epoch
        assert counts == [0, 0, 0, 0], counts  # the workers exited and the loader let go of their arenas
    finally:
        torch.multiprocessing.set_sharing_strategy(before)


def test_the_pin_memory_thread_gets_a_copy_and_the_slot_is_free_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.data._utils.pin_memory as pm

    pinned = []
    real = pm.pin_memory  # what the DataLoader's pin thread calls: it calls a.pin_memory()
    # no accelerator here: record what would be pinned instead of pinning it
    monkeypatch.setattr(pm, "pin_memory", lambda data, device=None: pinned.append(data) or data)
    _collate, ring = _collate_for_test(slots=2)
    a, b = _send(ring, _batch(2, 0)), _send(ring, _batch(2, 5))
    out = real(a)
    assert pinned and pinned[-1] is out and not out["x"].is_shared()
    assert ring.start_batch()[0] == a.slot  # released without waiting for the tensors to go
    _send(ring, _batch(2, 50))
    assert _firsts(out) == [0, 1]
    assert _firsts(sb.materialize(b)) == [5, 6]


# ----------------------------------------------------------------------------- batch decode in workers


def _plain(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return {
        "image": torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8, generator=g),
        "label": torch.tensor(i),
        "bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "flag": torch.tensor([i % 2 == 0, True]),
        "c64": torch.randn(3, dtype=torch.complex64, generator=g),
        "empty": torch.zeros(0, 5),
    }


def _alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _buffers(samples: list[Any]) -> list[bytearray]:
    return [bytearray(saved(s)) for s in samples]


def test_collate_records_equals_default_collate_of_the_loaded_records() -> None:
    from tensorstore_pt.fastload import collate_records, fast_loads

    bufs = _buffers([_plain(i) for i in range(6)])
    assert collate_records(bufs, _alloc) is None  # pickle not planned yet: fast_loads plans it on its 2nd sight
    loaded = [fast_loads(bytearray(b)) for b in bufs]
    got = collate_records(bufs, _alloc)
    assert got is not None
    assert_same(got, default_collate(loaded))
    assert list(got) == list(_plain(0))  # key order kept


@pytest.mark.parametrize(
    "odd",
    [
        lambda i: {"x": torch.arange(10)[2:5]},  # a view at an offset of a larger storage
        lambda i: {"x": torch.zeros(3, 2).t()},  # not contiguous
        lambda i: {"x": torch.zeros(2), "n": None},  # a leaf default_collate refuses
        lambda i: {"x": torch.zeros(2, requires_grad=True)},
        lambda i: {"a": torch.zeros(2), "b": torch.zeros(2)} if i % 2 else {"a": torch.zeros(2)},  # pickles differ
    ],
)
def test_collate_records_declines_what_it_does_not_cover(odd: Any) -> None:
    from tensorstore_pt.fastload import collate_records, fast_loads

    bufs = _buffers([odd(i) for i in range(4)])
    for b in bufs * 2:
        fast_loads(bytearray(b))  # plan every pickle
    allocated = []
    assert (
        collate_records(bufs, lambda shape, dtype: allocated.append(shape) or torch.empty(shape, dtype=dtype)) is None
    )
    assert allocated == []  # declined before allocating anything


def test_collate_records_declines_a_damaged_buffer() -> None:
    from tensorstore_pt.fastload import collate_records, fast_loads

    bufs = _buffers([_plain(i) for i in range(3)])
    for b in bufs * 2:
        fast_loads(bytearray(b))
    bad = bytearray(bufs[1])
    bad[-30] ^= 0xFF  # the zip's end records
    assert collate_records([bufs[0], bad, bufs[2]], _alloc) is None
    assert collate_records([bufs[0], bytes(bufs[1])], _alloc) is None  # bytes: not the workers' buffers


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ring") / "plain"
    tspt.write_store((_plain(i) for i in range(N)), path, max_shard_bytes=20_000)
    return path


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_decode_batches_at_once_with_the_same_result(plain_store: Path, method: str) -> None:
    def run(workers: int, ring: bool) -> list[Any]:
        ds = StoreIterableDataset(plain_store, shuffle=True, seed=5)
        kw = {"multiprocessing_context": method} if workers else {}
        return list(StoreDataLoader(ds, batch_size=4, num_workers=workers, batch_ring=ring, **kw))

    ref = run(0, False)
    for got in (run(2, True), run(2, False)):
        assert len(got) == len(ref)
        for i, (a, b) in enumerate(zip(got, ref)):
            assert_same(a, b, f"batch {i}")


def test_raw_records_do_not_reach_other_collates(plain_store: Path) -> None:
    """A transform, on_error="skip", a custom collate_fn or a plain DataLoader: real samples."""
    from torch.utils.data import DataLoader

    ds = StoreIterableDataset(plain_store)
    for loader in (
        StoreDataLoader(ds, batch_size=4, num_workers=1, collate_fn=_spy),
        DataLoader(ds, batch_size=4, num_workers=1, collate_fn=_spy),
    ):
        assert sum(len(b["label"]) for b in loader) == N  # _spy raises in the worker on anything but a dict
    for kw in ({"transform": _identity}, {"on_error": "skip"}):
        out = list(StoreDataLoader(StoreIterableDataset(plain_store, **kw), batch_size=4, num_workers=1))
        assert torch.equal(torch.cat([b["label"] for b in out]), torch.arange(N))


def _identity(x: Any) -> Any:
    return x


def _spy(samples: list[Any]) -> Any:  # module level: picklable for any start method
    odd = {type(s).__name__ for s in samples if type(s) is not dict}
    if odd:
        raise TypeError(f"the collate was given {odd}")
    return default_collate(samples)


def test_batch_decoding_keeps_map_location(plain_store: Path) -> None:
    """Forked workers inherit the parent's planned pickles; the batch decode must not bypass map_location."""
    reader = tspt.open_store(plain_store)
    for i in range(3):
        reader[i]  # plans the pickle in this (the parent) process
    ds = StoreIterableDataset(plain_store, map_location="meta")
    devices = {b["image"].device.type for b in StoreDataLoader(ds, batch_size=4, num_workers=2)}
    assert devices == {"meta"}


def _collate_dict_with_count(batch: list[Any], *, collate_fn_map: Any = None) -> Any:
    from torch.utils.data._utils.collate import collate

    out = {k: collate([d[k] for d in batch], collate_fn_map=collate_fn_map) for k in batch[0]}
    out["n"] = len(batch)
    return out


def test_batch_decoding_honours_a_users_collate_fn_map_entry(
    plain_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.utils.data._utils.collate import default_collate_fn_map

    monkeypatch.setitem(default_collate_fn_map, dict, _collate_dict_with_count)
    for batch in StoreDataLoader(StoreIterableDataset(plain_store), batch_size=4, num_workers=2):
        assert batch["n"] == len(batch["label"])
