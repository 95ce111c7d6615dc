"""Kernel struct offsets read from the running kernel's BTF (/sys/kernel/btf/vmlinux).

BCC compiles the probes against whatever kernel headers are installed, and on hosts where
those headers belong to another kernel every struct field read through them is wrong. The
probes therefore never dereference kernel structs by header layout: the few offsets they
need are looked up here, in the running kernel's own type information, and passed to the
compiler as ``-D`` constants.

This module is pure Python (no BCC, no root) so that it is tested anywhere.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_MEMBER = struct.Struct("<III")

KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

# Bytes that follow the common 12-byte type record, per kind: (fixed, per vlen item).
_TRAILER = {
    KIND_INT: (4, 0),
    KIND_ARRAY: (12, 0),
    KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),
    KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0),
    KIND_DATASEC: (0, 12),
    KIND_DECL_TAG: (4, 0),
    KIND_ENUM64: (0, 12),
}
_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}


class BTFError(Exception):
    """The BTF data is missing, malformed, or lacks a type or member the probes need."""


@dataclass(frozen=True, slots=True)
class _Type:
    kind: int
    name: str
    size_or_type: int
    vlen: int
    kind_flag: bool
    body: int  # offset of the trailer in the type section


class BTF:
    """A parsed BTF blob: enough to answer "where is member X of struct Y"."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BTFError("BTF data is shorter than its header")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = (
            _HEADER.unpack_from(data, 0)
        )
        if magic != _MAGIC:
            raise BTFError(f"not BTF data (magic {magic:#x}, expected {_MAGIC:#x})")
        self._types_blob = memoryview(data)[hdr_len + type_off : hdr_len + type_off + type_len]
        self._strings = bytes(data[hdr_len + str_off : hdr_len + str_off + str_len])
        self._types: list[_Type | None] = [None]  # type id 0 is void
        self._by_name: dict[str, list[int]] = {}
        self._enums: dict[str, list[int]] = {}
        self._parse()

    @classmethod
    def from_file(cls, path: Path = VMLINUX_BTF) -> BTF:
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            raise BTFError(
                f"{path} does not exist: this kernel was built without BTF "
                "(CONFIG_DEBUG_INFO_BTF); sandtrace needs it to read struct offsets"
            ) from None

    def _str(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode("ascii", "replace")

    def _parse(self) -> None:
        blob = self._types_blob
        pos = 0
        while pos < len(blob):
            name_off, info, size_or_type = _TYPE.unpack_from(blob, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            body = pos + _TYPE.size
            fixed, per_item = _TRAILER.get(kind, (0, 0))
            pos = body + fixed + per_item * vlen
            type_id = len(self._types)
            name = self._str(name_off) if name_off else ""
            self._types.append(_Type(kind, name, size_or_type, vlen, bool(info >> 31), body))
            if name and kind in (KIND_STRUCT, KIND_UNION):
                self._by_name.setdefault(name, []).append(type_id)
            elif name and kind in (KIND_ENUM, KIND_ENUM64):
                self._enums.setdefault(name, []).append(type_id)

    def _resolve(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        for _ in range(64):
            t = self._types[type_id]
            if t is None or t.kind not in _MODIFIERS:
                return type_id
            type_id = t.size_or_type
        raise BTFError(f"type {type_id}: qualifier chain too long")

    def _struct(self, name: str) -> int:
        ids = self._by_name.get(name)
        if not ids:
            raise BTFError(f"struct {name} is not in the kernel's BTF")
        # Prefer a complete definition with members over an empty duplicate.
        return max(ids, key=lambda i: self._types[i].vlen)  # type: ignore[union-attr]

    def _members(self, type_id: int) -> list[tuple[str, int, int]]:
        t = self._types[type_id]
        if t is None:
            raise BTFError(f"type {type_id} has no members")
        out = []
        for i in range(t.vlen):
            name_off, mtype, moff = _MEMBER.unpack_from(self._types_blob, t.body + i * 12)
            bit_off = moff & 0xFFFFFF if t.kind_flag else moff
            out.append((self._str(name_off) if name_off else "", mtype, bit_off))
        return out

    def _find_member(self, type_id: int, member: str) -> tuple[int, int] | None:
        """(byte offset, member type id) of ``member``, looking through anonymous members."""
        for name, mtype, bit_off in self._members(type_id):
            if name == member:
                if bit_off % 8:
                    raise BTFError(f"member {member} is a bitfield")
                return bit_off // 8, mtype
            if not name:
                inner = self._resolve(mtype)
                t = self._types[inner]
                if t is not None and t.kind in (KIND_STRUCT, KIND_UNION):
                    found = self._find_member(inner, member)
                    if found is not None:
                        return bit_off // 8 + found[0], found[1]
        return None

    def offsetof(self, struct_name: str, path: str) -> int:
        """Byte offset of a (dotted) member path, e.g. ``offsetof("file", "f_path.dentry")``."""
        type_id = self._struct(struct_name)
        total = 0
        for part in path.split("."):
            t = self._types[type_id]
            if t is None or t.kind not in (KIND_STRUCT, KIND_UNION):
                raise BTFError(f"{struct_name}.{path}: {part!r} is not inside a struct")
            found = self._find_member(type_id, part)
            if found is None:
                raise BTFError(f"struct {struct_name} has no member {path}")
            total += found[0]
            type_id = self._resolve(found[1])
        return total

    def sizeof(self, struct_name: str) -> int:
        t = self._types[self._struct(struct_name)]
        if t is None:
            raise BTFError(f"struct {struct_name} has no type entry")
        return t.size_or_type

    def enum_values(self, enum_name: str) -> dict[str, int]:
        """The enumerators of a named enum (``bpf_attach_type``) and their values; empty when
        the kernel has no such enum."""
        out: dict[str, int] = {}
        for type_id in self._enums.get(enum_name, []):
            t = self._types[type_id]
            if t is None:
                continue
            signed = t.kind_flag
            for i in range(t.vlen):
                if t.kind == KIND_ENUM:
                    name_off, value = struct.unpack_from(
                        "<Ii" if signed else "<II", self._types_blob, t.body + i * 8
                    )
                else:
                    name_off, lo, hi = struct.unpack_from("<III", self._types_blob, t.body + i * 12)
                    value = hi << 32 | lo
                out[self._str(name_off)] = value
        return out

    def _find_bits(self, type_id: int, member: str) -> tuple[int, int, int] | None:
        """(bit offset, member type id, bitfield width or 0) of ``member``, looking through
        anonymous members."""
        t = self._types[type_id]
        for i, (name, mtype, bit_off) in enumerate(self._members(type_id)):
            if name == member:
                width = 0
                if t is not None and t.kind_flag:
                    raw = _MEMBER.unpack_from(self._types_blob, t.body + i * 12)[2]
                    width = raw >> 24
                return bit_off, mtype, width
            if not name:
                inner = self._resolve(mtype)
                it = self._types[inner]
                if it is not None and it.kind in (KIND_STRUCT, KIND_UNION):
                    found = self._find_bits(inner, member)
                    if found is not None:
                        return bit_off + found[0], found[1], found[2]
        return None

    def bits_of(self, struct_name: str, member: str) -> tuple[int, int, bool]:
        """(bit offset, width in bits, whether it is a bitfield) of an integer member of a
        struct: a member that is a plain integer on one kernel is a bitfield on another
        (``sock.sk_protocol`` was 8 bits of a word before Linux 5.6)."""
        type_id = self._struct(struct_name)
        found = self._find_bits(type_id, member)
        if found is None:
            raise BTFError(f"struct {struct_name} has no member {member}")
        bit_off, mtype, width = found
        t = self._types[self._resolve(mtype)]
        if t is None or t.kind not in (KIND_INT, KIND_ENUM):
            raise BTFError(f"{struct_name}.{member} is not an integer")
        if width:
            return bit_off, width, True
        if t.kind == KIND_INT:
            (enc,) = struct.unpack_from("<I", self._types_blob, t.body)
            bits, extra = enc & 0xFF, (enc >> 16) & 0xFF
            return bit_off + extra, bits, bits != t.size_or_type * 8 or extra != 0
        return bit_off, t.size_or_type * 8, False

    def has_member(self, struct_name: str, path: str) -> bool:
        try:
            self.offsetof(struct_name, path)
        except BTFError:
            return False
        return True


# Every offset the probes use: macro name -> (struct, member path). The C side lists the
# same names in bpf/include/kernel_read.h, which refuses to compile if one is missing.
OFFSETS: dict[str, tuple[str, str]] = {
    "OFF_TASK_PID": ("task_struct", "pid"),
    "OFF_TASK_TGID": ("task_struct", "tgid"),
    "OFF_TASK_REAL_PARENT": ("task_struct", "real_parent"),
    "OFF_TASK_GROUP_LEADER": ("task_struct", "group_leader"),
    "OFF_TASK_START_TIME": ("task_struct", "start_time"),
    "OFF_TASK_EXIT_CODE": ("task_struct", "exit_code"),
    "OFF_TASK_MM": ("task_struct", "mm"),
    "OFF_TASK_FS": ("task_struct", "fs"),
    "OFF_TASK_THREAD_PID": ("task_struct", "thread_pid"),
    "OFF_PID_LEVEL": ("pid", "level"),
    "OFF_PID_NUMBERS": ("pid", "numbers"),
    "OFF_UPID_NR": ("upid", "nr"),
    "OFF_MM_ARG_START": ("mm_struct", "arg_start"),
    "OFF_MM_ARG_END": ("mm_struct", "arg_end"),
    "OFF_MM_EXE_FILE": ("mm_struct", "exe_file"),
    "OFF_FS_PWD": ("fs_struct", "pwd"),
    "OFF_PATH_MNT": ("path", "mnt"),
    "OFF_PATH_DENTRY": ("path", "dentry"),
    "OFF_FILE_F_PATH": ("file", "f_path"),
    "OFF_FILE_F_INODE": ("file", "f_inode"),
    "OFF_FILE_F_FLAGS": ("file", "f_flags"),
    "OFF_INODE_I_INO": ("inode", "i_ino"),
    "OFF_INODE_I_NLINK": ("inode", "__i_nlink"),
    "OFF_DENTRY_D_PARENT": ("dentry", "d_parent"),
    "OFF_DENTRY_D_NAME_NAME": ("dentry", "d_name.name"),
    "OFF_VFSMOUNT_MNT_ROOT": ("vfsmount", "mnt_root"),
    "OFF_MOUNT_MNT": ("mount", "mnt"),
    "OFF_MOUNT_MNT_PARENT": ("mount", "mnt_parent"),
    "OFF_MOUNT_MNT_MOUNTPOINT": ("mount", "mnt_mountpoint"),
    "OFF_SOCK_SK_SOCKET": ("sock", "sk_socket"),
    "OFF_SOCK_SK_ERR": ("sock", "sk_err"),
    "OFF_SOCKET_FILE": ("socket", "file"),
    "OFF_SOCKET_TYPE": ("socket", "type"),
}

SIZES: dict[str, str] = {"SIZE_UPID": "upid"}

# Offsets only the optional hooks use, per OPTIONAL_HOOKS attach type (probes/kernel.py):
# kernels without the hook may lack the member too.
OPTIONAL_OFFSETS: dict[str, dict[str, tuple[str, str]]] = {
    "BPF_CGROUP_UNIX_CONNECT": {
        "OFF_SOCK_ADDR_KERN_UADDR": ("bpf_sock_addr_kern", "uaddr"),
        "OFF_SOCK_ADDR_KERN_UADDRLEN": ("bpf_sock_addr_kern", "uaddrlen"),
    },
}


# The kprobe on packet_create (bpf/packet_socket.bpf.c) reads its arguments 2 to 4 from the
# struct pt_regs it gets: the calling convention's argument registers, per machine.
KPROBE_ARG_REGISTERS: dict[str, tuple[str, ...]] = {"x86_64": ("di", "si", "dx", "cx")}


def kprobe_arg_offsets(btf: BTF, machine: str) -> dict[str, int]:
    """OFF_PT_REGS_ARG1.. (offsets in struct pt_regs of a function's first arguments) for
    `machine` (platform.machine()); BTFError when it is not known how to read them."""
    registers = KPROBE_ARG_REGISTERS.get(machine)
    if registers is None:
        raise BTFError(f"function arguments are not read from kprobes on {machine}")
    return {f"OFF_PT_REGS_ARG{i}": btf.offsetof("pt_regs", r) for i, r in enumerate(registers, 1)}


def kernel_offsets(btf: BTF) -> dict[str, int]:
    """Resolve every offset and size the probes need; raise BTFError naming any that is missing."""
    out = {macro: btf.offsetof(s, member) for macro, (s, member) in OFFSETS.items()}
    out.update({macro: btf.sizeof(s) for macro, s in SIZES.items()})
    return out


def optional_offsets(btf: BTF, hook: str) -> dict[str, int]:
    """The offsets optional hook `hook` needs (OPTIONAL_OFFSETS); BTFError when one is
    missing."""
    return {m: btf.offsetof(s, member) for m, (s, member) in OPTIONAL_OFFSETS.get(hook, {}).items()}


# What the exec probe reads to describe a process's standard streams (bpf/process.bpf.c).
# A kernel that lacks one of them gets no stdio capture: the collector reads /proc instead.
STDIO_OFFSETS: dict[str, tuple[str, str]] = {
    "OFF_TASK_FILES": ("task_struct", "files"),
    "OFF_FILES_FDT": ("files_struct", "fdt"),
    "OFF_FDTABLE_MAX_FDS": ("fdtable", "max_fds"),
    "OFF_FDTABLE_FD": ("fdtable", "fd"),
    "OFF_FILE_PRIVATE_DATA": ("file", "private_data"),
    "OFF_DENTRY_D_OP": ("dentry", "d_op"),
    "OFF_DENTRY_OPS_D_DNAME": ("dentry_operations", "d_dname"),
    "OFF_INODE_I_MODE": ("inode", "i_mode"),
    "OFF_INODE_I_RDEV": ("inode", "i_rdev"),
    "OFF_SOCKET_SK": ("socket", "sk"),
    "OFF_SOCK_FAMILY": ("sock", "__sk_common.skc_family"),
    "OFF_SOCK_DADDR": ("sock", "__sk_common.skc_daddr"),
    "OFF_SOCK_DPORT": ("sock", "__sk_common.skc_dport"),
    "OFF_SOCK_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr"),
    "OFF_UNIX_SOCK_ADDR": ("unix_sock", "addr"),
    "OFF_UNIX_SOCK_PEER": ("unix_sock", "peer"),
    "OFF_UNIX_ADDRESS_LEN": ("unix_address", "len"),
    "OFF_UNIX_ADDRESS_NAME": ("unix_address", "name"),
    "OFF_SOCKADDR_UN_PATH": ("sockaddr_un", "sun_path"),
}
# Integer members read as (32-bit word, shift, mask): a bitfield on some kernels.
STDIO_BITS: dict[str, tuple[str, str]] = {
    "SOCK_TYPE": ("sock", "sk_type"),
    "SOCK_PROTOCOL": ("sock", "sk_protocol"),
}


@dataclass(frozen=True, slots=True)
class StdioOffsets:
    """The -D flags of the in-kernel stdio capture, and how sk_protocol was found."""

    flags: dict[str, int]
    protocol_layout: str  # said at startup: "a 16-bit member", "an 8-bit bitfield"


def word_bits(bit_off: int, width: int) -> tuple[int, int, int]:
    """(byte offset of the aligned 32-bit word, shift, mask) that reads an integer of
    `width` bits at `bit_off` (little-endian bit numbering, as BTF gives it)."""
    word = bit_off // 32
    shift = bit_off - word * 32
    if shift + width > 32:
        raise BTFError(f"a {width}-bit member at bit {bit_off} spans two 32-bit words")
    return word * 4, shift, (1 << width) - 1


def stdio_offsets(btf: BTF) -> StdioOffsets:
    """Everything the in-kernel stdio capture needs; BTFError naming what is missing."""
    flags = {macro: btf.offsetof(s, member) for macro, (s, member) in STDIO_OFFSETS.items()}
    layouts = {}
    for name, (s, member) in STDIO_BITS.items():
        bit_off, width, bitfield = btf.bits_of(s, member)
        word, shift, mask = word_bits(bit_off, width)
        flags |= {f"WORD_{name}": word, f"SHIFT_{name}": shift, f"MASK_{name}": mask}
        layouts[member] = f"a {width}-bit {'bitfield' if bitfield else 'member'}"
    return StdioOffsets(flags, layouts["sk_protocol"])


# What the exec probe reads of the executed file's version, as stat(2) tells it (device,
# change time, size), so that the collector's identity cache needs no system call per exec.
# A kernel that lacks one gets no file key: the collector then stats the file per exec.
EXE_FILE_OFFSETS: dict[str, tuple[str, str]] = {
    "OFF_INODE_I_SB": ("inode", "i_sb"),
    "OFF_SUPER_BLOCK_S_DEV": ("super_block", "s_dev"),
    "OFF_INODE_I_SIZE": ("inode", "i_size"),
}
# The inode's change time (seconds, nanoseconds) as kernels have named it: Linux 6.11 on,
# 6.6 to 6.10, and before.
CTIME_MEMBERS = [
    ("i_ctime_sec", "i_ctime_nsec"),
    ("__i_ctime.tv_sec", "__i_ctime.tv_nsec"),
    ("i_ctime.tv_sec", "i_ctime.tv_nsec"),
]


def exe_file_offsets(btf: BTF) -> dict[str, int]:
    """The offsets the exec probe's file key needs (EXE_FILE_OFFSETS and the change time
    under whichever name this kernel gives it); BTFError naming what is missing."""
    flags = {macro: btf.offsetof(s, member) for macro, (s, member) in EXE_FILE_OFFSETS.items()}
    for sec, nsec in CTIME_MEMBERS:
        if btf.has_member("inode", sec) and btf.has_member("inode", nsec):
            flags["OFF_INODE_I_CTIME_SEC"] = btf.offsetof("inode", sec)
            flags["OFF_INODE_I_CTIME_NSEC"] = btf.offsetof("inode", nsec)
            return flags
    raise BTFError("struct inode has no change time this probe knows (i_ctime_sec, i_ctime)")
