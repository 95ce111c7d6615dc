"""Which packaged file a file is a copy of, by the package manager's own digests.

Debian and Ubuntu keep an MD5 digest of every file a package installed, in
`/var/lib/dpkg/info/<package>.md5sums` ("<md5>  usr/bin/ssh" per line). Indexed by digest,
they name the packaged file that any copy of it is, whatever the copy is called: a renamed
`ssh` in /tmp is still /usr/bin/ssh.

Only files that can be what a process executes are indexed (under bin/, sbin/, libexec/,
and under lib*/ names without an extension or shared objects): about 7,000 of the 110,000
files of a development machine, so the index stays a few hundred KiB. It is built from the
database the first time it is needed (by the collector's worker thread, never at startup)
and again when the database changes. Where there is no dpkg database, `available()` says so
and renamed system binaries are recognised by name only.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import structlog

log = structlog.get_logger("sandtrace.collector")

DPKG_INFO = Path("/var/lib/dpkg/info")
RECHECK_SECONDS = 10.0  # how often a lookup may look whether the database changed
_LINE = re.compile(rb"([0-9a-f]{32}) [ *](.+)")
_TOP = re.compile(rb"(?:usr/(?:local/)?)?(?:s?bin|libexec|lib[^/]*)/")
_LIB = re.compile(rb"(?:usr/(?:local/)?)?lib[^/]*/")
_SHARED_OBJECT = re.compile(rb"\.so(?:\.[0-9.]+)?$")
MERGED_DIRS = (b"bin", b"sbin", b"lib", b"lib32", b"lib64", b"libx32")


def executable_candidate(path: bytes) -> bool:
    """Whether a packaged path (relative, as in .md5sums) is worth indexing."""
    if not _TOP.match(path):
        return False
    if not _LIB.match(path):
        return True
    name = path.rsplit(b"/", 1)[-1]
    return b"." not in name or _SHARED_OBJECT.search(name) is not None


def merged_usr(root: Path) -> dict[bytes, bytes]:
    """Top directories that are links into /usr (a merged-/usr system): b"bin" -> b"usr/bin"."""
    aliases: dict[bytes, bytes] = {}
    for name in MERGED_DIRS:
        try:
            target = (root / os.fsdecode(name)).readlink()
        except OSError:
            continue
        if str(target).lstrip("/") == f"usr/{os.fsdecode(name)}":
            aliases[name] = b"usr/" + name
    return aliases


def parse_md5sums(
    text: bytes, aliases: dict[bytes, bytes], into: dict[bytes, bytes | tuple[bytes, ...]]
) -> None:
    """Add one .md5sums file's executable candidates to `into` (digest -> absolute path, or
    several paths when packages ship identical files)."""
    for line in text.splitlines():
        m = _LINE.fullmatch(line)
        if m is None:
            continue
        rel = m.group(2).lstrip(b"/")
        if not executable_candidate(rel):
            continue
        top, sep, rest = rel.partition(b"/")
        if top in aliases and sep:
            rel = aliases[top] + b"/" + rest
        path = b"/" + rel
        digest = bytes.fromhex(m.group(1).decode())
        known = into.get(digest)
        if known is None:
            into[digest] = path
        elif isinstance(known, bytes):
            if known != path:
                into[digest] = (known, path)
        elif path not in known:
            into[digest] = (*known, path)


class PackageIndex:
    """MD5 -> packaged path, from the dpkg database under `root`. Thread-safe."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self.info_dir = root / DPKG_INFO.relative_to("/")
        self._lock = threading.Lock()
        self._index: dict[bytes, bytes | tuple[bytes, ...]] | None = None
        self._mtime_ns = -1
        self._checked = 0.0
        self.builds = 0
        self.build_seconds = 0.0

    def warm(self) -> None:
        """Build the index now (in a thread of the caller's), so that the first new
        executable does not wait for it: the collector calls it while the probes compile."""
        self._current()

    def available(self) -> bool:
        """Whether this host has a dpkg database to recognise copies by."""
        return self.info_dir.is_dir()

    def _current(self) -> dict[bytes, bytes | tuple[bytes, ...]]:
        now = time.monotonic()
        if self._index is not None and now - self._checked < RECHECK_SECONDS:
            return self._index
        with self._lock:
            self._checked = now
            try:
                mtime = self.info_dir.stat().st_mtime_ns
            except OSError:
                mtime = -2
            if self._index is None or mtime != self._mtime_ns:
                self._index = self._build()
                self._mtime_ns = mtime
            return self._index

    def _build(self) -> dict[bytes, bytes | tuple[bytes, ...]]:
        t0 = time.monotonic()
        index: dict[bytes, bytes | tuple[bytes, ...]] = {}
        aliases = merged_usr(self.root)
        try:
            files = sorted(self.info_dir.glob("*.md5sums"))
        except OSError:
            files = []
        for f in files:
            try:
                parse_md5sums(f.read_bytes(), aliases, index)
            except OSError:
                continue
        self.builds += 1
        self.build_seconds = time.monotonic() - t0
        log.debug(
            "package digests indexed",
            files=len(files),
            entries=len(index),
            seconds=round(self.build_seconds, 3),
        )
        return index

    def original(self, md5: bytes, exe: bytes) -> bytes:
        """The packaged file whose content has digest `md5`; `exe` itself when it is one of
        several packaged files with that content; b"" when no package has it."""
        known = self._current().get(md5)
        if known is None:
            return b""
        if isinstance(known, bytes):
            return known
        return exe if exe in known else known[0]
