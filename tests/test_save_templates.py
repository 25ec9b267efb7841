"""``serialization.dumps`` reuses a proved template for samples of a shape seen before
(:class:`tensorstore_pt.serialization._SaveTemplates`); its bytes must be ``torch.save``'s own,
byte for byte, whatever the sample."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import samples

from tensorstore_pt import serialization as ser
from tensorstore_pt.writer import _snapshot


def _torch_save(sample):
    buf = io.BytesIO()
    torch.save(ser.compact(sample), buf)
    return buf.getvalue()


def _same_shape(sample, seed: int):
    """A sample of the same structure (same leaves, same dict keys, same object sharing)
    whose tensors hold other bytes, and whose int and float leaves (not dict keys) hold other
    values that pickle writes with the same opcode (an int's low byte changes, so does a
    float's whole value)."""
    g = torch.Generator().manual_seed(seed)
    memo: dict[int, object] = {}

    def go(x):
        if id(x) in memo:
            return memo[id(x)]
        if isinstance(x, torch.Tensor):
            if x.layout != torch.strided:
                out = x
            else:
                t = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
                n = t.untyped_storage().nbytes()
                if n:
                    flat = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
                    flat.copy_(
                        torch.randint(0, 2 if x.dtype == torch.bool else 256, (n,), dtype=torch.uint8, generator=g)
                    )
                if type(x) is torch.nn.Parameter:
                    out = torch.nn.Parameter(t, requires_grad=x.requires_grad)
                else:
                    out = t.requires_grad_(True) if x.requires_grad else t
        elif type(x) is int:
            return x ^ int(torch.randint(0, 256, (), generator=g))
        elif type(x) is float:
            return struct.unpack("<d", struct.pack("<q", int(torch.randint(-(2**63), 2**63 - 1, (), generator=g))))[0]
        elif type(x) in (list, tuple):
            out = type(x)(go(v) for v in x)
        elif isinstance(x, dict):
            out = type(x)({k: go(v) for k, v in x.items()})  # a mapping: Counter copies counts
        else:
            return x
        memo[id(x)] = out
        return out

    return go(sample)


@pytest.fixture
def templates(monkeypatch):
    """A fresh template cache for the test (the module's own is shared by the process)."""
    fresh = ser._SaveTemplates()
    monkeypatch.setattr(ser, "_TEMPLATES", fresh)
    return fresh


@settings(max_examples=150, deadline=None)
@given(sample=samples(extras=True), seed=st.integers(0, 2**31))
def test_templated_bytes_are_torch_saves_for_any_sample(sample, seed):
    templates = ser._SaveTemplates()  # a fresh cache for each example
    saved_templates, ser._TEMPLATES = ser._TEMPLATES, templates
    try:
        _check_any_sample(templates, sample, seed)
    finally:
        ser._TEMPLATES = saved_templates


def _check_any_sample(templates, sample, seed):
    try:
        expected = _torch_save(sample)
        ser.check_sample(sample)
    except Exception:  # noqa: BLE001 - torch.save or the check refuses it: dumps must refuse it
        with pytest.raises(ser.UnsupportedSampleError):
            ser.dumps(sample)
        return
    assert ser.dumps(sample) == expected  # the first of its shape: torch.save's own bytes
    others = [_same_shape(sample, seed + k) for k in range(2)]
    plain = [templates._signature(x) is not None for x in [sample, *others]]
    for other in others:  # later ones of the same shape: from the template, if it is plain
        assert ser.dumps(other) == _torch_save(other)
    # Every plain shape's template passed its proof, and the later samples used it. (A sample
    # whose tensors share one buffer is not plain; its copies, with buffers of their own, are.)
    assert plain[1] == plain[2]
    assert templates.hits == (2 if plain[0] else 1 if plain[1] else 0)
    if plain[0]:  # a plain sample saves as its snapshot does (fork workers skip the snapshot)
        assert ser.plain_dumps(sample) == expected == _torch_save(_snapshot(sample))


def test_a_plain_sample_shape_is_saved_from_its_template(templates):
    g = torch.Generator().manual_seed(0)
    batch = [
        {"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g), "label": torch.tensor(i % 10)}
        for i in range(20)
    ]
    assert [ser.dumps(s) for s in batch] == [_torch_save(s) for s in batch]
    assert (templates.misses, templates.hits) == (1, 19)
    # A transposed (dense, non-contiguous) tensor and Python leaves of every kind.
    rows = [
        (torch.randn(4, 5, generator=g).t(), 7, -0.0, float("nan"), True, None, "name", b"\x00\x01", [1, 2.5])
        for _ in range(5)
    ]
    assert [ser.dumps(s) for s in rows] == [_torch_save(s) for s in rows]
    assert (templates.misses, templates.hits) == (2, 23)


def test_leaf_values_other_than_numbers_and_string_sharing_are_part_of_the_shape(templates):
    t = torch.arange(4)
    a1, a2 = "".join(["ke", "y"]), "".join(["ke", "y"])  # equal, distinct objects
    same = [{"x": t}, {"x": t.clone()}]
    distinct = [{a1: t.clone()}, {a2: t.clone()}]
    shared = [{a1: t.clone()}, {a1: t.clone()}]  # pickle's memo writes the second a1 as a reference
    cases = [(t.clone(), 1), (t.clone(), 2), (t.clone(), 1.0), (t.clone(), True), same, distinct, shared]
    for sample in cases + cases:
        assert ser.dumps(sample) == _torch_save(sample)
    assert _torch_save(distinct) != _torch_save(shared)  # (the case above is a real difference)
    # (t, 2) is (t, 1)'s shape: an int leaf's value is patched in; a float or a bool is not an int
    assert (templates.misses, templates.hits) == (len(cases) - 1, len(cases) + 1)


INTS = [0, 1, 254, 255, 256, 257, 65534, 65535, 65536, -1, -2, -255, -256, -65536, 2**31 - 2, 2**31 - 1]
INTS += [2**31, -(2**31), -(2**31) - 1, 2**32, 2**40 + 3, -(2**47), 2**63 - 1, -(2**63), -(2**63) + 1, 2**55]
FLOATS = [0.0, -0.0, 1.0, -2.5, 1e-310, -1e308, float("inf"), float("-inf"), float("nan"), -float("nan")]
FLOATS += [struct.unpack(">d", bytes.fromhex("7ff8000000000123"))[0], 3.141592653589793]


def test_int_and_float_leaves_are_patched_into_one_template_per_opcode(templates):
    """Labels of many values (1000 ImageNet classes) share templates: one per pickle opcode
    of each int or float leaf, never one per value; every result is torch.save's own bytes."""
    t = torch.arange(3, dtype=torch.int16)
    rows = [{"image": t.clone(), "label": v, "weight": f} for v in INTS for f in FLOATS[:3]]
    rows += [(t.clone(), [v, -v if -(2**63) <= -v < 2**63 else 0, f]) for v in INTS for f in FLOATS]
    rows += [{"label": v} for v in range(1000)]
    for sample in rows:
        assert ser.dumps(sample) == _torch_save(sample), sample

    def opcode(v):  # how pickle writes v, from pickle's own disassembler: (opcode, payload length)
        op, arg, pos = list(pickletools.genops(pickle.dumps(v, protocol=2)))[1]
        return op.name, len(pickle.dumps(v, protocol=2)) - 3

    shapes = {("dict", opcode(v), "float") for v in INTS}
    shapes |= {("tuple", opcode(v), opcode(-v if -(2**63) <= -v < 2**63 else 0)) for v in INTS}
    shapes |= {("label", opcode(v)) for v in range(1000)}
    assert len({op for op, _ in map(opcode, INTS)}) == 4  # BININT1, BININT2, BININT, LONG1
    assert templates.misses == len(shapes) < 40


def test_number_dict_keys_stay_exact(templates):
    t = torch.arange(2)
    rows = [{0: t.clone(), 1: t.clone()}, {1: t.clone(), 0: t.clone()}, {0: t.clone(), 2: t.clone()}]
    rows += [{0.5: t.clone()}, {-0.0: t.clone()}, {0.0: t.clone()}, {1: 1, 2: 2}, {1: 2, 2: 1}]
    for sample in rows + rows:
        assert ser.dumps(sample) == _torch_save(sample), sample
    assert templates.misses == len(rows) - 1  # {1: 2, 2: 1} is {1: 1, 2: 2}'s shape (values patched)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (torch.arange(6.0)[2:],),  # a view with a storage offset: compacted
        lambda: (torch.zeros(3).expand(2, 3),),  # overlapping: compacted
        lambda: (torch.ones(2, requires_grad=True),),
        lambda: (torch.nn.Parameter(torch.ones(2)),),
        lambda: (torch.ones(2, dtype=torch.complex64).conj(),),
        lambda: [torch.ones(2)] * 2,  # one tensor object twice
        lambda: {"a": (t := torch.ones(4)), "b": t.view(2, 2)},  # one storage, two tensors
        lambda: (2**70,),
        lambda: ({(1, 2): torch.ones(1)},),  # a tuple dict key: refused
    ],
)
def test_samples_outside_the_plain_shapes_take_torch_save(templates, make):
    for _ in range(3):
        sample = make()
        try:
            expected = _torch_save(sample)
            ser.check_sample(sample)
        except Exception:  # noqa: BLE001
            with pytest.raises(ser.UnsupportedSampleError):
                ser.dumps(sample)
            continue
        assert ser.dumps(sample) == expected
    assert templates.hits == 0


