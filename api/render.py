"""Turn typed events into text for a terminal and JSON lines for machines.

Everything a traced process controls (argv, paths, comm, cgroup names) is untrusted: it goes
through escape() before it reaches a terminal, so no process can write ESC, a control
sequence, or a bidi override into an operator's terminal. Printable ASCII passes except the
backslash (shown as ``\\\\``); ``\\n`` ``\\t`` ``\\r`` keep their C names; other C0 controls,
DEL, C1 controls and bytes that are not valid UTF-8 become ``\\xNN``; printable non-ASCII
text passes; format and bidi controls, line and paragraph separators, non-ASCII spaces and
anything else str.isprintable() rejects become ``\\u{XXXX}`` (lowercase hex). A str that
carries surrogate escapes (U+DC80..U+DCFF, from decoding with "surrogateescape") is shown
as the bytes they stand for. The text output is for people: it is not reversible.

Widths are terminal columns. A character counts one column, or two when Unicode calls it
wide (East Asian W/F); zero-width marks are counted as one, so a string never takes more
columns, nor more characters, than its budget. Truncation ends with "…" and never cuts an
escape such as ``\\x1b`` in half.

JSON lines (json_line) are lossless for bytes: every bytes field of an event (see
api/events.py) is written as "escaped text" (api.events.bytes_text: valid UTF-8 as itself, a
backslash as ``\\\\``, each invalid byte as ``\\xNN``) and the object is dumped with
``ensure_ascii=True``, so no raw control character or newline appears in a line and every
JSON parser reads it. A reader gets the original bytes back with bytes_from_json()
(api.events.text_bytes). Fields that are str in events.py are dumped as they are; read them as text.
"""

from __future__ import annotations

import json
import os
import re
import signal
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, tzinfo
from itertools import chain
from typing import IO, Any

from api.events import (
    Alert,
    AnyEvent,
    BindEvent,
    CgroupMoveEvent,
    ConnectEvent,
    DnsEvent,
    Event,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    IoUringEvent,
    ListenEvent,
    LostEvent,
    RawSocketEvent,
    ResponseEvent,
    SocketEvent,
    bytes_text,
    text_bytes,
    to_dict,
)

ELLIPSIS = "…"

_C_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
# Printable ASCII but the backslash: text made only of these shows as it is, one atom and
# one column per character (the common case, taken without a call per character).
_PLAIN_TEXT = re.compile(r"[\x20-\x5b\x5d-\x7e]*")
_PLAIN_BYTES = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")
# Characters an argument may hold and still be shown without quotes (as shlex.quote, plus
# Unicode letters and digits). Anything else, escapes included, gets the argument quoted.
_UNSAFE_IN_ARG = re.compile(r"[^\w@%+=:,./-]")

_TIME_WIDTH = 12  # HH:MM:SS.mmm
_HOST_WIDTH = 12
_KIND_WIDTH = 7  # "connect"
_PID_WIDTH = 7  # pid_max is at most 4194304
_COMM_WIDTH = 16

# Short names for the kind column; a kind not listed is shown as it is (escaped).
_KIND_LABELS = {
    "cgroup_move": "move",
    "raw_socket": "raw",
    "io_uring": "uring",
    "response": "respond",
}

# SGR parameters. Only TextRenderer(color=True) ever emits them.
_KIND_STYLES = {
    "exec": "32",  # green
    "fork": "2",  # dim
    "exit": "2",
    "connect": "36",  # cyan
    "bind": "33",  # yellow
    "listen": "33",
    "socket": "34",  # blue
    "cgroup_move": "35",  # magenta
    "raw_socket": "1;35",  # bold magenta
    "io_uring": "35",
    "lost": "1;31",  # bold red
    "response": "1;31",
}
_MARKER_STYLE = "1;33"  # bold yellow: [memfd], [deleted], left sandbox
_ERROR_STYLE = "31"
_HEADER_STYLE = "1"
# Alerts stand out between events: reverse video, coloured by level.
_ALERT_STYLES = {
    "critical": "1;7;31",
    "high": "1;7;31",
    "medium": "1;7;33",
    "low": "1;7;36",
    "informational": "1;7",
}

