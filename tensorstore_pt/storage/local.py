"""Local file-system storage: ``os.pread`` reads, temp-file + fsync + rename writes.

Durability: a committed file is fsynced before ``os.replace`` and its directory is fsynced
after, so a crash leaves either the old file or the complete new one (POSIX rename(2)
atomicity). Temporary files are named ``.<name>.tmp-<pid>-<random>`` and never match a
shard or index name, so a reader never sees a partial file.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from ..errors import InvalidOptionError, NotARegularFileError
from .abc import AtomicWriter, ReadHandle, Storage

__all__ = ["LocalStorage", "TEMP_MARKER"]

#: Every temporary file name contains this marker (for clean-up and recovery tools).
TEMP_MARKER = ".tmp-"


class _LocalHandle(ReadHandle):
    _fd = -1  # so close() and __del__ work even if os.open failed

    def __init__(self, path: Path) -> None:
        # O_NONBLOCK: opening a FIFO must not block; it is refused just below.
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        mode = os.fstat(self._fd).st_mode
        if not stat.S_ISREG(mode):
            self.close()
            raise NotARegularFileError(f"{str(path)!r} is {_kind(mode)}; expected a regular file")

    def read_range(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        # pread may return short reads for large lengths; loop until EOF or done.
        parts = [data]
        got = len(data)
        while got < length and data:
            data = os.pread(self._fd, length - got, offset + got)
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except OSError:
            pass


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class _LocalWriter(AtomicWriter):
    def __init__(self, root: Path, name: str, exclusive: bool) -> None:
        self._final = root / name
        self._exclusive = exclusive
        self._tmp = root / f".{name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
        self._root = root
        self._f = open(self._tmp, "xb")
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        self._f.write(data)

    def commit(self) -> None:
        if self._done:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self._exclusive:
            # link(2) fails if the name exists: never clobbers another writer's file.
            try:
                os.link(self._tmp, self._final)
            except FileExistsError:
                self.abort()
                raise
            os.unlink(self._tmp)
        else:
            os.replace(self._tmp, self._final)
        _fsync_dir(self._root)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._f.close()
        finally:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass


class LocalStorage(Storage):
    """A directory on a local file system.

    Thread and fork safety: holds no open files itself; handles from :meth:`open` belong to
    the process that opened them.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    def exists(self) -> bool:
        return self.root.exists()

    def is_container(self) -> bool:
        return self.root.is_dir()

    def ensure(self) -> bool:
        if self.root.is_dir():
            return False
        try:
            self.root.mkdir(parents=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise InvalidOptionError(
                f"cannot create the store directory {self.location!r}: a part of the path is a file ({exc})"
            ) from exc
        return True

    def list(self) -> list[str]:
        # Every entry, not only regular files: a store file replaced by a directory or a FIFO
        # must show up (and then be refused by size/open), not look absent.
        return sorted(e.name for e in os.scandir(self.root))

    def size(self, name: str) -> int:
        st = os.stat(self.root / name)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFileError(f"{str(self.root / name)!r} is {_kind(st.st_mode)}; expected a regular file")
        return st.st_size

    def open(self, name: str) -> ReadHandle:
        return _LocalHandle(self.root / name)

    def writer(self, name: str, *, exclusive: bool = False) -> AtomicWriter:
        return _LocalWriter(self.root, name, exclusive)

    def remove(self, name: str) -> None:
        try:
            os.unlink(self.root / name)
        except FileNotFoundError:
            pass

    def move(self, name: str, new_name: str) -> None:
        dst = self.root / new_name
        if dst.exists():
            raise FileExistsError(f"{dst} already exists")
        os.rename(self.root / name, dst)
        _fsync_dir(self.root)

    def remove_container(self) -> None:
        try:
            self.root.rmdir()
        except OSError:
            pass
