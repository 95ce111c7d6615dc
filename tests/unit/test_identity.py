"""The executed file's identity: Go build information, the package digests, the cache.

Real parts where they exist: Debian's `age` (a Go program, scripts/setup.sh installs it),
this machine's dpkg database, real files and real processes. Synthetic ELF files stand in
for what no installed program shows (a module build, 32-bit big-endian, no section
headers) and for hostile input.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from api.events import Alert, AnyEvent, ExecEvent, ExitEvent, Process
from collector import cli
from collector import records as R
from collector.assemble import Assembler, Scope
from collector.enrich import ExecEnricher
from collector.gobuildinfo import (
    MAGIC,
    GoBuildInfo,
    go_module,
    parse_buildinfo,
    read_buildinfo,
)
from collector.identity import Identities, Identity, PendingFile
from collector.packages import PackageIndex, executable_candidate, merged_usr, parse_md5sums
from collector.pipeline import CallbackSink, Pipeline
from collector.stdio import StdioReader
from tests.unit.test_assemble import pack

AGE = Path("/usr/bin/age")
SSH = Path("/usr/bin/ssh")


def reader(data: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, n: data[offset : offset + n]


def file_reader(path: Path) -> tuple[Callable[[int, int], bytes], int]:
    data = path.read_bytes()
    return reader(data), len(data)


# -- Go build information -------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def buildinfo(version: bytes, modinfo: bytes, *, flags: int = 2, framed: bool = True) -> bytes:
    if framed:  # cmd/go's 16-byte sentinels around the module information
        modinfo = b"0w\xaf\x0c\x92t\x08\x02A\xe1\xc1\x07\xe6\xd6\x18\xe6" + modinfo
        modinfo += b"\xf92C1\x86\x18 r\x00\x82B\x10A\x16\xd8\xf2"
    header = MAGIC + bytes([8, flags]) + bytes(16)
    return header + varint(len(version)) + version + varint(len(modinfo)) + modinfo


MODULE_INFO = (
    b"path\tgithub.com/cloudflare/cloudflared/cmd/cloudflared\n"
    b"mod\tgithub.com/cloudflare/cloudflared\t(devel)\t\n"
    b"dep\tgithub.com/pkg/errors\tv0.9.1\th1:abc=\n"
    b"build\t-compiler=gc\n"
)


def elf(section: bytes, *, bits: int = 64, big: bool = False, headers: bool = True) -> bytes:
    """A minimal ELF file holding `section` as .go.buildinfo (and, without section headers,
    as the start of its only writable PT_LOAD segment)."""
    e = ">" if big else "<"
    names = b"\0.shstrtab\0.go.buildinfo\0"
    wide = bits == 64
    ehsize, phentsize, shentsize = (64, 56, 64) if wide else (52, 32, 40)
    data_off = ehsize + phentsize
    names_off = data_off + len(section)
    shoff = names_off + len(names) if headers else 0
    shnum, shstrndx = (3, 2) if headers else (0, 0)
    ident = b"\x7fELF" + bytes([2 if wide else 1, 2 if big else 1, 1]) + bytes(9)
    head_fmt = e + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH")
    head = ident + struct.pack(
        head_fmt, 2, 62, 1, 0, ehsize, shoff, 0, ehsize, phentsize, 1, shentsize, shnum, shstrndx
    )
    n = len(section)
    if wide:  # type, flags, offset, vaddr, paddr, filesz, memsz, align
        ph = struct.pack(e + "IIQQQQQQ", 1, 6, data_off, 0, 0, n, n, 16)
    else:  # type, offset, vaddr, paddr, filesz, memsz, flags, align
        ph = struct.pack(e + "IIIIIIII", 1, data_off, 0, 0, n, n, 6, 16)
    sh_fmt = e + ("IIQQQQIIQQ" if wide else "IIIIIIIIII")
    sh = [
        struct.pack(sh_fmt, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        struct.pack(sh_fmt, 11, 1, 3, 0, data_off, n, 0, 0, 16, 0),  # .go.buildinfo
        struct.pack(sh_fmt, 1, 3, 0, 0, names_off, len(names), 0, 0, 1, 0),  # .shstrtab
    ]
    assert len(head) == ehsize
    return head + ph + section + names + (b"".join(sh) if headers else b"")


def test_debian_age_is_a_go_program_built_outside_module_mode() -> None:
    read_at, size = file_reader(AGE)
    info = read_buildinfo(read_at, size)
    assert info is not None
    major, minor = info.go_version.removeprefix("go").split(".")[:2]
    assert (int(major), int(minor)) >= (1, 18)
    # Debian builds Go packages in GOPATH mode: a main package path, no "mod" line.
    assert (info.main_path, info.module) == ("filippo.io/age/cmd/age", "")
    assert go_module(info) == "filippo.io/age/cmd/age"


def test_a_program_that_is_not_go_has_none() -> None:
    read_at, size = file_reader(SSH)
    assert read_buildinfo(read_at, size) is None
    assert go_module(None) == ""


@pytest.mark.parametrize(("bits", "big"), [(64, False), (32, True), (32, False), (64, True)])
@pytest.mark.parametrize("headers", [True, False])
def test_module_build_reports_the_main_module(bits: int, big: bool, headers: bool) -> None:
    data = elf(buildinfo(b"go1.22.1", MODULE_INFO), bits=bits, big=big, headers=headers)
    info = read_buildinfo(reader(data), len(data))
    assert info == GoBuildInfo(
        "go1.22.1",
        "github.com/cloudflare/cloudflared/cmd/cloudflared",
        "github.com/cloudflare/cloudflared",
    )
    assert go_module(info) == "github.com/cloudflare/cloudflared"


def test_unframed_module_information_and_a_long_varint() -> None:
    modinfo = b"path\tx/cmd\nmod\tx\tv1.0.0\n" + b"dep\ty\tv1\n" * 100  # > 127: two varint bytes
    info = parse_buildinfo(buildinfo(b"go1.21.0", modinfo, framed=False))
    assert info == GoBuildInfo("go1.21.0", "x/cmd", "x")


def test_pre_118_pointer_format_is_declined() -> None:
    assert parse_buildinfo(buildinfo(b"go1.17", MODULE_INFO, flags=0)) is None


def test_magic_not_on_a_16_byte_boundary_is_not_build_information() -> None:
    assert parse_buildinfo(b"\0" * 3 + buildinfo(b"go1.22", MODULE_INFO)) is None
    assert parse_buildinfo(b"\0" * 16 + buildinfo(b"go1.22", MODULE_INFO)) is not None


def test_every_truncation_of_a_real_section_is_handled() -> None:
    read_at, size = file_reader(AGE)
    data = read_at(0, size)
    start = data.find(MAGIC)
    region = data[start : start + 0x200]
    full = parse_buildinfo(region)
    assert full is not None
    for n in range(len(region)):
        got = parse_buildinfo(region[:n])
        assert got is None or got == full or got.main_path != full.main_path


def test_every_truncation_of_a_file_is_handled() -> None:
    data = elf(buildinfo(b"go1.22.1", MODULE_INFO))
    for n in range(len(data)):
        read_buildinfo(reader(data[:n]), n)  # never raises
        read_buildinfo(reader(data[:n]), len(data))  # the file shrank after its stat


def hostile_files() -> Iterator[bytes]:
    good = elf(buildinfo(b"go1.22.1", MODULE_INFO))
    # Section header fields: count, entry size, string table index, table offset.
    for off, fmt, value in [
        (0x3C, "<H", 0xFFFF),
        (0x3A, "<H", 0),
        (0x3A, "<H", 0xFFFF),
        (0x3E, "<H", 0xFFFF),
        (0x28, "<Q", 2**64 - 1),
        (0x28, "<Q", 2**63),
        (0x20, "<Q", 2**64 - 1),
        (0x38, "<H", 0xFFFF),
        (0x04, "<B", 9),
        (0x05, "<B", 0),
    ]:
        bad = bytearray(good)
        struct.pack_into(fmt, bad, off, value)
        yield bytes(bad)
    # Section offsets and sizes past the end, a 2^64 varint, a length past the end.
    shoff = struct.unpack_from("<Q", good, 0x28)[0]
    for entry in (1, 2):
        for field_off, value in [(24, 2**64 - 1), (32, 2**64 - 1), (0, 2**32 - 1)]:
            bad = bytearray(good)
            struct.pack_into(
                "<Q" if field_off else "<I", bad, shoff + 64 * entry + field_off, value
            )
            yield bytes(bad)
    start = good.find(MAGIC) + 32
    yield good[:start] + b"\xff" * 11 + good[start + 11 :]
    yield good[:start] + b"\xff\xff\xff\xff\x0f" + good[start + 5 :]


def test_hostile_files_give_none_or_a_bounded_answer() -> None:
    for data in hostile_files():
        reads: list[int] = []

        def read_at(offset: int, n: int, data: bytes = data, reads: list[int] = reads) -> bytes:
            reads.append(n)
            return data[offset : offset + n]

        info = read_buildinfo(read_at, len(data))
        assert info is None or len(info.module) <= 1024
        assert sum(reads) <= len(data) + 64 * 3


def test_fields_are_bounded_and_never_raise_on_bad_utf8() -> None:
    modinfo = b"path\t" + b"\xff" * 5000 + b"\nmod\t\xc3\x28\tv1\n"
    info = parse_buildinfo(buildinfo(b"go1.22\xff", modinfo, framed=False))
    assert info is not None
    assert info.module == "\\xc3("
    assert info.go_version == "go1.22\\xff"
    assert len(info.main_path) == 1024 * 4  # 1024 bytes, each escaped as \xff


# -- package digests --------------------------------------------------------------------------


def test_candidates_are_what_can_be_executed() -> None:
    assert executable_candidate(b"usr/bin/ssh")
    assert executable_candidate(b"sbin/ip")
    assert executable_candidate(b"usr/libexec/git-core/git-remote-http")
    assert executable_candidate(b"usr/lib/openssh/sftp-server")
    assert executable_candidate(b"usr/lib/x86_64-linux-gnu/libc.so.6")
    assert executable_candidate(b"usr/lib/x86_64-linux-gnu/libz.so")
    assert not executable_candidate(b"usr/lib/python3/dist-packages/foo.py")
    assert not executable_candidate(b"usr/share/doc/ssh/copyright")
    assert not executable_candidate(b"etc/ssh/ssh_config")


def test_md5sums_lines_merged_usr_and_shared_content() -> None:
    index: dict[bytes, bytes | tuple[bytes, ...]] = {}
    a, b = "0" * 31 + "a", "0" * 31 + "b"
    text = (
        f"{a}  bin/ls\n{b}  usr/bin/x\n{b}  usr/bin/y\n{a} *usr/bin/ls\n"
        f"garbage\n{'z' * 32}  usr/bin/z\n{a}  usr/share/doc/x\n"
    ).encode()
    parse_md5sums(text, {b"bin": b"usr/bin"}, index)
    assert index == {
        bytes.fromhex(a): b"/usr/bin/ls",
        bytes.fromhex(b): (b"/usr/bin/x", b"/usr/bin/y"),
    }


def test_merged_usr_links(tmp_path: Path) -> None:
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "sbin").mkdir()
    assert merged_usr(tmp_path) == {b"bin": b"usr/bin"}


def dpkg_index(tmp_path: Path, lines: str) -> PackageIndex:
    info = tmp_path / "var" / "lib" / "dpkg" / "info"
    info.mkdir(parents=True)
    (info / "p.md5sums").write_text(lines)
    return PackageIndex(tmp_path)


def test_several_packaged_paths_prefer_the_executed_one(tmp_path: Path) -> None:
    digest = "0123456789abcdef" * 2
    index = dpkg_index(tmp_path, f"{digest}  usr/bin/x\n{digest}  usr/sbin/y\n")
    md5 = bytes.fromhex(digest)
    assert index.original(md5, b"/usr/sbin/y") == b"/usr/sbin/y"
    assert index.original(md5, b"/tmp/z") == b"/usr/bin/x"
    assert index.original(b"\0" * 16, b"/tmp/z") == b""


def test_a_warmed_index_is_built_once_before_any_lookup(tmp_path: Path) -> None:
    digest = "0123456789abcdef" * 2
    index = dpkg_index(tmp_path, f"{digest}  usr/bin/x\n")
    index.warm()
    assert index.builds == 1
    assert index.original(bytes.fromhex(digest), b"/tmp/z") == b"/usr/bin/x"
    assert index.builds == 1  # the lookup found it built


def test_no_dpkg_database_is_said(tmp_path: Path) -> None:
    index = PackageIndex(tmp_path)
    assert not index.available()
    assert index.original(b"\0" * 16, b"/usr/bin/ssh") == b""


# -- identities of real files -----------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resolve_now(ids: Identities, pid: int, path: Path) -> tuple[Identity | None, bool]:
    """find, then (as the pipeline's worker and loop would) resolve and settle."""
    pending: dict[Any, PendingFile] = {}
    got, live = ids.find(pid, path.stat().st_ino, os.fsencode(path), pending)
    if isinstance(got, PendingFile):
        ids.resolve(got)
        return ids.settle(got), live
    return got, live


@pytest.fixture(scope="module")
def packages() -> PackageIndex:
    index = PackageIndex()
    assert index.available(), "this test needs the machine's dpkg database"
    return index


def test_renamed_copy_of_ssh_is_recognised(tmp_path: Path, packages: PackageIndex) -> None:
    copy = tmp_path / "kworker-helper"
    shutil.copyfile(SSH, copy)
    ids = Identities(packages)
    # This process runs python, not the copy: the exe path is used, its inode checked.
    ident, live = resolve_now(ids, os.getpid(), copy)
    assert not live
    assert ident == Identity(sha256_of(copy), b"/usr/bin/ssh", "")
    assert ids.stats.misses == 1
    assert ids.stats.bytes_hashed == copy.stat().st_size


def test_packaged_file_at_its_own_path(packages: PackageIndex) -> None:
    ident, _ = resolve_now(Identities(packages), os.getpid(), AGE)
    assert ident == Identity(sha256_of(AGE), b"/usr/bin/age", "filippo.io/age/cmd/age")


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A running renamed copy of sleep: stdin /dev/null, stdout a pipe, stderr a file."""
    copy = tmp_path / "sleeper"
    shutil.copy2("/usr/bin/sleep", copy)
    with (tmp_path / "err").open("wb") as err:
        proc = subprocess.Popen(
            [copy, "60"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
        )
    try:
        yield proc, copy
    finally:
        proc.kill()
        proc.communicate()


def test_a_running_deleted_file_is_read_through_proc(
    sleeper: tuple[subprocess.Popen[bytes], Path], packages: PackageIndex
) -> None:
    proc, copy = sleeper
    expected = sha256_of(copy)
    inode = copy.stat().st_ino
    wait_exec(proc.pid, inode)
    copy.unlink()
    ids = Identities(packages)
    pending: dict[Any, PendingFile] = {}
    got, live = ids.find(proc.pid, inode, os.fsencode(copy), pending)
    assert live and isinstance(got, PendingFile)
    ids.resolve(got)
    assert ids.settle(got) == Identity(expected, b"/usr/bin/sleep", "")
    # The same file again: one stat, from the cache.
    again, live = ids.find(proc.pid, inode, b"/anything", {})
    assert live and again == Identity(expected, b"/usr/bin/sleep", "")
    assert (ids.stats.hits, ids.stats.misses, ids.stats.failures) == (1, 1, 0)


def wait_exec(pid: int, inode: int) -> None:
    """Return once `pid` runs the file of `inode` (a loaded machine may take a while)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/exe").stat().st_ino == inode:
                return
        except OSError:
            pass
        time.sleep(0.001)
    raise AssertionError(f"{pid} did not exec the file within 20 s")


def test_a_changed_file_is_read_again_and_the_cache_is_bounded(tmp_path: Path) -> None:
    ids = Identities(None, cache_files=2)
    files = [tmp_path / f"f{i}" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(b"x" * (i + 1))
    for f in files:
        resolve_now(ids, os.getpid(), f)
    assert ids.stats.misses == 3
    resolve_now(ids, os.getpid(), files[2])
    assert ids.stats.hits == 1
    resolve_now(ids, os.getpid(), files[0])  # evicted: the cache holds 2
    assert ids.stats.misses == 4
    files[0].write_bytes(b"yy")  # new content: a new ctime
    ident, _ = resolve_now(ids, os.getpid(), files[0])
    assert ident is not None and ident.sha256 == hashlib.sha256(b"yy").hexdigest()
    assert ids.stats.misses == 5


def test_files_above_the_bound_get_no_digest_but_are_counted(tmp_path: Path) -> None:
    big = tmp_path / "age-copy"
    shutil.copyfile(AGE, big)
    ids = Identities(None, max_bytes=1 << 20)
    ident, _ = resolve_now(ids, os.getpid(), big)
    assert ident == Identity("", b"", "filippo.io/age/cmd/age")
    assert (ids.stats.too_large, ids.stats.bytes_hashed) == (1, 0)


def test_a_file_that_cannot_be_reached_is_a_failure(tmp_path: Path) -> None:
    ids = Identities(None)
    f = tmp_path / "gone"
    f.write_bytes(b"x")
    inode = f.stat().st_ino
    f.unlink()
    got, live = ids.find(os.getpid(), inode, os.fsencode(f), {})
    assert (got, live) == (None, False)
    # a path whose inode is another file's is not taken for it
    other = tmp_path / "other"
    other.write_bytes(b"y")
    got, _ = ids.find(os.getpid(), other.stat().st_ino + 1, os.fsencode(other), {})
    assert got is None
    got, _ = ids.find(os.getpid(), 5, b"relative/path\0nul", {})
    assert got is None
    assert ids.stats.failures == 3


# -- the pipeline completes exec events before anything sees them ----------------------------


class _Losses:
    kernel: dict[int, int] = {}  # noqa: RUF012 - read only
    user = 0
    errors: dict[int, int] = {}  # noqa: RUF012
    sandboxes: dict[int, int] = {}  # noqa: RUF012


class _Queue:
    def __init__(self, batches: list[list[bytes]]) -> None:
        self.batches = batches

    def drain(self) -> list[list[bytes]]:
        out, self.batches = self.batches, []
        return out


class _Source:
    def __init__(self, batches: list[list[bytes]]) -> None:
        self.queue = _Queue(batches)

    def start(self, wake: Callable[[], None]) -> None:
        wake()

    def drain_now(self) -> None:
        return None

    def collect(self) -> list[list[bytes]]:
        return self.queue.drain()

    def look_again(self) -> None:
        return None

    def losses(self) -> _Losses:
        return _Losses()


def exec_record(pid: int, exe: Path, **kw: Any) -> bytes:
    parts = [p.encode() for p in reversed(exe.parts[1:])]
    path = b"".join(p + b"\0" for p in parts)
    return pack(
        R.REC_EXEC,
        b"x\0" + path,
        pid=pid,
        tid=pid,
        argv_size=2,
        argv_full_size=2,
        exe_size=len(path),
        exe_ino=exe.stat().st_ino,
        **kw,
    )


def test_pipeline_fills_exec_events_in_order(
    sleeper: tuple[subprocess.Popen[bytes], Path], packages: PackageIndex
) -> None:
    proc, copy = sleeper
    wait_exec(proc.pid, copy.stat().st_ino)
    records = [
        exec_record(proc.pid, copy),
        pack(R.REC_EXIT, pid=proc.pid, tid=proc.pid),
        exec_record(proc.pid + 10_000_000, copy),  # no such process: found by its path
    ]
    seen: list[AnyEvent | Alert] = []
    asm = Assembler([Scope("box", ["/"])], lambda _id: "/", lambda _p: "", host="h")
    enricher = ExecEnricher(Identities(packages), StdioReader())
    pipeline = Pipeline(_Source([records]), asm, [CallbackSink(seen.append)], enricher=enricher)
    stop = asyncio.Event()
    stop.set()
    totals = asyncio.run(pipeline.run(stop))
    assert [type(e) for e in seen] == [ExecEvent, ExitEvent, ExecEvent]
    first, _, second = seen
    assert isinstance(first, ExecEvent) and isinstance(second, ExecEvent)
    assert first.sha256 == second.sha256 == sha256_of(copy)
    assert first.original_exe == b"/usr/bin/sleep"
    assert first.stdio == ["null", "pipe", f"file:{copy.parent / 'err'}"]
    assert second.stdio == ["unknown"] * 3
    assert totals.enrich["identity_misses"] == 1
    assert totals.enrich["identity_hits"] == 0  # the second exec waited on the same read
    assert isinstance(first.process, Process)


def test_a_host_without_dpkg_is_told_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enricher = cli._enricher(PackageIndex(tmp_path))
    try:
        assert enricher.identities.packages is None
        assert capsys.readouterr().err == (
            "sandtrace: no package database (dpkg, rpm, apk): renamed system binaries are"
            " recognised by name only\n"
        )
    finally:
        enricher.close()
    enricher = cli._enricher(PackageIndex())
    enricher.close()
    assert capsys.readouterr().err == ""


def test_a_failing_worker_leaves_the_events_unanswered_not_stopped(
    sleeper: tuple[subprocess.Popen[bytes], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, copy = sleeper
    wait_exec(proc.pid, copy.stat().st_ino)
    enricher = ExecEnricher(Identities(None), StdioReader())

    def broken(_item: PendingFile) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(enricher.identities, "resolve", broken)
    asm = Assembler([Scope("box", ["/"])], lambda _id: "/", lambda _p: "", host="h")
    events, _ = asm.feed_batches([[exec_record(proc.pid, copy)]])
    batch = enricher.begin(events)
    assert batch is not None
    batch.work()
    batch.apply()
    (ev,) = events
    assert isinstance(ev, ExecEvent)
    assert (ev.sha256, ev.stdio[0]) == ("", "null")
    assert enricher.identities.stats.failures == 1
    enricher.close()


def test_a_fileless_program_is_read_from_its_memfd(packages: PackageIndex) -> None:
    """A memfd holding a copy of sleep, exec'd by descriptor: no path anywhere, yet the
    running process's file is read (and recognised) through /proc/PID/exe."""
    content = Path("/usr/bin/sleep").read_bytes()
    fd = os.memfd_create("payload", 0)
    try:
        os.write(fd, content)
        fexecve = "import os, sys; os.execve(int(sys.argv[1]), ['x', '60'], {})"
        proc = subprocess.Popen(["/usr/bin/python3", "-c", fexecve, str(fd)], pass_fds=(fd,))
        inode = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    try:
        wait_exec(proc.pid, inode)
        ids = Identities(packages)
        pending: dict[Any, PendingFile] = {}
        got, live = ids.find(proc.pid, inode, b"/memfd:payload (deleted)", pending)
        assert live and isinstance(got, PendingFile)
        ids.resolve(got)
        assert ids.settle(got) == Identity(
            hashlib.sha256(content).hexdigest(), b"/usr/bin/sleep", ""
        )
    finally:
        proc.kill()
        proc.wait()


def test_a_file_the_kernel_keyed_at_exec_is_found_without_a_stat(tmp_path: Path) -> None:
    """An exec record with EXEC_F_FILE_KEY carries the file's version as stat(2) tells it
    (the kernel's dev_t re-encoded): the identity cache answers from it with no system
    call, even once the process and the file are gone (which a stat could not find)."""
    copy = tmp_path / "tool"
    shutil.copy2("/usr/bin/true", copy)
    st = copy.stat()
    key = (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)
    kernel = {
        "flags": R.EXEC_F_FILE_KEY,
        "exe_dev": os.major(st.st_dev) << 20 | os.minor(st.st_dev),
        "exe_ctime_ns": st.st_ctime_ns,
        "exe_file_size": st.st_size,
    }
    gone = [exec_record(pid, copy, **kernel) for pid in (4_000_001, 4_000_002)]
    asm = Assembler([Scope("box", ["/"])], lambda _id: "/", lambda _p: "", host="h")
    events, _ = asm.feed_batches([[gone[0]]])
    assert asm.exec_file_keys == {id(events[0]): key}
    enricher = ExecEnricher(Identities(None), StdioReader())
    try:
        # Streams captured at exec: /proc is not needed for them either.
        first = msgspec.structs.replace(events[0], stdio=["null"] * 3)
        out: list[AnyEvent] = [first]
        batch = enricher.begin(out, {id(first): key})
        assert batch is not None  # a new file: read by its path, the process being gone
        batch.work()
        batch.apply()
        digest = hashlib.sha256(copy.read_bytes()).hexdigest()
        assert isinstance(out[0], ExecEvent) and out[0].sha256 == digest
        copy.unlink()
        events, _ = asm.feed_batches([[gone[1]]])
        second = msgspec.structs.replace(events[0], stdio=["null"] * 3)
        out = [second]
        assert enricher.begin(out, asm.exec_file_keys | {id(second): key}) is None
        assert isinstance(out[0], ExecEvent) and out[0].sha256 == digest
        stats = enricher.identities.stats
        assert (stats.hits, stats.misses, stats.failures) == (1, 1, 0)
        out = [second]  # without the kernel's key, the stat finds nothing
        assert enricher.begin(out) is None
        assert isinstance(out[0], ExecEvent) and out[0].sha256 == ""
        assert stats.failures == 1
    finally:
        enricher.close()


def test_an_exec_record_without_the_file_key_gives_none() -> None:
    asm = Assembler([Scope("box", ["/"])], lambda _id: "/", lambda _p: "", host="h")
    events, _ = asm.feed_batches([[exec_record(4_000_003, Path("/usr/bin/true"))]])
    assert len(events) == 1 and asm.exec_file_keys == {}