def test_save_options_key_the_templates(templates):
    sample = (torch.arange(10, dtype=torch.int16), "s")
    assert ser.dumps(sample) == _torch_save(sample)
    torch.serialization.set_crc32_options(False)
    try:
        assert ser.dumps(sample) == _torch_save(sample)  # CRC-32s now 0: not the first template
        assert ser.dumps(sample) == _torch_save(sample)
    finally:
        torch.serialization.set_crc32_options(True)
    assert ser.dumps(sample) == _torch_save(sample)
    assert (templates.misses, templates.hits) == (2, 2)


def test_shapes_that_never_repeat_stop_making_templates(templates):
    for n in range(ser._TEMPLATE_MISS_BUDGET + 20):
        sample = torch.arange(n + 1)  # a new shape every time
        assert ser.dumps(sample) == _torch_save(sample)
    assert templates.misses == ser._TEMPLATE_MISS_BUDGET + 20
    assert len(templates._templates) == ser._TEMPLATE_MISS_BUDGET  # none made past the budget


def test_skip_data_saves_are_never_templated(templates):
    sample = (torch.arange(8), "x")
    assert ser.dumps(sample) == _torch_save(sample)
    with torch.serialization.skip_data():
        expected = _torch_save(sample)
        assert ser.dumps(sample) == expected  # torch.save's own (its storages are not written)
        assert ser.plain_dumps(sample) is None
    assert templates.hits == 0


