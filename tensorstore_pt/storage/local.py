"""Local file-system storage: ``os.pread`` reads, temp-file + fsync + rename writes.

Durability: a committed file is fsynced before ``os.replace`` and its directory is fsynced
after, so a crash leaves either the old file or the complete new one (POSIX rename(2)
atomicity). Temporary files are named ``.<name>.tmp-<pid>-<random>`` and never match a
shard or index name, so a reader never sees a partial file.

Locking: :meth:`LocalStorage.lock` takes ``flock(2)`` (``LOCK_EX | LOCK_NB``) on
``.tspt-lock`` in the store directory. The kernel releases it when the holder's process
exits, however it exits, so a SIGKILLed writer never blocks the store. flock locks are
per open file description: two writers in one process exclude each other too, and a child
forked while a writer is open shares its lock. Where ``flock`` is not supported (some
network file systems answer ``ENOLCK``), the lock is advisory only: the owner record is
still written, a live holder on this host is still detected by its pid, and writers fall
back to comparing ``index.json`` before their commit.

Disk full: ``ENOSPC`` and ``EDQUOT`` from any write, flush, fsync or rename become
:class:`~tensorstore_pt.errors.StorageFullError` naming the store and the file.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import stat
from pathlib import Path
from typing import Any

from ..errors import InvalidOptionError, NotARegularFileError, StorageFullError, StoreBusyError
from ..format import LOCK_NAME
from .abc import FULL_ERRNOS as _FULL_ERRNOS
from .abc import AtomicWriter, ReadHandle, Storage, StoreLock, full_disk_error

__all__ = ["LocalStorage", "TEMP_MARKER"]

#: Every temporary file name contains this marker (for clean-up and recovery tools).
TEMP_MARKER = ".tmp-"
#: Largest owner record read back from a lock file (bytes).
_MAX_OWNER_BYTES = 64 * 2**10


def _full_error(exc: OSError, root: Path, name: str, what: str) -> StorageFullError:
    return full_disk_error(exc, str(root), name, what)


class _LocalHandle(ReadHandle):
    _fd = -1  # so close() and __del__ work even if os.open failed

    def __init__(self, path: Path) -> None:
        # O_NONBLOCK: opening a FIFO must not block; it is refused just below.
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        mode = os.fstat(self._fd).st_mode
        if not stat.S_ISREG(mode):
            self.close()
            raise NotARegularFileError(f"{str(path)!r} is {_kind(mode)}; expected a regular file")

    def size(self) -> int:
        return os.fstat(self._fd).st_size

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
        self._name = name
        self._exclusive = exclusive
        self._tmp = root / f".{name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
        self._root = root
        self._done = False
        try:
            self._f = open(self._tmp, "xb")
        except OSError as exc:
            self._done = True
            if exc.errno in _FULL_ERRNOS:
                raise _full_error(exc, root, name, "creating") from exc
            raise

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._f.write(data)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise _full_error(exc, self._root, self._name, "writing") from exc
            raise

    def commit(self) -> None:
        if self._done:
            return
        try:
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
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                self.abort()
                raise _full_error(exc, self._root, self._name, "committing") from exc
            raise
        _fsync_dir(self._root)
        self._done = True

    def abort(self) -> None:
        """Close and unlink the temporary file; both are tried even if the other fails (a
        close that flushes into a full disk raises ENOSPC, and the file must still go)."""
        if self._done:
            return
        self._done = True
        errors: list[OSError] = []
        try:
            self._f.close()
        except OSError as exc:
            errors.append(exc)
            try:  # the buffered data could not be flushed: drop it so close can finish
                self._f.raw.close()  # type: ignore[attr-defined]
            except (OSError, AttributeError):
                pass
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OSError(exc.errno, f"could not remove the temporary file of {self._name!r}: {exc.strerror}") from exc


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (not this process)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def describe_owner(owner: dict[str, Any] | None) -> str:
    """``process 1234 on host 'node7' (a writer, mode 'append', since ...)`` for messages."""
    if not owner:
        return "another process"
    parts = f"process {owner.get('pid', '?')} on host {owner.get('host', '?')!r}"
    role = owner.get("role")
    extra = [f"a {role}" if role else None, f"mode {owner['mode']!r}" if owner.get("mode") else None]
    extra.append(f"since {owner['since']}" if owner.get("since") else None)
    extra = [e for e in extra if e]
    return f"{parts} ({', '.join(extra)})" if extra else parts


class _LocalLock(StoreLock):
    """flock on ``.tspt-lock``, with the holder's owner record as the file's content."""

    def __init__(self, root: Path, owner: dict[str, Any] | None) -> None:
        self._fd = -1
        path = root / LOCK_NAME
        probe = owner is None
        # O_NOFOLLOW: a symlink planted as the lock file must never make a writer write (or
        # truncate) its target; O_NONBLOCK: a FIFO must not block the open. Both are refused.
        flags = (os.O_RDONLY if probe else os.O_RDWR | os.O_CREAT) | os.O_NOFOLLOW | os.O_NONBLOCK
        not_regular = f"store {str(root)!r}: its lock file {LOCK_NAME!r} is {{}}; expected a regular file (remove it: writers create it again)"
        try:
            self._fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileNotFoundError:
            return  # probe of a store that was never locked: nobody holds it
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotARegularFileError(not_regular.format("a symbolic link")) from exc
            if exc.errno == errno.EISDIR:
                raise NotARegularFileError(not_regular.format("a directory")) from exc
            if exc.errno in _FULL_ERRNOS:
                raise _full_error(exc, root, LOCK_NAME, "creating") from exc
            raise OSError(
                exc.errno,
                f"store {str(root)!r}: cannot create its lock file {LOCK_NAME!r} ({exc.strerror}); "
                "expected a writable directory",
            ) from exc
        mode = os.fstat(self._fd).st_mode
        if not stat.S_ISREG(mode):
            self.release(clear=False)
            raise NotARegularFileError(not_regular.format(_kind(mode)))
        try:
            self.supported = self._flock(root)
            self.previous = self._read_owner()
            if not self.supported and self.previous and self.previous.get("host") == socket.gethostname():
                pid = self.previous.get("pid")
                if isinstance(pid, int) and _pid_alive(pid):
                    raise StoreBusyError(
                        f"store {str(root)!r} is being written by {describe_owner(self.previous)} (this file "
                        "system has no locks; the holder was found by its pid); wait for it to finish"
                    )
            if probe:
                self.release(clear=False)
                return
            self._root = root
            self.update(owner)  # type: ignore[arg-type]
        except BaseException:
            self.release(clear=False)
            raise

    def update(self, owner: dict[str, Any]) -> None:
        data = json.dumps(owner, sort_keys=True).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise _full_error(exc, self._root, LOCK_NAME, "writing the owner record of") from exc
            raise

    def _flock(self, root: Path) -> bool:
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = self._read_owner()
            raise StoreBusyError(
                f"store {str(root)!r} is locked by {describe_owner(holder)}: one writer or recover at a time; "
                "wait for it to finish (a holder that dies releases the lock at once)"
            ) from exc
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                return False
            raise
        return True

    def _read_owner(self) -> dict[str, Any] | None:
        try:
            data = os.pread(self._fd, _MAX_OWNER_BYTES, 0)
        except OSError:
            return None
        if not data.strip():
            return None
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return {"unreadable": data[:64].hex()}
        return obj if isinstance(obj, dict) else {"unreadable": repr(obj)[:64]}

    def release(self, clear: bool = True) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if clear:
                os.ftruncate(fd, 0)  # a clean end: frees blocks, works on a full disk
                os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if self._fd >= 0:
                os.close(self._fd)
        except OSError:
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

    def writer(self, name: str, *, exclusive: bool = False, if_match: str | None = None) -> AtomicWriter:
        """Write ``name`` via a temporary file and rename. ``if_match`` is ignored: local
        writers exclude each other with :meth:`lock` (``read_versioned`` returns None)."""
        del if_match
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
            os.unlink(self.root / LOCK_NAME)
        except OSError:
            pass
        try:
            self.root.rmdir()
        except OSError:
            pass

    def lock(self, owner: dict[str, Any] | None) -> StoreLock:
        """Take ``flock`` on ``.tspt-lock`` (see the module docstring).

        Args:
            owner: The holder's record, written into the lock file while held; None probes:
                raises if someone holds the lock, else releases at once (creates nothing).

        Raises:
            StoreBusyError: Another process (or another writer in this one) holds the lock.
            StorageFullError: The lock file cannot be written for lack of space.
            OSError: The directory is not writable.
        """
        return _LocalLock(self.root, owner)
