"""Which packaged file a file is a copy of, by the package manager's own digests.

Package managers keep a digest of every file a package installed. Indexed by digest, they
name the packaged file that any copy of it is, whatever the copy is called: a renamed `ssh`
in /tmp is still /usr/bin/ssh. Three databases are read, whichever the host has:

- dpkg (Debian, Ubuntu): `/var/lib/dpkg/info/<package>.md5sums`, "<md5>  usr/bin/ssh" per
  line;
- apk (Alpine): `/lib/apk/db/installed`, text, a package per paragraph: `F:` a directory,
  `R:` a file in it, `Z:Q1<base64>` its SHA-1 (`Q2`: SHA-256);
- rpm (Fedora, RHEL, SUSE): the header of each installed package in `rpmdb.sqlite` (under
  /usr/lib/sysimage/rpm or /var/lib/rpm), read with Python's sqlite3 (file names and
  digests, SHA-256 on current distributions, MD5 on old ones); an older Berkeley DB or ndb
  database is read through `rpm -qa --dump` when the rpm tool is there.

Only files that can be what a process executes are indexed (under bin/, sbin/, libexec/,
and under lib*/ names without an extension or shared objects): about 7,000 of the 110,000
files of a development machine, so the index stays a few hundred KiB. It is built from the
databases the first time it is needed (by the collector's worker thread, never at startup)
and again when one changes. Where there is none, `available()` says so and renamed system
binaries are recognised by name only.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog

log = structlog.get_logger("sandtrace.collector")

DPKG_INFO = Path("/var/lib/dpkg/info")
APK_INSTALLED = Path("/lib/apk/db/installed")
RPM_DIRS = (Path("/usr/lib/sysimage/rpm"), Path("/var/lib/rpm"))
RPM_TIMEOUT = 120.0  # seconds `rpm -qa --dump` may take
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


Paths = bytes | tuple[bytes, ...]
Table = dict[bytes, Paths]
"""Digest -> the absolute path of the packaged file, or several when packages ship
identical files."""
Index = dict[str, Table]
"""Per digest algorithm (hashlib's names: md5, sha1, sha256), its table."""


def _add(rel: bytes, digest: bytes, aliases: dict[bytes, bytes], into: Table) -> None:
    """Add packaged path `rel` (relative or absolute) with `digest`, if it is a candidate."""
    rel = rel.lstrip(b"/")
    if not executable_candidate(rel):
        return
    top, sep, rest = rel.partition(b"/")
    if top in aliases and sep:
        rel = aliases[top] + b"/" + rest
    path = b"/" + rel
    known = into.get(digest)
    if known is None:
        into[digest] = path
    elif isinstance(known, bytes):
        if known != path:
            into[digest] = (known, path)
    elif path not in known:
        into[digest] = (*known, path)


def parse_md5sums(text: bytes, aliases: dict[bytes, bytes], into: Table) -> None:
    """Add one .md5sums file's executable candidates to `into` (MD5 digests)."""
    for line in text.splitlines():
        m = _LINE.fullmatch(line)
        if m is not None:
            _add(m.group(2), bytes.fromhex(m.group(1).decode()), aliases, into)


_APK_DIGESTS = {b"Q1": ("sha1", 20), b"Q2": ("sha256", 32)}


def parse_apk_installed(text: bytes, aliases: dict[bytes, bytes], into: Index) -> None:
    """Add the executable candidates of apk's installed database (its text form) to `into`:
    each `R:` file of the `F:` directory before it, with the `Z:` checksum after it (`Q1` +
    base64 SHA-1, `Q2` + base64 SHA-256). Lines it does not know are skipped."""
    folder = b""
    name = b""
    for line in text.splitlines():
        if not line:  # a new package
            folder = name = b""
            continue
        key, _, value = line.partition(b":")
        if key == b"F":
            folder, name = value, b""
        elif key == b"R":
            name = value
        elif key == b"Z" and name:
            kind = _APK_DIGESTS.get(value[:2])
            if kind is None:
                continue
            try:
                digest = base64.b64decode(value[2:], validate=True)
            except ValueError:
                continue
            if len(digest) == kind[1]:
                rel = folder + b"/" + name if folder else name
                _add(rel, digest, aliases, into.setdefault(kind[0], {}))
            name = b""


# rpm header tags and types (rpm's lib/rpmtag.h), and its digest algorithm numbers
_TAG_OLDFILENAMES, _TAG_FILEDIGESTS, _TAG_DIRINDEXES = 1027, 1035, 1116
_TAG_BASENAMES, _TAG_DIRNAMES, _TAG_FILEDIGESTALGO = 1117, 1118, 5011
_TYPE_INT32, _TYPE_STRING_ARRAY = 4, 8
_RPM_ALGORITHMS = {1: "md5", 2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512"}
_MAX_HEADER_ENTRIES = 1 << 16


class RpmHeaderError(ValueError):
    """A blob that is not an rpm header as the database stores it."""


def rpm_header_files(blob: bytes) -> tuple[str, list[tuple[bytes, bytes]]]:
    """(digest algorithm, [(path, digest)]) of one installed package's header as rpmdb.sqlite
    stores it (no lead, no magic: entry count, data size, the entries, the data). Files
    without a digest (directories, links, ghosts) are left out."""
    if len(blob) < 8:
        raise RpmHeaderError("shorter than a header")
    il, dl = struct.unpack_from(">II", blob)
    if il > _MAX_HEADER_ENTRIES or 8 + 16 * il + dl > len(blob):
        raise RpmHeaderError(f"{il} entries and {dl} bytes of data do not fit {len(blob)} bytes")
    data = memoryview(blob)[8 + 16 * il : 8 + 16 * il + dl]
    entries: dict[int, tuple[int, int, int]] = {}
    for i in range(il):
        tag, kind, offset, count = struct.unpack_from(">IIiI", blob, 8 + 16 * i)
        if 0 <= offset < dl:
            entries[tag] = (kind, offset, count)

    def strings(tag: int) -> list[bytes]:
        entry = entries.get(tag)
        if entry is None or entry[0] != _TYPE_STRING_ARRAY:
            return []
        _, offset, count = entry
        out = bytes(data[offset:]).split(b"\0", count)[:count]
        if len(out) != count:
            raise RpmHeaderError(f"tag {tag}: {len(out)} of {count} strings")
        return out

    def ints(tag: int) -> list[int]:
        entry = entries.get(tag)
        if entry is None or entry[0] != _TYPE_INT32:
            return []
        _, offset, count = entry
        if offset + 4 * count > dl:
            raise RpmHeaderError(f"tag {tag}: {count} integers past the data")
        return list(struct.unpack_from(f">{count}i", data, offset))

    algo_numbers = ints(_TAG_FILEDIGESTALGO)
    algorithm = _RPM_ALGORITHMS.get(algo_numbers[0] if algo_numbers else 1, "")
    digests = strings(_TAG_FILEDIGESTS)
    basenames = strings(_TAG_BASENAMES)
    if basenames:
        dirs, indexes = strings(_TAG_DIRNAMES), ints(_TAG_DIRINDEXES)
        if len(indexes) != len(basenames) or any(not 0 <= d < len(dirs) for d in indexes):
            raise RpmHeaderError("directory indexes do not match the file names")
        paths = [dirs[d] + b for d, b in zip(indexes, basenames, strict=True)]
    else:
        paths = strings(_TAG_OLDFILENAMES)
    if len(digests) != len(paths):
        raise RpmHeaderError(f"{len(digests)} digests for {len(paths)} files")
    return algorithm, [(p, d) for p, d in zip(paths, digests, strict=True) if d]


def _rpm_blobs(path: Path, mode: str) -> list[bytes]:
    """The header blobs of an rpmdb.sqlite, opened read-only (`mode`: the database is rpm's,
    nothing here may change it)."""
    db = sqlite3.connect(f"file:{path}?{mode}", uri=True)
    try:
        return [bytes(blob) for (blob,) in db.execute("SELECT blob FROM Packages")]
    finally:
        db.close()


def read_rpmdb_sqlite(path: Path, aliases: dict[bytes, bytes], into: Index) -> int:
    """Add the executable candidates of every package in an rpmdb.sqlite to `into`, opened
    read-only (the database is rpm's: nothing here may change it); the number of packages
    whose header could not be read (logged, skipped)."""
    bad = 0
    try:
        rows = _rpm_blobs(path, "mode=ro")
    except sqlite3.OperationalError:  # no -shm file and none may be made: read as it is
        rows = _rpm_blobs(path, "mode=ro&immutable=1")
    for blob in rows:
        try:
            algorithm, files = rpm_header_files(bytes(blob))
        except RpmHeaderError as exc:
            bad += 1
            log.debug("unreadable rpm header", path=str(path), error=str(exc))
            continue
        if not algorithm:
            continue
        table = into.setdefault(algorithm, {})
        for name, digest in files:
            try:
                _add(name, bytes.fromhex(digest.decode()), aliases, table)
            except ValueError:
                continue
    return bad


_HEX_ALGORITHMS = {32: "md5", 40: "sha1", 64: "sha256", 96: "sha384", 128: "sha512"}


def parse_rpm_dump(text: bytes, aliases: dict[bytes, bytes], into: Index) -> None:
    """Add the executable candidates of `rpm -qa --dump` output to `into`: per file "path
    size mtime digest mode owner group isconfig isdoc rdev symlink" (the path may hold
    spaces: the ten fields after it are read from the right); the digest's length says its
    algorithm."""
    for line in text.splitlines():
        parts = line.rsplit(b" ", 10)
        if len(parts) != 11 or not parts[0].startswith(b"/"):
            continue
        digest = parts[3]
        algorithm = _HEX_ALGORITHMS.get(len(digest))
        if algorithm is None or digest.strip(b"0") == b"":  # directories: zeros
            continue
        try:
            raw = bytes.fromhex(digest.decode())
        except ValueError:
            continue
        _add(parts[0], raw, aliases, into.setdefault(algorithm, {}))


def rpm_dump(root: Path, dbpath: Path) -> bytes:
    """`rpm -qa --dump` of the database in `dbpath` (under `root`), from the rpm tool."""
    rpm = shutil.which("rpm")
    if rpm is None:
        raise OSError("no rpm tool")
    argv = [
        rpm,
        "--root",
        str(root),
        "--dbpath",
        "/" + str(dbpath.relative_to(root)),
        "-qa",
        "--dump",
    ]
    done = subprocess.run(argv, capture_output=True, timeout=RPM_TIMEOUT, check=False)
    if done.returncode != 0:
        raise OSError(f"rpm -qa --dump failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


class PackageIndex:
    """Digest -> packaged path, from the dpkg, apk and rpm databases under `root`.
    Thread-safe."""

    def __init__(
        self, root: Path = Path("/"), *, dump: Callable[[Path, Path], bytes] = rpm_dump
    ) -> None:
        self.root = root
        self.info_dir = root / DPKG_INFO.relative_to("/")
        self.apk_db = root / APK_INSTALLED.relative_to("/")
        self.rpm_dirs = [root / d.relative_to("/") for d in RPM_DIRS]
        self._dump = dump  # rpm -qa --dump, for a database that is not sqlite
        self._lock = threading.Lock()
        self._index: Index | None = None
        self._stamp: tuple[int, ...] = ()
        self._checked = 0.0
        self.builds = 0
        self.build_seconds = 0.0

    def warm(self) -> None:
        """Build the index now (in a thread of the caller's), so that the first new
        executable does not wait for it: the collector calls it while the probes compile."""
        self._current()

    def _rpm_dir(self) -> Path | None:
        """The rpm database directory, the first that has a database."""
        for d in self.rpm_dirs:
            if any((d / name).exists() for name in ("rpmdb.sqlite", "Packages", "Packages.db")):
                return d
        return None

    def databases(self) -> list[str]:
        """The package databases this host has: dpkg, apk, rpm."""
        found = []
        if self.info_dir.is_dir():
            found.append("dpkg")
        if self.apk_db.is_file():
            found.append("apk")
        if self._rpm_dir() is not None:
            found.append("rpm")
        return found

    def available(self) -> bool:
        """Whether this host has a package database to recognise copies by."""
        return bool(self.databases())

    def algorithms(self) -> frozenset[str]:
        """The digests a file must have for a lookup (hashlib's names): those the databases
        use, once the index is built."""
        return frozenset(self._current())

    def _stamps(self) -> tuple[int, ...]:
        rpm = self._rpm_dir()
        stamps = []
        for path in (self.info_dir, self.apk_db, *(rpm.iterdir() if rpm is not None else ())):
            try:
                stamps.append(path.stat().st_mtime_ns)
            except OSError:
                stamps.append(-2)
        return tuple(stamps)

    def _current(self) -> Index:
        now = time.monotonic()
        if self._index is not None and now - self._checked < RECHECK_SECONDS:
            return self._index
        with self._lock:
            self._checked = now
            stamp = self._stamps()
            if self._index is None or stamp != self._stamp:
                self._index = self._build()
                self._stamp = stamp
            return self._index

    def _build(self) -> Index:
        t0 = time.monotonic()
        index: Index = {}
        aliases = merged_usr(self.root)
        try:
            files = sorted(self.info_dir.glob("*.md5sums"))
        except OSError:
            files = []
        md5 = index.setdefault("md5", {})
        for f in files:
            try:
                parse_md5sums(f.read_bytes(), aliases, md5)
            except OSError:
                continue
        try:
            parse_apk_installed(self.apk_db.read_bytes(), aliases, index)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("apk database unreadable", path=str(self.apk_db), error=str(exc))
        self._read_rpm(aliases, index)
        index = {algorithm: table for algorithm, table in index.items() if table}
        self.builds += 1
        self.build_seconds = time.monotonic() - t0
        log.debug(
            "package digests indexed",
            files=len(files),
            entries={algorithm: len(table) for algorithm, table in index.items()},
            seconds=round(self.build_seconds, 3),
        )
        return index

    def _read_rpm(self, aliases: dict[bytes, bytes], index: Index) -> None:
        rpm = self._rpm_dir()
        if rpm is None:
            return
        sqlite = rpm / "rpmdb.sqlite"
        try:
            if sqlite.exists():
                bad = read_rpmdb_sqlite(sqlite, aliases, index)
                if bad:
                    log.warning("rpm headers unreadable", path=str(sqlite), packages=bad)
            else:  # Berkeley DB or ndb: only rpm itself reads them
                parse_rpm_dump(self._dump(self.root, rpm), aliases, index)
        except (OSError, sqlite3.Error, subprocess.SubprocessError) as exc:
            log.warning("rpm database unreadable", path=str(rpm), error=str(exc))

    def original(self, md5: bytes, exe: bytes) -> bytes:
        """original_of for an MD5 digest alone."""
        return self.original_of({"md5": md5}, exe)

    def original_of(self, digests: Mapping[str, bytes], exe: bytes) -> bytes:
        """The packaged file whose content has these digests (algorithm -> digest); `exe`
        itself when it is one of several packaged files with that content; b"" when no
        package has it."""
        for algorithm, table in self._current().items():
            digest = digests.get(algorithm)
            known = table.get(digest) if digest is not None else None
            if known is None:
                continue
            if isinstance(known, bytes):
                return known
            return exe if exe in known else known[0]
        return b""