def _strided_bytes_reference(sample) -> int:
    """tensor_bytes computed another way: every tensor torch.save would store, by recursion
    (containers of containers, dict subclasses), strided ones counted as numel x itemsize."""
    if isinstance(sample, torch.Tensor):
        return sample.numel() * sample.element_size() if not sample.is_sparse and sample.layout == torch.strided else 0
    if isinstance(sample, dict):
        return sum(_strided_bytes_reference(v) for v in sample.values())
    if type(sample) in (list, tuple):
        return sum(_strided_bytes_reference(v) for v in sample)
    return 0


@given(sample=samples(extras=True, sparse=True))
def test_tensor_bytes_counts_the_strided_tensors_of_any_sample(sample):
    assert ser.tensor_bytes(sample) == _strided_bytes_reference(sample)


def test_tensor_bytes_of_flat_dicts_takes_views_subclasses_and_sparse_as_the_walk_does():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sample = {"view": base[:, 1], "label": 3, "name": "x", "flag": True, "none": None, "raw": b"ab", "f": 0.5}
    assert ser.tensor_bytes(sample) == 3 * 4
    sample["param"] = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))  # a Tensor subclass
    sample["sparse"] = torch.zeros(4).to_sparse()  # counts 0
    sample["nested"] = {"ids": torch.zeros(2, dtype=torch.int64)}
    assert ser.tensor_bytes(sample) == 3 * 4 + 5 * 8 + 2 * 8


