"""fastload: the direct torch.save decoder gives what torch.load(weights_only=True) gives.

Properties (hypothesis): bit-identical results for samples of every dtype, view, container
and extra type, from bytes, bytearray and memoryview inputs, on the first load and on the
cached (layout pattern, plan, C replay) loads. Refusals: malicious pickles raise
UnsafePayloadError and nothing runs. Fuzz: mutated buffers either load as torch.load loads
them or raise a typed error, never anything else.
"""

from __future__ import annotations

import collections
import gc
import io
import os
import pickle
import random
import struct
import warnings
import weakref
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from _hostile_tools import torch_zip
from hypothesis import strategies as st
from strategies import assert_identical, samples, saved, tensors

import tensorstore_pt as ts
from tensorstore_pt import fastload
from tensorstore_pt.fastload import _Fallback, _fast_path, _unpickle, fast_loads
from tensorstore_pt.serialization import loads

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference(buf: bytes, map_location="cpu"):
    return torch.load(io.BytesIO(buf), weights_only=True, map_location=map_location)


def has_sparse(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.layout != torch.strided
    if isinstance(x, dict):
        return any(has_sparse(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(has_sparse(v) for v in x)
    return False


def data_pkl(buf: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(buf)) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


# --------------------------------------------------------------------------- properties


@pytest.fixture(autouse=True)
def _compile_layouts_soon(monkeypatch):
    """Layout patterns after 2 sightings instead of 32, so that the tests exercise them."""
    monkeypatch.setattr(fastload, "_COMPILE_AFTER", 2)


@PROPERTY
@given(samples(extras=True))
def test_same_as_torch_load_on_every_input_kind_and_cache_state(sample):
    buf = saved(sample)
    expected = reference(buf)
    # the fast path serves every non-sparse sample itself (no fallback)
    assert_identical(expected, _fast_path(buf), "fast path")
    for round_ in range(3):  # first load, then layout pattern and plan/replay caches
        for kind, given_buf in (
            ("bytes", buf),
            ("bytearray", bytearray(buf)),
            ("memoryview", memoryview(buf)),
            ("writable memoryview", memoryview(bytearray(buf))),
        ):
            assert_identical(expected, fast_loads(given_buf), f"{kind} round {round_}")


@PROPERTY
@given(samples(sparse=True))
def test_sparse_samples_fall_back_and_match(sample):
    buf = saved(sample)
    expected = reference(buf)
    if has_sparse(sample):
        with pytest.raises(_Fallback):
            _fast_path(buf)
    for _ in range(2):
        assert_identical(expected, fast_loads(buf))
        assert_identical(expected, loads(buf))


@settings(max_examples=40, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3), st.integers(0, 9))
def test_many_buffers_of_one_structure(ts_, label):
    """Samples sharing a layout and pickle go through the plan; each keeps its own data."""
    for shift in range(3):
        sample = ([t.detach().clone() for t in ts_], label + shift % 2)
        for t in sample[0]:
            if t.dtype != torch.bool:  # new bytes, same layout and pickle
                torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).add_(shift)
        buf = saved(sample)
        assert_identical(reference(buf), fast_loads(buf))
        assert_identical(reference(buf), fast_loads(bytearray(buf)))


def test_every_dtype_fast_path_and_values():
    from strategies import DTYPES

    for dtype in DTYPES:
        t = torch.arange(24, dtype=torch.int64).to(torch.uint8).view(torch.uint8)
        t = t.repeat(torch.empty((), dtype=dtype).element_size())[: 24 * torch.empty((), dtype=dtype).element_size()]
        t = t.view(dtype).reshape(2, 3, 4)
        if dtype == torch.bool:
            t = t.view(torch.uint8).bitwise_and(1).view(torch.bool)
        sample = {"c": t, "v": t.transpose(0, 2), "s": t[:, ::2], "z": t.reshape(-1)[0].clone(), "e": t[:0]}
        buf = saved(sample)
        assert_identical(reference(buf), _fast_path(buf), str(dtype))


# --------------------------------------------------------------------------- buffers


def test_bytes_input_gives_writable_tensors_that_do_not_touch_the_input():
    buf = saved({"x": torch.arange(6.0), "y": torch.arange(4)})
    original = bytes(buf)
    a = fast_loads(buf)
    b = fast_loads(buf)
    a["x"].add_(100)
    a["y"].zero_()
    assert buf == original
    assert b["x"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and b["y"].tolist() == [0, 1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable buffer" warning from torch.frombuffer
        fast_loads(saved(torch.ones(3)))


def test_bytearray_input_is_aliased():
    buf = bytearray(saved(torch.zeros(4, dtype=torch.int32)))
    t = fast_loads(buf)
    t.fill_(7)
    assert fast_loads(bytes(buf)).tolist() == [7, 7, 7, 7]  # the tensor wrote the buffer
    with pytest.raises(BufferError):
        buf.extend(b"x")  # the buffer is exported while the tensor lives
    del buf
    gc.collect()
    assert t.tolist() == [7, 7, 7, 7]  # the tensor keeps the buffer alive


def test_misaligned_writable_buffer_is_copied_per_storage():
    raw = saved(torch.arange(5, dtype=torch.float64))
    holder = bytearray(1) + bytearray(raw)
    view = memoryview(holder)[1:]
    t = fast_loads(view)
    assert t.data_ptr() % 8 == 0
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("rounds", [1, 2, 3], ids=["interpreter", "plan", "plan-again"])
@pytest.mark.parametrize("kind", ["plan", "replay"])
def test_results_are_freed_by_reference_counting(rounds, kind):
    tag = 12345 + rounds + (0 if kind == "plan" else 100)
    sample = (torch.full((3,), float(tag)), tag) if kind == "plan" else (torch.full((3,), 1.0), {tag, -tag})
    buf = saved(sample)
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            out = fast_loads(buf)
        ref = weakref.ref(out[0])
        del out
        assert ref() is None, "a reference cycle keeps the result alive"
    finally:
        gc.enable()


def test_map_location_other_than_cpu_goes_through_torch_load():
    buf = saved({"x": torch.arange(3.0)})
    out = fast_loads(buf, map_location="meta")
    assert out["x"].device.type == "meta" and out["x"].shape == (3,)
    for loc in ("cpu", None, torch.device("cpu")):
        assert_identical(reference(buf, loc), fast_loads(buf, map_location=loc))


def test_torch_modes_fall_back():
    buf = saved(torch.arange(3.0))
    with torch.device("meta"):
        with pytest.raises(_Fallback):
            _fast_path(buf)
        expected, got = reference(buf), fast_loads(buf)
    assert_identical(expected, got)


# --------------------------------------------------------------------------- caches


def test_a_recurring_pickle_gets_a_plan_or_a_replay():
    tables = fastload._get_tables()
    planned = saved({"x": torch.arange(7.0), "y": [1, "a"]})
    replayed = saved({"x": torch.arange(5.0), "s": {1, 2}, "p": torch.nn.Parameter(torch.ones(2))})
    for buf in (planned, replayed):
        for _ in range(3):
            assert_identical(reference(buf), fast_loads(buf))
    assert isinstance(tables.known[data_pkl(planned)], fastload._Plan)
    assert tables.known[data_pkl(replayed)] is None  # sets and Parameters: the C unpickler replays


def test_pickles_differing_only_in_literal_values_are_replayed(monkeypatch):
    """Per-sample labels, ids and lengths change the pickle but not its skeleton."""
    g = torch.Generator().manual_seed(0)
    fastload._reset_caches()
    bufs = [
        saved({"tokens": torch.randint(0, 9, (10 + i,), generator=g), "label": i * 7 % 200, "id": f"s{i:04d}"})
        for i in range(40)
    ]
    expected = [reference(b) for b in bufs]
    assert_identical(expected[0], fast_loads(bufs[0]))  # interpreted; its skeleton is kept
    calls = []
    monkeypatch.setattr(fastload, "_unpickle", lambda *a, **k: calls.append(1) or _unpickle(*a, **k))
    for want, buf in zip(expected[1:], bufs[1:]):
        assert_identical(want, fast_loads(buf))
    assert not calls, "the interpreter ran for pickles of a known skeleton"


def test_a_skeleton_match_with_a_refused_value_is_refused():
    """encode's codec name is a literal: "latin1" -> "rot_13" (same length) is not replayed."""
    good = torch_zip(pickle.dumps([b"ab", 1], protocol=2))
    for _ in range(2):
        assert fast_loads(good) == [b"ab", 1]
    bad = torch_zip(pickle.dumps([b"ab", 1], protocol=2).replace(b"latin1", b"rot_13"))
    assert reference(bad) == ["no", 1]  # torch allows any codec; torch.save never writes one
    with pytest.raises(ts.RecordDecodeError, match="not one torch.save writes"):
        fast_loads(bad)


def test_a_rebuild_function_stored_as_a_value_is_never_replayed():
    pkl = _hand_pickle(b"]", b"ctorch._utils\n_rebuild_tensor_v2\n", b"a")
    buf = torch_zip(pkl)
    for _ in range(3):
        out = fast_loads(buf)
        assert out == reference(buf) == [torch._utils._rebuild_tensor_v2]
    assert pkl not in fastload._get_tables().known


def test_a_known_layout_with_one_structural_byte_changed_is_parsed_again():
    buf = saved((torch.arange(4, dtype=torch.int32), 1))
    for _ in range(fastload._COMPILE_AFTER):
        fast_loads(buf)
    tail = buf[-fastload._TAIL_BYTES :]
    assert tail in fastload._LAYOUTS
    with zipfile.ZipFile(io.BytesIO(buf)) as z:
        pkl_entry = z.getinfo("archive/data.pkl")
    cd = buf.index(b"PK\x01\x02")  # data.pkl's central directory entry comes first
    assert struct.unpack_from("<I", buf, cd + 42)[0] == pkl_entry.header_offset
    bad = bytearray(buf)
    bad[cd + 38] = 0x10  # external attributes: DOS directory bit, which makes miniz skip the record
    with pytest.raises(ts.RecordDecodeError, match="zip layout"):
        _fast_path(bytes(bad))
    with pytest.raises(ts.RecordDecodeError, match="zip layout"):
        fast_loads(bytes(bad))  # never handed to torch.load, which returns uninitialised bytes for it


def test_many_threads_at_once():
    from concurrent.futures import ThreadPoolExecutor

    bufs = [saved({"x": torch.randn(4), "k": i % 3, "t": torch.arange(i % 4)}) for i in range(24)]
    expected = [reference(b) for b in bufs]
    fastload._reset_caches()

    def work(i: int):
        return [fast_loads(bufs[(i + j) % len(bufs)]) for j in range(len(bufs))]

    with ThreadPoolExecutor(4) as pool:
        for i, results in enumerate(pool.map(work, range(8))):
            for j, got in enumerate(results):
                assert_identical(expected[(i + j) % len(bufs)], got)


# --------------------------------------------------------------------------- layouts


def test_buffer_from_our_zip_writer_takes_the_fast_path():
    pkl = pickle.dumps({"a": 1, "b": [2.5, None]}, protocol=2)
    buf = torch_zip(pkl)
    assert _fast_path(buf) == {"a": 1, "b": [2.5, None]}


def test_other_zip_layouts_are_refused():
    src = saved([torch.arange(3), "x"])
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    other = out.getvalue()
    reference(other)  # torch.load reads any zip; a store only holds what torch.save writes
    with pytest.raises(ts.RecordDecodeError, match="zip layout"):
        fast_loads(other)


@pytest.mark.parametrize(
    "record, content",
    [("version", b"4\n"), ("byteorder", b"big"), (".storage_alignment", b"6x")],
    ids=["version", "byteorder", "alignment"],
)
def test_unusual_small_records_are_refused(record, content):
    buf = saved(torch.arange(4, dtype=torch.int16))
    with zipfile.ZipFile(io.BytesIO(buf)) as z:
        info = z.getinfo(f"archive/{record}")
        old = z.read(info)
    start = buf.index(old, info.header_offset + 30)
    assert len(content) <= len(old) + 1
    patched = buf[:start] + content.ljust(len(old), b" ")[: len(old)] + buf[start + len(old) :]
    with pytest.raises(ts.RecordDecodeError, match="zip layout"):
        fast_loads(patched)


def test_storage_record_of_the_wrong_size_is_refused_like_torch():
    buf = saved(torch.arange(4, dtype=torch.int32))
    pkl = data_pkl(buf)
    bad = torch_zip(pkl, {"0": b"\0" * 12})  # 3 int32 where the pickle says 4
    with pytest.raises(_Fallback):
        _fast_path(bad)
    with pytest.raises(ts.RecordDecodeError, match=r"storage data/0: expected 4 x 4 bytes, found 12 bytes") as info:
        fast_loads(bad)
    assert isinstance(info.value, ts.CorruptStoreError)


@pytest.mark.parametrize(
    "junk, error, found",
    [
        (b"", ts.RecordDecodeError, "zip layout"),
        (b"PK\x03\x04" + bytes(100), ts.RecordDecodeError, "zip layout"),
        # not a zip: a decode error (torch.load would read it as its legacy format)
        (b"not a zip at all", ts.RecordDecodeError, "zip layout"),
    ],
    ids=["empty", "zip-magic", "not-a-zip"],
)
def test_garbage_raises_typed_errors(junk, error, found):
    with pytest.raises(error, match=found):
        fast_loads(junk)


# --------------------------------------------------------------------------- refusals


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').system('true')",))


def _hand_pickle(*ops: bytes) -> bytes:
    return b"\x80\x02" + b"".join(ops) + b"."


@pytest.mark.parametrize(
    "protocol, found",
    [(2, r"GLOBAL posix\.system .*blocked"), (4, "pickle protocol 4")],
    ids=["protocol2", "protocol4"],
)
def test_reduce_to_os_system_is_refused_and_never_runs(tmp_path: Path, protocol, found):
    marker = tmp_path / "pwned"
    pkl = pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=protocol)
    buf = torch_zip(pkl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about protocol 4
        error = ts.UnsafePayloadError if protocol == 2 else ts.RecordDecodeError
        with pytest.raises(error, match=found) as info:
            fast_loads(buf)
        with pytest.raises(error):
            loads(bytearray(buf))
    assert "not run" in str(info.value) or "not loaded" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "pkl, found",
    [
        (pickle.dumps(_Evals(), protocol=2), "eval"),
        (_hand_pickle(b"csubprocess\nPopen\n", b"X\x04\x00\x00\x00true", b"\x85R"), "subprocess.Popen"),
        (_hand_pickle(b"cbuiltins\ngetattr\n", b"N", b"X\x03\x00\x00\x00__class__", b"\x86R"), "getattr"),
        (_hand_pickle(b"ctorch\nload\n", b"X\x01\x00\x00\x00x", b"\x85R"), "torch.load"),
    ],
    ids=["eval", "subprocess", "getattr", "torch.load"],
)
def test_globals_outside_the_allow_list_are_refused(pkl, found):
    with pytest.raises(ts.UnsafePayloadError, match=found):
        fast_loads(torch_zip(pkl))


@pytest.mark.parametrize(
    "pkl",
    [
        # BUILD on an allowed function: would set attributes on torch._utils._rebuild_tensor_v2
        _hand_pickle(b"ctorch._utils\n_rebuild_tensor_v2\n", b"N}X\x01\x00\x00\x00aK\x01s\x86b"),
        # APPEND to a bytearray (torch allows APPEND to lists only)
        _hand_pickle(b"c__builtin__\nbytearray\n", b")R", b"K\x41a"),
        # SETITEM on a list (torch allows dict, OrderedDict and Counter only)
        _hand_pickle(b"]K\x00a", b"K\x00K\x05s"),
        # NEWOBJ of a type torch does not allow
        _hand_pickle(b"c__builtin__\nobject\n", b")\x81"),
    ],
    ids=["build-on-function", "append-bytearray", "setitem-list", "newobj"],
)
def test_what_torch_refuses_stays_refused(pkl):
    before = dict(torch._utils._rebuild_tensor_v2.__dict__)
    with pytest.raises((ts.UnsafePayloadError, ts.RecordDecodeError)):
        fast_loads(torch_zip(pkl))
    assert torch._utils._rebuild_tensor_v2.__dict__ == before


def test_a_storage_outside_a_tensor_is_refused():
    """torch.load returns a bare storage; the writer never stores one, so the reader refuses it."""
    buf = saved([torch.arange(3, dtype=torch.int16).untyped_storage()])
    assert type(reference(buf)[0]) is torch.storage.TypedStorage
    with pytest.raises(ts.RecordDecodeError, match="not one torch.save writes"):
        fast_loads(buf)


class Point:
    def __init__(self, x: int) -> None:
        self.x = x

    def __reduce__(self):
        return (Point, (self.x,))


def test_user_safe_globals_are_refused():
    buf = saved([Point(3), torch.arange(2)])
    with pytest.raises(ts.UnsafePayloadError, match="Point"):
        fast_loads(buf)
    with torch.serialization.safe_globals([Point]):
        with pytest.raises(ts.RecordDecodeError, match="add_safe_globals"):
            fast_loads(buf)  # the writer never stores such objects


# --------------------------------------------------------------------------- fuzz


def _outcome(fn, buf):
    try:
        return "ok", fn(buf)
    except ts.TensorStoreError as exc:
        return "error", exc
    except Exception as exc:
        return "untyped", exc


def _stable(first, second) -> bool:
    """Whether two torch.load outcomes agree (some broken zips make torch.load return
    uninitialized memory, e.g. a record whose directory attribute bit makes miniz skip it)."""
    if first[0] != second[0]:
        return False
    if first[0] != "ok":
        return True
    try:
        assert_identical(first[1], second[1])
    except AssertionError:
        return False
    return True


def _mutate(rng: random.Random, buf: bytes, pkl_span: tuple[int, int]) -> bytes:
    b = bytearray(buf)
    kind = rng.randrange(7)
    if kind == 0:  # flip one bit anywhere
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # one random byte anywhere
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 2:  # one random byte in the pickle
        b[rng.randrange(*pkl_span)] = rng.randrange(256)
    elif kind == 3:  # a pickle byte +-1 (opcodes, lengths, small ints, key digits)
        i = rng.randrange(*pkl_span)
        b[i] = (b[i] + rng.choice((-1, 1))) % 256
    elif kind == 4:  # truncate
        del b[rng.randrange(len(b)) :]
    elif kind == 5:  # a 4-byte little-endian field set to a random size or offset
        i = rng.randrange(len(b) - 4)
        b[i : i + 4] = struct.pack("<I", rng.choice((0, 1, 0xFFFFFFFF, rng.randrange(len(buf) + 64))))
    else:  # zero a span
        i, k = rng.randrange(len(b)), rng.randrange(1, 32)
        b[i : i + k] = bytes(len(b[i : i + k]))
    return bytes(b)


def test_fuzzed_buffers_load_like_torch_or_raise_typed_errors():
    """3000 mutations (fixed seed) of a few buffers, with the caches warm."""
    rng = random.Random(20240611)
    bases = [
        saved((torch.arange(16, dtype=torch.uint8).reshape(4, 4), 3)),
        saved({"x": torch.randn(3, 4), "y": torch.arange(5), "z": torch.tensor(1.5, dtype=torch.bfloat16)}),
        saved([torch.zeros(2, 3).t(), b"ab", {1, 2}, 1 + 2j, collections.OrderedDict(a=None), torch.Size([2])]),
        saved(torch.nn.Parameter(torch.ones(2))),
    ]
    served = 0
    for base in bases:
        for _ in range(3):
            fast_loads(base)  # warm the layout pattern and the plan/replay caches
        pkl = data_pkl(base)
        start = base.index(pkl)
        for _ in range(750):
            buf = _mutate(rng, base, (start, start + len(pkl)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = _outcome(fast_loads, buf)
                expected = _outcome(reference, buf)
                if not _stable(expected, _outcome(reference, buf)):
                    continue  # torch.load itself read uninitialized memory: nothing to compare
            assert got[0] != "untyped", f"{type(got[1]).__name__}: {got[1]}"
            # the fast decoder refuses more than torch.load (layouts torch.save does not write),
            # never less: what it returns, torch.load returns too
            if got[0] == "ok":
                assert expected[0] == "ok", (got, expected)
                assert_identical(expected[1], got[1])
                try:
                    _fast_path(buf)
                    served += 1
                except Exception:
                    pass
    assert served > 300  # the fuzz reaches the fast path itself, not only the fallback


# --------------------------------------------------------------------------- integration


def test_serialization_loads_uses_the_fast_decoder(monkeypatch):
    buf = saved({"x": torch.arange(3)})

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    assert loads(buf)["x"].tolist() == [0, 1, 2]


def test_store_round_trip_reads_through_the_fast_decoder(tmp_path):
    data = [{"x": torch.randn(3), "y": i % 2, "v": torch.arange(12).reshape(3, 4)[:, ::2]} for i in range(20)]
    ts.write_store(data, tmp_path / "s")
    reader = ts.open_store(tmp_path / "s")
    for i, sample in enumerate(data):
        assert_identical(sample, reader[i], layout=False)  # compact() made the step slice contiguous
        assert_identical(reference(reader.read_bytes(i)), reader[i])
    assert any(isinstance(p, fastload._Plan) for p in fastload._get_tables().known.values())