# The order of kinds in the totals line; kinds not listed follow, sorted.
_TOTALS_ORDER = (
    "exec",
    "fork",
    "exit",
    "connect",
    "bind",
    "listen",
    "socket",
    "cgroup_move",
)


# --- escaping ------------------------------------------------------------------------------


def _escape_char(ch: str) -> str:
    cp = ord(ch)
    if 0x20 <= cp < 0x7F:
        return "\\\\" if ch == "\\" else ch
    if ch in _C_ESCAPES:
        return _C_ESCAPES[ch]
    if cp < 0x20 or 0x7F <= cp <= 0x9F:  # C0, DEL, C1
        return f"\\x{cp:02x}"
    if 0xDC80 <= cp <= 0xDCFF:  # a byte that was not valid UTF-8 (surrogateescape)
        return f"\\x{cp - 0xDC00:02x}"
    # isprintable() is False for Cc, Cf (bidi controls, ZWSP, BOM), Cs, Co, Cn, Zl, Zp and
    # every Zs but the ASCII space, which is exactly what must not reach a terminal raw.
    if ch.isprintable():
        return ch
    return f"\\u{{{cp:04x}}}"


def _atoms(value: bytes | str) -> list[str]:
    """Escaped pieces of value, each indivisible when truncating (a char or an escape)."""
    if isinstance(value, bytes):
        if _PLAIN_BYTES.fullmatch(value):
            return list(value.decode("ascii"))
        text = value.decode("utf-8", "surrogateescape")
    elif _PLAIN_TEXT.fullmatch(value):
        return list(value)
    else:
        text = value
    return [_escape_char(ch) for ch in text]


def _columns(atom: str) -> int:
    if atom.isascii():  # no ASCII character is wide
        return len(atom)
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in atom)


def _fit(atoms: Sequence[str], limit: int) -> tuple[list[str], bool]:
    """The atoms that fit in limit columns, ending with … when some had to go."""
    if limit < 0:
        raise ValueError(f"width limit must not be negative, not {limit}")
    ascii_only = "".join(atoms).isascii()  # then each atom is as wide as it is long
    widths = list(map(len, atoms)) if ascii_only else [_columns(a) for a in atoms]
    if sum(widths) <= limit:
        return list(atoms), False
    if limit == 0:
        return [], True
    kept: list[str] = []
    used = 0
    for atom, width in zip(atoms, widths, strict=True):
        if used + width > limit - 1:
            break
        kept.append(atom)
        used += width
    kept.append(ELLIPSIS)
    return kept, True


def escape(value: bytes | str, limit: int | None = None) -> str:
    """Untrusted bytes or text made safe to print on a terminal (see the module docstring).

    With limit, the result takes at most that many columns, ending with … when cut.
    """
    atoms = _atoms(value)
    if limit is not None:
        atoms, _ = _fit(atoms, limit)
    return "".join(atoms)


def _quoted_atoms(arg: bytes | str, limit: int | None = None) -> list[str]:
    """arg's atoms, quoted unless it is non-empty and all safe. With limit, an arg far longer
    than limit columns has only its head escaped, more than limit columns' worth (at most 4
    bytes a character), so that a huge argv costs a line no more than a short one."""
    if limit is None or len(arg) <= 4 * limit + 8:
        atoms = _atoms(arg)
        unsafe = not atoms or _UNSAFE_IN_ARG.search("".join(atoms)) is not None
    else:
        atoms = _atoms(arg[: 4 * limit + 8])
        # The same answer as for the whole arg's atoms: a character that escape() changes
        # is unsafe itself, and its escape holds a backslash, which is unsafe too.
        text = arg.decode("utf-8", "surrogateescape") if isinstance(arg, bytes) else arg
        unsafe = _UNSAFE_IN_ARG.search(text) is not None
    if not unsafe:
        return atoms
    # Inside the quotes a quote shows as \' ; since a real backslash shows as \\ this cannot
    # be mistaken for anything else.
    return ["'", *("\\'" if a == "'" else a for a in atoms), "'"]


