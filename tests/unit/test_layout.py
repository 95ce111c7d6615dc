"""The kernel-record contract: collector/records.py agrees with bpf/include/events.h.

events.h is compiled with the host C compiler into a program that prints every struct's size,
every member's offset and size, every enumerator (record types, error counters) and every flag
value; the member names and C types come from the header's text. Each is compared with the
Python side: the record classes' fields, struct codes and offsets, and the module's REC_*,
ERR_*, *_F_* and size constants. The last tests change a copy of the header (and the Python
side) on purpose and check that each kind of difference is reported.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, NamedTuple

import pytest

from collector import records

ROOT = Path(__file__).resolve().parents[2]
EVENTS_H = ROOT / "bpf/include/events.h"

# Python constants that mirror a C constant of another name; the rest share their C name.
RENAMED = {"LAYOUT_VERSION": "SANDTRACE_LAYOUT_VERSION"}
# C constants sized in the header and mirrored in Python, beyond enumerators and flags.
SIZES = [
    "TASK_COMM_LEN",
    "ARGV_MAX",
    "ARGV_TAIL_MAX",
    "CGROUP_PATH_MAX",
    "UNIX_PATH_MAX",
    "FLOW_PAYLOAD_MAX",
    "DNS_PAYLOAD_MAX",
    "STDIO_FDS",
]
# What a C member's type is in the struct module (byte arrays: "<size>s").
C_TYPE_CODES = {"__u16": "H", "__u32": "I", "__s32": "i", "__u64": "Q"}

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_STRUCT = re.compile(r"^struct (\w+) \{\n(.*?)^\};", re.M | re.S)
_MEMBER = re.compile(r"(struct \w+|__[us]\d+|char) (\w+)(\[\w*\])?;")
_ENUM = re.compile(r"^enum \w+ \{\n(.*?)^\};", re.M | re.S)
_ENUMERATOR = re.compile(r"^\s*(\w+)\s*=", re.M)
_FLAG = re.compile(r"^#define (\w+_F_\w+)\s", re.M)
_PY_CONSTANT = re.compile(r"(REC|ERR|APP)_[A-Z0-9_]+|[A-Z0-9]+_F_[A-Z0-9_]+")


@dataclass
class Member:
    ctype: str  # "__u32", "char", "struct record_header", ...
    name: str
    array: str | None  # None: not an array; "": a flexible array member; else its length


@dataclass
class CHeader:
    """What the header declares (from its text) and what the compiler made of it."""

    structs: dict[str, list[Member]] = field(default_factory=dict)
    constants: list[str] = field(default_factory=list)  # enumerators and flags
    values: dict[str, int] = field(default_factory=dict)  # "<what> <name...>" -> number


def parse_header(text: str) -> CHeader:
    text = _COMMENT.sub("", text)
    header = CHeader()
    for name, body in _STRUCT.findall(text):
        members = []
        for line in filter(None, (ln.strip() for ln in body.splitlines())):
            m = _MEMBER.fullmatch(line)
            assert m, f"struct {name}: cannot read member {line!r}"
            members.append(Member(m[1], m[2], m[3] and m[3][1:-1]))
        header.structs[name] = members
    for body in _ENUM.findall(text):
        header.constants += _ENUMERATOR.findall(body)
    header.constants += _FLAG.findall(text)
    return header


def c_program(header: CHeader) -> str:
    out = ["#include <stdio.h>", "#include <stddef.h>", '#include "events.h"', "int main(void) {"]

    def show(key: str, expr: str) -> None:
        out.append(f'printf("{key} %lld\\n", (long long)({expr}));')

    for struct_name, members in header.structs.items():
        show(f"sizeof {struct_name}", f"sizeof(struct {struct_name})")
        for m in members:
            show(f"offsetof {struct_name} {m.name}", f"offsetof(struct {struct_name}, {m.name})")
            if m.array != "":
                show(
                    f"sizeof {struct_name} {m.name}",
                    f"sizeof(((struct {struct_name} *)0)->{m.name})",
                )
    for name in [*header.constants, *SIZES, *RENAMED.values()]:
        show(f"const {name}", name)
    return "\n".join([*out, "return 0; }"])


def compile_header(path: Path, workdir: Path) -> CHeader:
    """Parse the header at `path` and let the host compiler measure it. -Wpadded turns any
    padding the compiler would add into an error: events.h spells its padding out."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a host C compiler (cc) is needed to check the record layout"
    header = parse_header(path.read_text())
    src = workdir / "layout.c"
    src.write_text(c_program(header))
    exe = workdir / "layout"
    flags = ["-Wall", "-Wpadded", "-Werror", "-DSANDTRACE_HOST_BUILD"]
    subprocess.run([cc, *flags, "-I", str(path.parent), str(src), "-o", str(exe)], check=True)
    for line in subprocess.run(
        [exe], check=True, capture_output=True, text=True
    ).stdout.splitlines():
        key, value = line.rsplit(" ", 1)
        header.values[key] = int(value)
    return header


