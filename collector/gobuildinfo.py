"""A Go program's build information, read from its ELF file: which module it was built from.

Go (1.18 and later) writes a `.go.buildinfo` section: a 32-byte header that starts with the
magic b"\\xff Go buildinf:", then the pointer size and a flags byte, and when flag 2 is set
("inline strings") two varint-prefixed strings follow: the Go version and the module
information, lines such as

    path\tgithub.com/cloudflare/cloudflared/cmd/cloudflared
    mod\tgithub.com/cloudflare/cloudflared\tv2024.1.0\th1:...

The file is the traced program, so every offset and length in it is checked against what was
read, every read is bounded, and nothing it contains can raise: a malformed or older file
gives None. Older formats (pointers into the data segment, Go < 1.18) are declined, not
followed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

MAGIC = b"\xff Go buildinf:"
HEADER_SIZE = 32
FLAG_INLINE_STRINGS = 2
SECTION = b".go.buildinfo"

MAX_SECTIONS = 4096  # more section headers than any real program has
MAX_SHSTRTAB = 1 << 20
MAX_BUILDINFO = 256 << 10  # version + module lines of large programs stay under 64 KiB
SEARCH_WINDOW = 64 << 10  # without section headers: where Go's own reader searches too
MAX_FIELD = 1024  # longest path or version reported

_PH64 = "IIQ16xQ"  # the fields of a program header used here, in file order
_PH32 = "II8xI4xI"

ReadAt = Callable[[int, int], bytes]
"""read_at(offset, size): at most `size` bytes of the file from `offset` (os.pread's shape)."""


@dataclass(frozen=True, slots=True)
class GoBuildInfo:
    go_version: str  # "go1.22.1"
    main_path: str  # the main package's import path ("path" line)
    module: str  # the main module's path ("mod" line); "" when built outside a module


def _c_str(table: bytes, start: int) -> bytes:
    if not 0 <= start < len(table):
        return b""
    end = table.find(b"\0", start)
    return table[start : end if end >= 0 else len(table)]


def _buildinfo_region(read_at: ReadAt, size: int) -> bytes | None:
    """The bytes of the `.go.buildinfo` section, or without section headers the start of the
    first writable loaded segment (where the linker puts it); None when not an ELF file."""
    head = read_at(0, 64)
    if len(head) < 52 or head[:4] != b"\x7fELF":
        return None
    cls, data = head[4], head[5]
    if data not in (1, 2) or cls not in (1, 2):
        return None
    end = "<" if data == 1 else ">"
    if cls == 2:
        if len(head) < 64:
            return None
        phoff, shoff = struct.unpack_from(end + "QQ", head, 0x20)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(end + "5H", head, 0x36)
        sh_fmt, sh_min = end + "II8xQQQ", 64  # name, type, (flags), addr, offset, size
        ph_min = 56
    else:
        phoff, shoff = struct.unpack_from(end + "II", head, 0x1C)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(end + "5H", head, 0x2A)
        sh_fmt, sh_min = end + "II4xIII", 40
        ph_min = 32
    if 0 < shnum <= MAX_SECTIONS and shentsize >= sh_min and shstrndx < shnum:
        table_size = shnum * shentsize
        if shoff + table_size <= size:
            table = read_at(shoff, table_size)
            if len(table) == table_size:
                found = _section(
                    read_at,
                    size,
                    table,
                    entsize=shentsize,
                    count=shnum,
                    strndx=shstrndx,
                    fmt=sh_fmt,
                )
                if found is not None:
                    return found
    # No section headers (stripped by a packer): the first writable PT_LOAD segment.
    if 0 < phnum <= MAX_SECTIONS and phentsize >= ph_min and phoff + phnum * phentsize <= size:
        table = read_at(phoff, phnum * phentsize)
        if len(table) != phnum * phentsize:
            return None
        for i in range(phnum):
            at = i * phentsize
            if cls == 2:  # Elf64_Phdr: type, flags, offset, vaddr, paddr, filesz
                p_type, p_flags, p_offset, p_filesz = struct.unpack_from(end + _PH64, table, at)
            else:  # Elf32_Phdr: type, offset, vaddr, paddr, filesz, memsz, flags
                p_type, p_offset, p_filesz, p_flags = struct.unpack_from(end + _PH32, table, at)
            if p_type == 1 and p_flags & 2 and p_offset < size:  # PT_LOAD, PF_W
                return read_at(p_offset, min(p_filesz, SEARCH_WINDOW, size - p_offset))
    return None


def _section(
    read_at: ReadAt,
    size: int,
    table: bytes,
    *,
    entsize: int,
    count: int,
    strndx: int,
    fmt: str,
) -> bytes | None:
    def entry(i: int) -> tuple[int, int, int, int, int]:
        name, kind, addr, offset, length = struct.unpack_from(fmt, table, i * entsize)
        return name, kind, addr, offset, length

    _, _, _, str_off, str_size = entry(strndx)
    if str_size > MAX_SHSTRTAB or str_off + str_size > size:
        return None
    names = read_at(str_off, str_size)
    for i in range(count):
        name, kind, _, offset, length = entry(i)
        if kind == 8:  # SHT_NOBITS: nothing in the file
            continue
        if _c_str(names, name) == SECTION:
            if offset >= size:
                return None
            return read_at(offset, min(length, MAX_BUILDINFO, size - offset))
    return None


def _uvarint(data: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        b = data[i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i + 1
        shift += 7
    return None


def _string(data: bytes, pos: int) -> tuple[bytes, int] | None:
    got = _uvarint(data, pos)
    if got is None:
        return None
    length, pos = got
    if length > len(data) - pos:
        return None
    return data[pos : pos + length], pos + length


def _text(raw: bytes) -> str:
    return raw[:MAX_FIELD].decode("utf-8", "backslashreplace")


def parse_buildinfo(region: bytes) -> GoBuildInfo | None:
    """Build information from the bytes of a `.go.buildinfo` section (or the segment that
    holds it); None when absent, malformed or in the pre-1.18 pointer format."""
    start = region.find(MAGIC)
    while start >= 0 and start % 16:
        start = region.find(MAGIC, start + 1)
    if start < 0 or len(region) - start < HEADER_SIZE:
        return None
    flags = region[start + 15]
    if not flags & FLAG_INLINE_STRINGS:
        return None  # Go < 1.18: pointers into the data segment, not followed
    got = _string(region, start + HEADER_SIZE)
    if got is None:
        return None
    version, pos = got
    got = _string(region, pos)
    if got is None:
        return None
    info = got[0]
    # The module information is framed by two 16-byte sentinels (cmd/go's infoStart/infoEnd).
    if len(info) >= 33 and info[-17] == 0x0A:
        info = info[16:-16]
    main_path = module = b""
    for line in info.split(b"\n"):
        key, _, rest = line.partition(b"\t")
        if key == b"path" and not main_path:
            main_path = rest
        elif key == b"mod" and not module:
            module = rest.partition(b"\t")[0]
    return GoBuildInfo(_text(version), _text(main_path), _text(module))


def read_buildinfo(read_at: ReadAt, size: int) -> GoBuildInfo | None:
    """Build information of the ELF file behind `read_at`; None for anything else. Never
    raises on the file's content."""
    try:
        region = _buildinfo_region(read_at, size)
        return parse_buildinfo(region) if region else None
    except (struct.error, ValueError, IndexError):
        return None


def go_module(info: GoBuildInfo | None) -> str:
    """What ExecEvent.go_module holds: the main module's path; for a program built outside
    module mode (as Debian builds its Go packages) the main package's path, which starts with
    the module path, so a prefix match on the module finds both."""
    if info is None:
        return ""
    return info.module or info.main_path