def _argv_atoms(argv: Iterable[bytes | str], limit: int | None = None) -> list[str]:
    """argv's atoms, shell-like. With limit, they end once they take more than limit columns
    (after an argument, never on a space): a line of at most limit columns shows the same."""
    atoms: list[str] = []
    used = 0
    for i, arg in enumerate(argv):
        if i:
            atoms.append(" ")
            used += 1
        quoted = _quoted_atoms(arg, limit)
        atoms.extend(quoted)
        if limit is not None:
            used += _width(quoted)
            if used > limit:
                break
    return atoms


def format_argv(argv: list[bytes]) -> str:
    """argv for display, shell-like: each argument escaped, and single-quoted when it is
    empty or holds spaces, quotes or shell metacharacters (an empty argument shows as '')."""
    return "".join(_argv_atoms(argv))


# --- terminal lines ------------------------------------------------------------------------

# A line is built as segments (SGR style or "", indivisible atoms), so it can be cut to the
# width by columns first and coloured afterwards: colour codes never count, never get cut.
_Segment = tuple[str, list[str]]


def _plain(text: str, style: str = "") -> _Segment:
    return (style, list(text))


def _width(atoms: list[str]) -> int:
    """The columns atoms take."""
    text = "".join(atoms)
    return len(text) if text.isascii() else sum(_columns(a) for a in atoms)


def _padded(atoms: list[str], width: int) -> list[str]:
    return atoms + [" "] * (width - _width(atoms))


def _cell(value: bytes | str, width: int) -> list[str]:
    """value escaped, cut and padded to exactly width columns."""
    atoms, _ = _fit(_atoms(value), width)
    return _padded(atoms, width)


def _host_port(addr: str, port: int) -> list[str]:
    atoms = _atoms(addr)
    if ":" in addr:
        atoms = ["[", *atoms, "]"]
    return [*atoms, *f":{port}"]


def _signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return "?"