# -- comparisons: each returns what differs, so the tests below can show each one failing ---


def flat_members(header: CHeader, struct_name: str) -> list[tuple[str, Member]]:
    """(struct the member is measured in, member), nested structs (the header) flattened,
    padding left out. An array of structs (an exec record's stdio) stays one member: bytes
    in Python, whose element struct is compared on its own."""
    out: list[tuple[str, Member]] = []
    for m in header.structs[struct_name]:
        if m.ctype.startswith("struct ") and m.array is None:
            assert header.values[f"offsetof {struct_name} {m.name}"] == 0, f"{m.name} not first"
            out += flat_members(header, m.ctype.removeprefix("struct "))
        elif not m.name.startswith("_pad"):
            out.append((struct_name, m))
    return out


def layout_mismatches(header: CHeader, cls: type[object], struct_name: str) -> list[str]:
    """How the record class `cls` differs from the C struct: members (names, order), their
    types, offsets and sizes, and the struct's size."""
    if struct_name not in header.structs:
        return [f"struct {struct_name} is not in the header"]
    py = records.layout(cls)
    c_members = flat_members(header, struct_name)
    c_names = [m.name for _, m in c_members]
    bad = []
    if c_names != list(py.offsets):
        bad.append(f"{struct_name}: C members {c_names} != {list(py.offsets)} in Python")
    c_size = header.values[f"sizeof {struct_name}"]
    if py.struct.size != c_size:
        bad.append(f"{struct_name}: sizeof {c_size} != {py.struct.size} in Python")
    for where, m in c_members:
        if m.name not in py.offsets:
            continue
        offset = header.values[f"offsetof {where} {m.name}"]
        if where != struct_name:  # a header member: where the header is, plus its offset
            offset += header.values[f"offsetof {struct_name} hdr"]
        if py.offsets[m.name] != offset:
            bad.append(f"{struct_name}.{m.name}: offset {offset} != {py.offsets[m.name]}")
        if m.array == "":
            if m.name in py.codes or not py.variable:
                bad.append(f"{struct_name}.{m.name}: a flexible array, not variable data in Python")
            continue
        size = header.values[f"sizeof {where} {m.name}"]
        code = f"{size}s" if m.array is not None else C_TYPE_CODES.get(m.ctype, "?")
        if py.codes.get(m.name) != code:
            bad.append(
                f"{struct_name}.{m.name}: {m.ctype} is {code!r}, not {py.codes.get(m.name)!r}"
            )
    return bad


def python_constants() -> dict[str, int]:
    """The contract's constants in collector/records.py, by their C names."""
    found = {
        RENAMED.get(name, name): value
        for name, value in vars(records).items()
        if _PY_CONSTANT.fullmatch(name) or name in SIZES or name in RENAMED
    }
    assert all(isinstance(v, int) for v in found.values())
    return found


def constant_mismatches(header: CHeader, python: dict[str, int]) -> list[str]:
    c = {
        name: header.values[f"const {name}"]
        for name in [*header.constants, *SIZES, *RENAMED.values()]
    }
    bad = [f"{n}: C {c[n]} != Python {python[n]}" for n in c if n in python and c[n] != python[n]]
    bad += [f"{n}: in C, not in Python" for n in sorted(c.keys() - python.keys())]
    bad += [f"{n}: in Python, not in C" for n in sorted(python.keys() - c.keys())]
    return bad


