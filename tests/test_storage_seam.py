"""All file access goes through the Storage seam: an in-memory backend runs the whole store."""

from __future__ import annotations

import pickle

import pytest
import torch

import tensorstore_pt as ts
from tensorstore_pt.storage import AtomicWriter, ReadHandle, Storage

_BUCKETS: dict[str, dict[str, bytes]] = {}


class _Handle(ReadHandle):
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read_range(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def size(self) -> int:
        return len(self.data)

    def close(self) -> None:
        pass


class _Writer(AtomicWriter):
    def __init__(self, bucket: dict[str, bytes], name: str, exclusive: bool) -> None:
        self.bucket, self.name, self.parts, self.done, self.exclusive = bucket, name, [], False, exclusive

    def write(self, data) -> None:
        self.parts.append(bytes(data))

    def commit(self) -> None:
        if not self.done:
            if self.exclusive and self.name in self.bucket:  # a conditional PUT (If-None-Match: *)
                self.done = True
                raise FileExistsError(self.name)
            self.bucket[self.name] = b"".join(self.parts)  # one atomic "PUT"
            self.done = True

    def abort(self) -> None:
        self.done = True


class MemoryStorage(Storage):
    """A toy object store: a prefix in a process-global dict (picklable by name)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.location = f"mem://{prefix}"

    @property
    def bucket(self) -> dict[str, bytes]:
        return _BUCKETS.setdefault(self.prefix, {})

    def exists(self) -> bool:
        return self.prefix in _BUCKETS

    def is_container(self) -> bool:
        return self.exists()

    def ensure(self) -> bool:
        created = not self.exists()
        _BUCKETS.setdefault(self.prefix, {})
        return created

    def list(self) -> list[str]:
        return sorted(self.bucket)

    def size(self, name: str) -> int:
        if name not in self.bucket:
            raise FileNotFoundError(name)
        return len(self.bucket[name])

    def open(self, name: str) -> ReadHandle:
        if name not in self.bucket:
            raise FileNotFoundError(name)
        return _Handle(self.bucket[name])

    def writer(self, name: str, *, exclusive: bool = False) -> AtomicWriter:
        return _Writer(self.bucket, name, exclusive)

    def remove(self, name: str) -> None:
        self.bucket.pop(name, None)

    def move(self, name: str, new_name: str) -> None:
        if new_name in self.bucket:
            raise FileExistsError(new_name)
        self.bucket[new_name] = self.bucket.pop(name)

    def remove_container(self) -> None:
        if not self.bucket:
            _BUCKETS.pop(self.prefix, None)


@pytest.mark.parametrize("options", [{}, {"dictionary": 1024, "frame_target_bytes": 2048}], ids=["v1.0", "v1.1"])
def test_store_through_an_in_memory_backend(tmp_path, monkeypatch, options):
    monkeypatch.chdir(tmp_path)  # any stray local file access would land here
    storage = MemoryStorage(f"bucket-{len(options)}")
    samples = [{"x": torch.arange(i, i + 50), "y": torch.tensor(i)} for i in range(200)]
    ts.write_store(samples, storage, max_shard_bytes=4096, **options)
    ts.write_store(samples[:5], storage, mode="append")
    reader = ts.open_store(storage)
    reader.verify()
    assert len(reader) == 205
    assert torch.equal(reader[17]["x"], samples[17]["x"]) and int(reader[-1]["y"]) == 4
    assert int(pickle.loads(pickle.dumps(reader))[3]["y"]) == 3
    assert list(tmp_path.iterdir()) == []
    assert "index.json" in storage.list() and all(not n.startswith(".") for n in storage.list())


def test_failed_write_leaves_nothing_in_the_backend():
    storage = MemoryStorage("bucket-fail")
    with pytest.raises(RuntimeError):
        with ts.ShardWriter(storage, max_shard_bytes=1) as w:
            w.write_many(torch.tensor(i) for i in range(10))
            raise RuntimeError()
    assert not storage.exists()