class TextRenderer:
    """One line per event for a terminal, at most width columns (colour codes not counted;
    width None: lines are never cut, for output that is not a terminal).

    Columns: time (local, or tz), [host,] kind, pid, comm, then the detail of the event,
    which is the field cut with … when the line is too long. An alert takes two lines: what
    matched (level, rule title and rule id), then, indented, what the process did (where it
    connected or listened) and its command line, the facts an analyst acts on.
    """

    def __init__(
        self,
        color: bool,
        width: int | None = 80,
        show_host: bool = False,
        *,
        tz: tzinfo | None = None,
    ) -> None:
        if width is not None and width < 1:
            raise ValueError(f"line width must be at least 1, not {width}")
        self.color = color
        self.width = width
        self.show_host = show_host
        self.tz = tz  # None: the local time zone
        self._second: tuple[int, tzinfo | None] | None = None  # (seconds, tz) of _hms
        self._hms = ""

    def header(self) -> str:
        """The column header line."""
        fields = [f"{'TIME':<{_TIME_WIDTH}}"]
        if self.show_host:
            fields.append(f"{'HOST':<{_HOST_WIDTH}}")
        fields += [
            f"{'KIND':<{_KIND_WIDTH}}",
            f"{'PID':<{_PID_WIDTH}}",
            f"{'COMM':<{_COMM_WIDTH}}",
            "DETAIL",
        ]
        return self._finish([_plain(" ".join(fields), _HEADER_STYLE)])

    def line(self, event: AnyEvent) -> str:
        """The one line that shows event."""
        style = _KIND_STYLES.get(event.kind, "")
        segments: list[_Segment] = [_plain(self._time(event.time_ns) + " ")]
        if self.show_host:
            segments.append(("", [*_cell(event.host, _HOST_WIDTH), " "]))
        kind, _ = _fit(_atoms(_KIND_LABELS.get(event.kind, event.kind)), _KIND_WIDTH)
        segments.append((style, kind))  # coloured, its padding not
        segments.append(("", _padded(kind, _KIND_WIDTH)[len(kind) :]))
        if isinstance(event, LostEvent):  # no pid or comm: its detail takes their place
            segments.append(_plain(" "))
            segments.append(_plain(_lost_detail(event), style))
            return self._finish(segments)
        segments.append(_plain(f" {event.process.pid:<{_PID_WIDTH}} "))
        segments.append(("", [*_cell(event.process.comm, _COMM_WIDTH), " "]))
        segments += _detail(event, self.width)
        return self._finish(segments)

    def alert_line(self, alert: Alert) -> str:
        """The lines (one, or two joined by a newline) that show an alert, highlighted on a
        colour terminal: level, rule title and rule id; then, indented under the kind
        column, the destinations of its events and the acting process's command line."""
        style = _ALERT_STYLES.get(alert.level, "1;7")
        segments: list[_Segment] = [_plain(self._time(alert.time_ns) + " ")]
        if self.show_host:
            segments.append(("", [*_cell(alert.host, _HOST_WIDTH), " "]))
        label = "ALERT" if not alert.repeat else "REPEAT"
        segments.append((style, _atoms(label)))
        segments.append(("", _padded(_atoms(label), _KIND_WIDTH)[len(label) :]))
        segments.append(_plain(f" {alert.process.pid:<{_PID_WIDTH}} "))
        segments.append(("", [*_cell(alert.process.comm, _COMM_WIDTH), " "]))
        count = f" x{alert.count}" if alert.count > 1 else ""
        segments.append((style, _atoms(f"[{alert.level}{count}] {alert.title}")))
        segments.append(("", [*" (rule ", *_atoms(alert.rule_id), ")"]))
        first = self._finish(segments)
        context = _alert_context(alert, self.width)
        if not context:
            return first
        indent = _TIME_WIDTH + 1 + (_HOST_WIDTH + 1 if self.show_host else 0)
        return first + "\n" + self._finish([_plain(" " * indent), *context])

    def _time(self, time_ns: int) -> str:
        seconds, ns = divmod(time_ns, 1_000_000_000)
        key = (seconds, self.tz)
        if key != self._second:  # events come many to a second: format each second once
            try:
                hms = datetime.fromtimestamp(seconds, self.tz).strftime("%H:%M:%S")
            except (OverflowError, OSError, ValueError):
                return "??:??:??.???"
            self._second, self._hms = key, hms
        return f"{self._hms}.{ns // 1_000_000:03d}"

    def _finish(self, segments: list[_Segment]) -> str:
        """Cut to the width (by columns, at atom boundaries) and colour."""
        # Runs of atoms of one style; colour changes only ever fall between them.
        runs = [(style, atoms) for style, atoms in segments if atoms]
        while runs:  # no trailing padding: the last atoms that are single spaces go
            style, atoms = runs[-1]
            end = len(atoms)
            while end and atoms[end - 1] == " ":
                end -= 1
            if end:
                if end < len(atoms):
                    runs[-1] = (style, atoms[:end])
                break
            runs.pop()
        flat = list(chain.from_iterable(atoms for _, atoms in runs))
        kept, cut = (flat, False) if self.width is None else _fit(flat, self.width)
        if cut:
            left = len(kept) - 1  # atoms kept before the … that replaces the next one
            styled: list[tuple[str, str]] = []
            for style, atoms in runs:
                if left < len(atoms):
                    if left:
                        styled.append((style, "".join(atoms[:left])))
                    styled.append((style, ELLIPSIS))  # in the style of the atom it replaces
                    break
                styled.append((style, "".join(atoms)))
                left -= len(atoms)
        else:
            styled = [(style, "".join(atoms)) for style, atoms in runs]
        if not self.color:
            return "".join(text for _, text in styled)
        out: list[str] = []
        current = ""
        for style, text in styled:
            if style != current:
                if current:
                    out.append("\x1b[0m")
                if style:
                    out.append(f"\x1b[{style}m")
                current = style
            out.append(text)
        if current:
            out.append("\x1b[0m")
        return "".join(out)