def name_table_mismatches(
    python: dict[str, int], record_names: dict[int, str], error_names: dict[int, str]
) -> list[str]:
    """Every record type and error counter has a name to report it by, and the counts (the
    sizes of the kernel's lost and errors maps) cover exactly them."""
    types = {
        v
        for n, v in python.items()
        if n.startswith("REC_") and n not in ("REC_UNDEFINED", "REC_MAX")
    }
    errors = {v for n, v in python.items() if n.startswith("ERR_") and n != "ERR_MAX"}
    bad = []
    decoded = set(records.RECORD_CLASSES)
    if set(record_names) != types or decoded != types:
        named = sorted(record_names)
        bad.append(f"record types {sorted(types)}: named {named}, decoded {sorted(decoded)}")
    if set(error_names) != errors:
        bad.append(f"error counters {sorted(errors)}: named {sorted(error_names)}")
    if (
        python.get("REC_MAX") != max(types | {0}) + 1
        or python.get("ERR_MAX") != max(errors | {-1}) + 1
    ):
        bad.append("REC_MAX and ERR_MAX must count the values before them")
    return bad


# -- the real header against the real Python side --------------------------------------------


@pytest.fixture(scope="module")
def c_header(tmp_path_factory: pytest.TempPathFactory) -> CHeader:
    return compile_header(EVENTS_H, tmp_path_factory.mktemp("layout"))


@pytest.mark.parametrize("cls", list(records.C_STRUCTS), ids=lambda c: records.C_STRUCTS[c])
def test_record_class_matches_c(
    c_header: CHeader, cls: type[records.Header | records.AnyRecord]
) -> None:
    assert layout_mismatches(c_header, cls, records.C_STRUCTS[cls]) == []
    layout = records.layout(cls)
    assert list(layout.offsets) == list(cls._fields)  # the decoder fills fields in this order
    assert layout.struct.size % 8 == 0


def test_every_c_record_struct_has_a_class(c_header: CHeader) -> None:
    assert set(c_header.structs) == set(records.C_STRUCTS.values())
    assert records.layout(records.Header).struct.size == 80


def test_constants_match_c(c_header: CHeader) -> None:
    assert constant_mismatches(c_header, python_constants()) == []


def test_every_record_type_and_error_is_named() -> None:
    assert (
        name_table_mismatches(python_constants(), records.RECORD_NAMES, records.ERROR_NAMES) == []
    )


# -- each comparison fails when the two sides differ -----------------------------------------

MUTATIONS = [
    # (change to events.h, what the comparisons must then report)
    (("REC_BIND = 6", "REC_BIND = 9"), "REC_BIND: C 9 != Python 6"),
    (("ERR_SCRATCH = 2,", "ERR_SCRATCH = 2,\n\tERR_NEW = 3,"), "ERR_NEW: in C, not in Python"),
    (
        ("#define EXEC_F_MEMFD (1U << 4)", "#define EXEC_F_MEMFD (1U << 7)"),
        "EXEC_F_MEMFD: C 128 != Python 16",
    ),
    (("#define BIND_F_FAILED", "#define BIND_F_GONE"), "BIND_F_FAILED: in Python, not in C"),
    (
        ("#define SANDTRACE_LAYOUT_VERSION 7", "#define SANDTRACE_LAYOUT_VERSION 8"),
        "SANDTRACE_LAYOUT_VERSION: C 8",
    ),
    (
        ("#define CGROUP_PATH_MAX 256", "#define CGROUP_PATH_MAX 128"),
        "cgroup_move_record.dst_path: char is '128s'",
    ),
    (
        ("\t__u16 dport; /* host byte order */\n\t__u16 sport;", "\t__u16 sport;\n\t__u16 dport;"),
        "connect_record: C members",
    ),
    (("__u32 exit_code;", "__s32 exit_code;"), "exit_record.exit_code: __s32 is 'i', not 'I'"),
    (
        ("#define STDIO_FDS 3", "#define STDIO_FDS 4"),
        "exec_record.stdio: struct stdio_fd is '192s'",
    ),
    (
        ("\t__u16 protocol;\n\t__u16 port;", "\t__u16 port;\n\t__u16 protocol;"),
        "stdio_fd: C members",
    ),
    (
        (
            "\t__u32 old_tid; /* thread that called execve, before de_thread */\n",
            "\t__u32 old_tid;\n\t__u32 more;\n\t__u32 _pad9;\n",
        ),
        "exec_record: sizeof 296",
    ),
    (
        (
            "\t__u32 _pad0;\n\tchar comm[TASK_COMM_LEN];",
            "\tchar comm[TASK_COMM_LEN];\n\t__u32 _pad0;",
        ),
        "record_header.comm: offset 60 != 64",
    ),
]