def test_every_weights_only_leaf_stays_accepted_and_counts_no_tensor_bytes():
    # tensor_bytes' flat-dict path once rebound the module's leaf types to a smaller set,
    # and check_sample then refused bytearray, complex, dtype, device and Size leaves.
    sample = {
        "ba": bytearray(b"x"),
        "c": 1 + 2j,
        "dt": torch.float16,
        "dev": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "b": b"\x00",
        "n": None,
        "x": torch.zeros(3, dtype=torch.int16),
    }
    ser.check_sample(sample)
    assert ser.tensor_bytes(sample) == 6


def _element_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a contiguous tensor's elements, read from its storage through a uint8
    view (no copy of ``t`` itself: a bool's bytes other than 0/1 stay as they are)."""
    size = t.element_size()
    return (
        torch.empty(0, dtype=torch.uint8)
        .set_(t.untyped_storage(), t.storage_offset() * size, (t.numel() * size,))
        .numpy()
        .tobytes()
    )


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.bool, torch.complex64, torch.uint16]
)
def test_clone_exact_copies_large_tensors_exactly_without_torch_threads(dtype) -> None:
    """A contiguous tensor of at least MEMMOVE_MIN_ELEMENTS is copied with one memmove: the
    same bytes (a bool's bytes other than 0/1 too), shape and strides (a size-1 dim's stride
    too), a storage of its own holding just them, and the same torch.save bytes. Conjugate,
    negative and strided views still go through torch: their values."""
    n = ser.MEMMOVE_MIN_ELEMENTS + 5
    g = torch.Generator().manual_seed(7)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, ((2 * n + 2) * size,), dtype=torch.uint8, generator=g)
    base = raw.view(dtype)[1:]  # an offset into a bigger storage, every byte value
    odd = torch.empty(n, 1, dtype=dtype).t()  # (1, n), strides (1, 1): contiguous
    odd.view(torch.uint8).copy_(raw[size : (n + 1) * size].view(1, -1))
    assert odd.stride() == (1, 1) and odd.is_contiguous()
    for t in (base[:n], base[n:].reshape(1, n + 1), odd):
        out = ser.clone_exact(t)
        assert (out.shape, out.stride(), out.dtype) == (t.shape, t.stride(), t.dtype)
        assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        assert out.untyped_storage().nbytes() == t.numel() * size
        assert _element_bytes(out) == _element_bytes(t)
        assert _torch_save(out) == _torch_save(t)
    with torch.device("meta"):  # copies stay on the CPU whatever torch's default device is
        assert ser.clone_exact(base[:n]).device.type == "cpu"
    grad = base[:n].clone().requires_grad_() if dtype.is_floating_point or dtype.is_complex else None
    if grad is not None:  # a tensor that requires grad is copied by torch, as before
        assert ser.clone_exact(grad).requires_grad and _torch_save(ser.clone_exact(grad)) == _torch_save(grad)
    views = [base[: 2 * n : 2]]
    if dtype.is_complex:
        views += [base[:n].conj(), base[:n].conj().imag]
    for view in views:
        # (torch's own copy of a bool makes its bytes 0/1: the expected bytes come through uint8)
        want = (view.view(torch.uint8) if dtype == torch.bool else view).resolve_conj().resolve_neg().contiguous()
        got = ser.clone_exact(view).resolve_conj().resolve_neg().contiguous()
        assert _element_bytes(got) == _element_bytes(want)