def _detail(event: Event, width: int | None) -> list[_Segment]:
    if isinstance(event, ExecEvent):
        return _exec_detail(event, width)
    if isinstance(event, ConnectEvent):
        return _connect_detail(event)
    if isinstance(event, BindEvent):
        # The address bound, whether the port was asked for or left to the kernel (0).
        addr = event.addr or event.requested_addr
        port = event.port or event.requested_port
        segments: list[_Segment] = [("", [*_atoms(event.protocol), " ", *_host_port(addr, port)])]
        if event.outcome and event.outcome != "success":
            segments.append(("", [" "]))
            segments.append((_ERROR_STYLE, _atoms(event.outcome)))
        return segments
    if isinstance(event, ListenEvent):
        atoms = [*_atoms(event.protocol), " ", *_host_port(event.addr, event.port), *" LISTEN"]
        return [("", atoms)]
    if isinstance(event, SocketEvent):
        atoms = [*_atoms(event.protocol), " ", *_host_port(event.laddr, event.lport)]
        if event.raddr and event.rport:
            atoms += [*" -> ", *_host_port(event.raddr, event.rport)]
        if event.state:
            atoms += [" ", *_atoms(event.state)]
        return [("", atoms)]
    if isinstance(event, ExitEvent):
        if event.signal:
            text = f"signal {event.signal} ({_signal_name(event.signal)})"
        else:
            text = f"code {event.exit_code}"
        if event.core_dumped:
            text += " core dumped"
        return [_plain(text)]
    if isinstance(event, ForkEvent):
        return [_plain(f"child {event.child_pid}")]
    if isinstance(event, CgroupMoveEvent):
        atoms = []
        if event.target_pid and event.target_pid != event.process.pid:
            atoms += [*f"{event.target_pid} "]
        atoms += ["-", ">", " ", *_atoms(event.dst_cgroup_path)]
        segments = [("", atoms)]
        if event.left_sandbox:
            segments.append(("", [" "]))
            segments.append(_plain("left sandbox", _MARKER_STYLE))
        return segments
    if isinstance(event, RawSocketEvent):
        return [_plain(f"{event.family} {event.protocol} (protocol {event.protocol_number})")]
    if isinstance(event, IoUringEvent):
        return [_plain(f"fd {event.fd}, {event.sq_entries}/{event.cq_entries} entries")]
    if isinstance(event, ResponseEvent):
        return _response_detail(event)
    if isinstance(event, DnsEvent):
        return _dns_detail(event)
    return [("", _atoms(event.kind))]


def _response_detail(event: ResponseEvent) -> list[_Segment]:
    """What was done, to what, with what result, and why: "KILL 4242 (+2) ok, alert ID
    [high] TITLE" or "FREEZE st-1a2b3c4d failed: ERROR, alert ..."."""
    what = event.action.upper() or "ACTION"
    target = f"{event.target_pid}" if event.action == "kill" else event.sandbox
    atoms = [*_atoms(what), " ", *_atoms(target)]
    if event.action == "kill" and len(event.pids) > 1:
        atoms += [*f" (+{len(event.pids) - 1})"]
    segments: list[_Segment] = [(_MARKER_STYLE, atoms), _plain(" ")]
    if event.result == "ok":
        segments.append(_plain("ok"))
    else:
        segments.append((_ERROR_STYLE, _atoms(event.result or "unknown")))
        if event.error:
            segments.append(("", [":", " ", *_atoms(event.error)]))
    if event.alert_id:
        why = f", alert {event.alert_id} [{event.level}] "
        segments.append(("", [*_atoms(why), *_atoms(event.title)]))
    elif event.origin:
        segments.append(("", [*", by ", *_atoms(event.origin)]))
    return segments


def _dns_detail(event: DnsEvent) -> list[_Segment]:
    """`NAME TYPE RCODE -> cname, address, ... via RESOLVER:53/udp`: the names are the
    answering server's, escaped."""
    atoms = [*_atoms(event.query_name or "?"), " ", *_atoms(event.query_type)]
    segments: list[_Segment] = [("", atoms)]
    rcode = event.rcode_name or f"RCODE{event.rcode}"
    segments.append(("", [" "]))
    segments.append((_ERROR_STYLE if event.rcode else "", _atoms(rcode)))
    results = [*event.cnames, *event.addresses]
    if results:
        shown: list[str] = [*" -> "]
        for i, r in enumerate(results):
            shown += [",", " ", *_atoms(r)] if i else _atoms(r)
        segments.append(("", shown))
    where = [*" via ", *_host_port(event.resolver, event.resolver_port), "/", *event.protocol]
    segments.append(("", where))
    if event.error:
        segments.append(("", [" "]))
        segments.append((_ERROR_STYLE, [*"unreadable: ", *_atoms(event.error)]))
    return segments