@pytest.mark.parametrize(
    ("change", "expected"), MUTATIONS, ids=[m[1].split(":")[0] for m in MUTATIONS]
)
def test_a_difference_in_the_header_is_reported(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    old, new = change
    text = EVENTS_H.read_text()
    assert old in text, f"the mutation no longer applies to events.h: {old!r}"
    (tmp_path / "events.h").write_text(text.replace(old, new, 1))
    header = compile_header(tmp_path / "events.h", tmp_path)
    python = python_constants()
    found = constant_mismatches(header, python)
    for cls, struct_name in records.C_STRUCTS.items():
        found += layout_mismatches(header, cls, struct_name)
    assert any(expected in f for f in found), found


def test_implicit_padding_in_the_header_is_refused(tmp_path: Path) -> None:
    text = EVENTS_H.read_text().replace("\t__u32 _pad0;\n\tchar comm", "\tchar comm", 1)
    (tmp_path / "events.h").write_text(
        text.replace("char comm[TASK_COMM_LEN];", "char comm[TASK_COMM_LEN];\n\t__u64 x;", 1)
    )
    with pytest.raises(subprocess.CalledProcessError):
        compile_header(tmp_path / "events.h", tmp_path)


def test_a_difference_in_python_is_reported(c_header: CHeader) -> None:
    class ExitRecord(NamedTuple):  # the real one with exit_code's type and a field changed
        type: records.U16
        version: records.U16
        size: records.U32
        ktime_ns: records.U64
        cgroup_id: records.U64
        start_ns: records.U64
        pid: records.U32
        tid: records.U32
        ns_pid: records.U32
        ppid: records.U32
        uid: records.U32
        gid: records.U32
        sandbox: records.U32
        comm: records.Comm
        exit_code: records.S32
        extra: Annotated[bytes, "8s"]

    found = layout_mismatches(c_header, ExitRecord, "exit_record")
    assert any("C members" in f for f in found), found
    assert any("exit_code: __u32 is 'I', not 'i'" in f for f in found), found
    assert any("sizeof 88 != 96" in f for f in found), found

    constants = python_constants()
    assert constant_mismatches(c_header, {**constants, "SOCK_F_NONBLOCK": 4}) == [
        "SOCK_F_NONBLOCK: C 1 != Python 4"
    ]
    assert constant_mismatches(c_header, {**constants, "REC_NEW": 8}) == [
        "REC_NEW: in Python, not in C"
    ]
    errors = dict(records.ERROR_NAMES)
    del errors[records.ERR_SCRATCH]
    assert name_table_mismatches(constants, records.RECORD_NAMES, errors) == [
        "error counters [0, 1, 2]: named [0, 1]"
    ]
    assert name_table_mismatches(
        {**constants, "ERR_MAX": 4}, records.RECORD_NAMES, records.ERROR_NAMES
    ) == ["REC_MAX and ERR_MAX must count the values before them"]


def test_the_loader_flags_a_repeats_report_as_events_h_does() -> None:
    from probes import loader  # noqa: PLC0415

    assert loader._SOCK_F_REPEATS_ONLY == records.SOCK_F_REPEATS_ONLY
