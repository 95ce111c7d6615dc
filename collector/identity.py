"""What an executed file is, whatever it is called: its SHA-256, the packaged file it is a copy
of, and for a Go program the module it was built from.

The file is reached through `/proc/PID/exe`, which is the file the process really runs even
when it was renamed, deleted, or lives in another mount namespace; it is accepted only when
its inode is the one the kernel reported at exec (the process may have exec'd again since,
or be gone). When the process is gone, the event's exe path is used if its inode still is
that one.

Identities are cached per file version, (device, inode, ctime, size), in a bounded LRU, so
an exec of a known file costs one stat. A new file is opened at once (the open file stays
readable whatever happens to the process or the path), then read once by a worker thread,
which computes SHA-256 and the package databases' digests together (MD5, SHA-1: only to
look the file up among them), parses Go build information with a few bounded reads, and looks the
digest up in the package index. Files above `max_bytes` get no digest (counted).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass, field

from collector.gobuildinfo import go_module, read_buildinfo
from collector.packages import PackageIndex

CACHE_FILES = 4096
MAX_BYTES = 256 << 20
CHUNK = 1 << 20

FileKey = tuple[int, int, int, int]  # st_dev, st_ino, st_ctime_ns, st_size


@dataclass(frozen=True, slots=True)
class Identity:
    sha256: str  # "" when the file was too large to hash
    original_exe: bytes
    go_module: str


@dataclass(slots=True)
class IdentityStats:
    hits: int = 0  # execs answered from the cache
    misses: int = 0  # files read and hashed
    failures: int = 0  # execs whose file could not be reached or read
    too_large: int = 0  # files above the size bound: no digest
    bytes_hashed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "failures": self.failures,
            "too_large": self.too_large,
            "bytes_hashed": self.bytes_hashed,
        }


@dataclass(slots=True)
class PendingFile:
    """A file seen for the first time, open, waiting for the worker to read it."""

    key: FileKey
    fd: int
    exe: bytes  # the path it was executed as (to tell a packaged file at its own path)
    result: Identity | None = None
    error: str = ""
    waiting: list[int] = field(default_factory=list)  # indices of the batch's events


def _key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)


class Identities:
    """The per-file cache and the two halves of a lookup: `find` on the event loop (one stat
    on a hit, an open on a miss) and `resolve` in a worker thread (the read)."""

    def __init__(
        self,
        packages: PackageIndex | None,
        *,
        cache_files: int = CACHE_FILES,
        max_bytes: int = MAX_BYTES,
        proc: str = "/proc",
    ) -> None:
        self.packages = packages
        self.cache_files = cache_files
        self.max_bytes = max_bytes
        self.proc = proc
        self.stats = IdentityStats()
        self._cache: OrderedDict[FileKey, Identity] = OrderedDict()

    def cached(self, file_key: FileKey) -> Identity | None:
        """The identity cached under a file's version, with no system call (a hit is
        counted); None when the cache does not hold it."""
        known = self._cache.get(file_key)
        if known is not None:
            self._cache.move_to_end(file_key)
            self.stats.hits += 1
        return known

    def find(
        self,
        pid: int,
        exe_inode: int,
        exe: bytes,
        pending: dict[FileKey, PendingFile],
        *,
        file_key: FileKey | None = None,
    ) -> tuple[Identity | PendingFile | None, bool]:
        """The identity of the file `pid` executed, if cached; else the file opened and added
        to `pending` (one per file however many execs of it a batch holds); None when it
        cannot be reached. The second value says whether `pid` still runs that file (so
        that its /proc entries describe this exec).

        `file_key`: the file's version as the kernel read it at exec. A file cached under
        it is answered without a system call (the second value is then False: nothing was
        looked up in /proc). Otherwise the file is stat'ed as without it, and cached under
        what the stat says (the same key, but on file systems whose stat(2) tells another
        device or inode than the kernel's, which then stat each time)."""
        if file_key is not None:
            known = self.cached(file_key)
            if known is not None:
                return known, False
        proc_exe = f"{self.proc}/{pid}/exe"
        live = True
        try:
            st = os.stat(proc_exe)  # noqa: PTH116 - the hot path: no Path object per exec
        except OSError:
            st = None
        if st is None or (exe_inode and st.st_ino != exe_inode):
            live = False
            st = self._stat_path(exe, exe_inode)
            if st is None:
                self.stats.failures += 1
                return None, False
        key = _key(st)
        known = self._cache.get(key)
        if known is not None:
            self._cache.move_to_end(key)
            self.stats.hits += 1
            return known, live
        waiting = pending.get(key)
        if waiting is not None:
            return waiting, live
        fd = self._open(proc_exe if live else os.fsdecode(exe), key)
        if fd is None and live and self._stat_path(exe, exe_inode) is not None:
            fd = self._open(os.fsdecode(exe), key)  # it exited between the stat and the open
        if fd is None:
            self.stats.failures += 1
            return None, live
        pending[key] = opened = PendingFile(key, fd, exe)
        return opened, live

    @staticmethod
    def _stat_path(exe: bytes, exe_inode: int) -> os.stat_result | None:
        if not exe.startswith(b"/") or not exe_inode:
            return None
        try:
            st = os.stat(exe)  # noqa: PTH116
        except (OSError, ValueError):  # ValueError: a NUL in the path
            return None
        return st if st.st_ino == exe_inode and stat.S_ISREG(st.st_mode) else None

    @staticmethod
    def _open(path: str, key: FileKey) -> int | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except (OSError, ValueError):
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        if _key(st) != key or not stat.S_ISREG(st.st_mode):  # replaced between stat and open
            os.close(fd)
            return None
        return fd

    def resolve(self, item: PendingFile) -> None:
        """Read the file (in a worker thread): digests, Go build information, package. Closes
        the file; the result or the error is left in `item`."""
        try:
            item.result = self._read(item)
        except OSError as exc:
            item.error = str(exc)
        finally:
            os.close(item.fd)

    def _read(self, item: PendingFile) -> Identity:
        fd, size = item.fd, item.key[3]
        info = read_buildinfo(lambda offset, n: os.pread(fd, n, offset), size)
        if size > self.max_bytes:
            return Identity("", b"", go_module(info))
        sha = hashlib.sha256()
        # The package databases' own digests (MD5 for dpkg, SHA-1 for apk, ...), only to find
        # the file among them, when there are any
        wanted = self.packages.algorithms() if self.packages is not None else frozenset()
        more = [(n, hashlib.new(n, usedforsecurity=False)) for n in wanted if n != "sha256"]
        done = 0
        while done < size:
            chunk = os.pread(fd, min(CHUNK, size - done), done)
            if not chunk:
                break
            sha.update(chunk)
            for _, h in more:
                h.update(chunk)
            done += len(chunk)
        if done != size:
            raise OSError(f"file changed while read ({done} of {size} bytes)")
        original = b""
        if self.packages is not None and wanted:
            digests = {name: h.digest() for name, h in more}
            digests["sha256"] = sha.digest()
            original = self.packages.original_of(digests, item.exe)
        return Identity(sha.hexdigest(), original, go_module(info))

    def settle(self, item: PendingFile) -> Identity | None:
        """Count a resolved file and cache it (on the event loop, after `resolve`)."""
        if item.result is None:
            self.stats.failures += len(item.waiting) or 1
            return None
        self.stats.misses += 1
        if item.result.sha256:
            self.stats.bytes_hashed += item.key[3]
        else:
            self.stats.too_large += 1
        self._cache[item.key] = item.result
        if len(self._cache) > self.cache_files:
            self._cache.popitem(last=False)
        return item.result