def _exec_detail(event: ExecEvent, width: int | None) -> list[_Segment]:
    # The markers go first: they matter most and a long path or argv must not push them out.
    markers = [
        name
        for name, present in (
            ("[memfd]", event.fileless),
            ("[deleted]", event.deleted),
            ("[path truncated]", event.path_truncated),
        )
        if present
    ]
    segments: list[_Segment] = [_plain(f"{m} ", _MARKER_STYLE) for m in markers]
    exe = event.process.exe or event.filename or (event.argv[0] if event.argv else b"")
    segments.append(("", _argv_atoms([exe, *event.argv[1:]], width)))
    if event.argv_truncated:
        segments.append(_plain(" [truncated]", _MARKER_STYLE))
    return segments


# An alert's second line names at most this many destinations, then "and N more".
_ALERT_DESTINATIONS = 3
_LABEL_STYLE = "2"  # dim: "to:", "on:", "cmd:"


def _destination(event: object) -> tuple[str, tuple[str, ...]] | None:
    """Where a network event went ("to", its atoms) or listened ("on", its atoms)."""
    if isinstance(event, ConnectEvent):
        if event.family == "unix":
            return "to", ("unix", " ", *_atoms(event.path))
        return "to", (*_atoms(event.protocol), " ", *_host_port(event.daddr, event.dport))
    if isinstance(event, BindEvent | ListenEvent):
        if isinstance(event, BindEvent):
            addr = event.addr or event.requested_addr
            port = event.port or event.requested_port
        else:
            addr, port = event.addr, event.port
        return "on", (*_atoms(event.protocol), " ", *_host_port(addr, port))
    if isinstance(event, SocketEvent):
        if event.raddr and event.rport:
            return "to", (*_atoms(event.protocol), " ", *_host_port(event.raddr, event.rport))
        return "on", (*_atoms(event.protocol), " ", *_host_port(event.laddr, event.lport))
    return None


def _command_line(alert: Alert, width: int | None) -> list[str]:
    """The acting process's command line as exec lines show it (its executable's path in
    place of argv[0]): from its exec among the alert's events (what matched), else from the
    alert's process."""
    proc = alert.process
    argv, exe = proc.argv, proc.exe
    for event in reversed(alert.events):
        if isinstance(event, ExecEvent) and event.process.pid == proc.pid and event.argv:
            argv, exe = event.argv, event.process.exe or exe or event.filename
            break
    if not argv and not exe:
        return []
    return _argv_atoms([exe or argv[0], *argv[1:]], width)


def _alert_context(alert: Alert, width: int | None) -> list[_Segment]:
    """An alert's second line: "to:"/"on:" its events' distinct destinations (the first
    few, then "and N more"; events the alert left out are counted), then "cmd:" the acting
    process's command line. Empty when the alert carries neither."""
    found: dict[str, list[tuple[str, ...]]] = {"to": [], "on": []}
    for event in alert.events:
        dest = _destination(event)
        if dest is not None and dest[1] not in found[dest[0]]:
            found[dest[0]].append(dest[1])
    segments: list[_Segment] = []
    for label, dests in found.items():
        if not dests:
            continue
        atoms: list[str] = []
        for i, shown in enumerate(dests[:_ALERT_DESTINATIONS]):
            atoms += [",", " ", *shown] if i else list(shown)
        if len(dests) > _ALERT_DESTINATIONS:
            atoms += [*f" and {len(dests) - _ALERT_DESTINATIONS} more"]
        if segments:
            segments.append(_plain("  "))
        segments += [_plain(f"{label}:", _LABEL_STYLE), ("", [" ", *atoms])]
    if alert.omitted:
        segments.append(_plain(f"{' ' if segments else ''}(+{alert.omitted} events left out)"))
    cmd = _command_line(alert, width)
    if cmd:
        if segments:
            segments.append(_plain("  "))
        segments += [_plain("cmd:", _LABEL_STYLE), ("", [" ", *cmd])]
    return segments


def _connect_detail(event: ConnectEvent) -> list[_Segment]:
    if event.family == "unix":  # the socket's path (or @abstract name), escaped
        atoms = [*"unix ", *_atoms(event.path)]
    else:
        atoms = [*_atoms(event.protocol), " ", *_host_port(event.daddr, event.dport)]
    if event.hostname:  # the name resolved for it (or a TLS server name), escaped
        atoms += [" ", "(", *_atoms(event.hostname), ")"]
    if event.app_protocol:
        atoms += [" ", *_atoms(event.app_protocol)]
    segments: list[_Segment] = [("", atoms)]
    if event.outcome:
        style = _ERROR_STYLE if event.outcome in ("error", "denied") else ""
        segments.append(("", [" "]))
        segments.append((style, _atoms(event.outcome)))
    if event.denied and event.outcome == "repeated":  # a count of refused ones
        segments.append(("", [" "]))
        segments.append((_ERROR_STYLE, _atoms("denied")))
    if event.errno:
        segments.append(("", [" "]))
        name = event.errno_name or f"errno {event.errno}"
        segments.append((_ERROR_STYLE, _atoms(name)))
    return segments


def _counts(counts: Mapping[str, int], order: Sequence[str] = ()) -> str:
    keys = [k for k in order if k in counts] + sorted(k for k in counts if k not in order)
    return " ".join(f"{escape(k)}={counts[k]}" for k in keys)


def _lost_detail(event: LostEvent) -> str:
    text = f"LOST kernel={sum(event.kernel.values())} user={event.user}"
    if event.kernel:
        text += f" ({_counts(event.kernel, _TOTALS_ORDER)})"
    if event.errors:
        text += f" errors: {_counts(event.errors)}"
    return text


def totals_line(counts: dict[str, int], lost_kernel: int, lost_user: int) -> str:
    """The end-of-run totals, e.g. "events: exec=3 connect=2 lost: kernel=0 user=0"."""
    events = _counts(counts, _TOTALS_ORDER) or "none"
    return f"events: {events} lost: kernel={lost_kernel} user={lost_user}"


# --- JSON lines ----------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return bytes_text(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def json_dict(event: AnyEvent | Alert) -> dict[str, Any]:
    """The object json_line() dumps: to_dict() with every bytes value decoded as described in
    the module docstring (escaped text)."""
    d: dict[str, Any] = _jsonable(to_dict(event))
    return d


def json_line(event: AnyEvent | Alert) -> str:
    """One JSON object, on one line without its newline; ASCII only (see module docstring)."""
    return json.dumps(json_dict(event), ensure_ascii=True, separators=(",", ":"))


def bytes_from_json(s: str) -> bytes:
    """The original bytes of a bytes field read back from a json_line() object; ValueError
    when `s` is not escaped text."""
    return text_bytes(s)


class TerminalSink:
    """One line per event or alert: text from `renderer`, or JSON lines when it is None."""

    def __init__(
        self, stream: IO[str], renderer: TextRenderer | None, *, alerts_only: bool = False
    ) -> None:
        self.stream = stream
        self.renderer = renderer
        self.alerts_only = alerts_only
        if renderer is not None:
            stream.write(renderer.header() + "\n")

    def emit(self, event: AnyEvent | Alert) -> None:
        is_alert = isinstance(event, Alert)
        if self.alerts_only and not is_alert and not isinstance(event, LostEvent):
            return
        if self.renderer is None:
            line = json_line(event)
        elif isinstance(event, Alert):
            line = self.renderer.alert_line(event)
        else:
            line = self.renderer.line(event)
        self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


def line_width(choice: int | None, stream: IO[str]) -> int | None:
    """The width of text lines: --width when given; else the terminal's width when stream
    is a terminal (80 when it cannot be told); else None, no cut (a file or a pipe keeps
    whole lines, for grep and for the analyst who reads them later)."""
    if choice is not None:
        return choice
    if not stream.isatty():
        return None
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError):
        return 80


def use_color(choice: str, stream: IO[str]) -> bool:
    """Whether to colour output to stream for --color auto|always|never (NO_COLOR honoured)."""
    if choice != "auto":
        return choice == "always"
    return stream.isatty() and os.environ.get("NO_COLOR") is None
