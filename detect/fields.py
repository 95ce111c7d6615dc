"""sandtrace events presented under Sigma's field names, per log source.

Exec events are Sigma's ``product: linux, category: process_creation``; connect events are
``network_connection``; bind, listen and held-socket events are sandtrace's own
``network_listen``. Each category's field set is fixed and documented here, so that a rule
naming a field sandtrace does not provide is refused at load time, never silently dead.

String fields hold text (bytes from the traced process decoded as UTF-8 with invalid bytes
escaped as \\xNN); list fields (``Argv``, ``AncestorImages``) match when any element does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from api.events import (
    AnyEvent,
    BindEvent,
    ConnectEvent,
    Event,
    ExecEvent,
    ListenEvent,
    SocketEvent,
)

PRODUCT = "linux"
PROCESS_CREATION = "process_creation"
NETWORK_CONNECTION = "network_connection"
NETWORK_LISTEN = "network_listen"  # sandtrace's own: bind, listen, sockets held at start

# Fields every category has: who did it, in which sandbox.
COMMON_FIELDS = {
    "Image": "absolute path of the executable",
    "CommandLine": "argv joined with spaces",
    "Argv": "argv as a list (matches when any element does)",
    "ProcessId": "pid as the host sees it",
    "ParentProcessId": "parent's pid",
    "ParentImage": "parent's executable",
    "ParentCommandLine": "parent's argv joined with spaces",
    "AncestorImages": "executables of all ancestors up to the sandbox's first process (list)",
    "User": "user name (or uid when the host has no name for it)",
    "Uid": "numeric user id",
    "Comm": "the kernel's 15-character process name",
    "Sandbox": "sandbox id",
    "ContainerId": "container id from the cgroup path, when it follows a runtime's naming",
    "CgroupPath": "cgroup v2 path",
    "Host": "host name",
}

CATEGORY_FIELDS: dict[str, dict[str, str]] = {
    PROCESS_CREATION: {
        **COMMON_FIELDS,
        "CurrentDirectory": "working directory at exec",
        "OriginalFileName": "the file name given to execve, as given",
        "ArgvCount": "number of arguments",
        "ArgvTruncated": "'true' when argv was longer than sandtrace captures",
        "Fileless": "'true' when the executable is a memfd",
        "Deleted": "'true' when the executable file had no links left",
    },
    NETWORK_CONNECTION: {
        **COMMON_FIELDS,
        "Initiated": "'true' (sandtrace sees outgoing connects)",
        "Protocol": "tcp, udp",
        "DestinationIp": "destination address",
        "DestinationPort": "destination port",
        "DestinationIsIpv6": "'true' or 'false'",
        "SourceIp": "local address, when known",
        "SourcePort": "local port, when known",
        "Outcome": "success, error, in_progress, pending",
        "ErrnoName": "errno name when the connect failed, e.g. ECONNREFUSED",
    },
    NETWORK_LISTEN: {
        **COMMON_FIELDS,
        "Action": "bind, listen, or held (a socket held when tracing started)",
        "Protocol": "tcp, udp",
        "LocalIp": "bound address",
        "LocalPort": "bound port",
        "RequestedPort": "port asked for at bind (0 lets the kernel choose)",
        "State": "held sockets: listen, established, unconnected, ...",
        "Outcome": "success or error",
    },
}


# Fields whose values are lists (a rule's test holds when it holds for any element).
LIST_FIELDS = frozenset({"Argv", "AncestorImages"})
# Fields whose values are always text (str), so a regex can run on them as they are.
TEXT_FIELDS = frozenset(
    {
        "Image",
        "CommandLine",
        "ParentImage",
        "ParentCommandLine",
        "CurrentDirectory",
        "OriginalFileName",
        "User",
        "Comm",
    }
)
# Keyword rules (no field named) search these fields.
KEYWORD_FIELDS = ("CommandLine", "Image")

Value = str | int | float | list[str] | None
"""A field's value as rules read it: text, a number, a list of texts (LIST_FIELDS), or None
when the event has no such field."""


def text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


def command_line(argv: list[bytes]) -> str:
    """The arguments decoded and joined with spaces. Joining the bytes first gives the same
    text as joining the decoded arguments (UTF-8 decoding starts afresh at an ASCII byte, so
    an argument's broken tail is escaped alike), with one decode instead of one per argument."""
    return b" ".join(argv).decode("utf-8", "backslashreplace")


def nul_joined(argv: list[bytes]) -> str:
    """The arguments decoded, each between NULs ("\\0a\\0b\\0"; "" for none): one regular
    expression search over it stands in for a search of every argument (see
    detect.regexes.element_search)."""
    if not argv:
        return ""
    return "\0" + b"\0".join(argv).decode("utf-8", "backslashreplace") + "\0"


def lower_joined(argv: list[bytes]) -> str:
    """What FieldDict.joined gives for the decoded arguments (NUL, each lowered, NUL between
    and after; "" for none), from the bytes in one decode and one lower(): lowering the whole
    is lowering each part, since NUL is neither cased nor case-ignorable (the final-sigma rule
    does not see across it)."""
    return nul_joined(argv).lower()


def category_of(event: AnyEvent) -> str | None:
    return category_of_type(type(event))


def category_of_type(etype: type) -> str | None:
    if issubclass(etype, ExecEvent):
        return PROCESS_CREATION
    if issubclass(etype, ConnectEvent):
        return NETWORK_CONNECTION
    if issubclass(etype, BindEvent | ListenEvent | SocketEvent):
        return NETWORK_LISTEN
    return None


# A getter reads one field from an event of the type it is listed for (GETTERS). Getters are
# generated code, compiled from their expressions (_x): their types are unknown to a checker.
Getter = Callable[[Any], Any]


def _argv(e: Event) -> list[bytes]:
    return e.argv if isinstance(e, ExecEvent) else e.process.argv


def _parent_exe(e: Event) -> bytes:
    if isinstance(e, ExecEvent):
        return e.parent_exe
    return e.process.ancestry[0].exe if e.process.ancestry else b""


def _parent_argv(e: Event) -> list[bytes]:
    if isinstance(e, ExecEvent):
        return e.parent_argv
    return e.process.ancestry[0].argv if e.process.ancestry else []


# Every getter is an expression of the event `e`: generated code (matchers, correlation
# keys) inlines the expression where it would call the getter, names from EXPR_SCOPE.
EXPR_SCOPE: dict[str, Any] = {
    "text": text,
    "command_line": command_line,
    "lower_joined": lower_joined,
    "nul_joined": nul_joined,
    "_argv": _argv,
    "_parent_exe": _parent_exe,
    "_parent_argv": _parent_argv,
}
INLINE: dict[Getter, str] = {}
# Getters whose values are always str, and those always lowercase str already: generated
# matchers lower the first with str.lower() and take the second as they are, where any
# other value goes through the general detect.fieldcache.lowered.
ALWAYS_STR: set[Getter] = set()
ALWAYS_LOWER: set[Getter] = set()
# Getters of a field that has one value for the whole event type (Action, Initiated): an
# index entry on it holds for every event of the type or for none.
CONSTANT: dict[Getter, str] = {}
# Getters that decode one bytes attribute -> that attribute's expression: generated matchers
# look values up by the bytes, before any decoding.
DECODES: dict[Getter, str] = {}


def text_expression(of: str) -> str:
    """The expression decoding bytes `of` as text() does."""
    return f'{of}.decode("utf-8", "backslashreplace")'


def _joined(of: str, sep: str, lower: bool = False) -> str:
    """The expression for command_line(of) (sep " "), nul_joined(of) (sep "\\0") or, with
    lower, lower_joined(of): the functions' bodies, so that generated code spends no call.
    `of` must be cheap to evaluate twice (an attribute)."""
    if sep == " ":
        return text_expression(f'b" ".join({of})')
    joined = f'("\\0" + {text_expression(f"b{sep!r}.join({of})")} + "\\0")'
    return f'({joined}{".lower()" if lower else ""} if {of} else "")'


def _decoding(of: str) -> Getter:
    """A getter of bytes `of` decoded as text() does, noted in DECODES."""
    getter = _x(text_expression(of))
    DECODES[getter] = of
    return getter


def _const(value: str) -> Getter:
    """A getter of a fixed lowercase text."""
    getter = _x(repr(value), "low")
    CONSTANT[getter] = value
    return getter


def _x(source: str, form: str = "") -> Getter:
    """A getter from its expression; form "str" (always str) or "low" (always lowercase)."""
    getter: Getter = eval(f"lambda e: {source}", EXPR_SCOPE)  # noqa: S307 - our own source
    INLINE[getter] = source
    if form == "str":
        ALWAYS_STR.add(getter)
    elif form == "low":
        ALWAYS_LOWER.add(getter)
    return getter


# Network events carry the process's current argv and parent from the process table.
COMMON_GETTERS: dict[str, Getter] = {
    "Image": _decoding("e.process.exe"),
    "CommandLine": _x("command_line(_argv(e))"),
    "Argv": _x('[a.decode("utf-8", "backslashreplace") for a in _argv(e)]'),
    "ProcessId": _x("e.process.pid"),
    "ParentProcessId": _x("e.process.ppid"),
    "ParentImage": _x("text(_parent_exe(e))"),
    "ParentCommandLine": _x("command_line(_parent_argv(e))"),
    "AncestorImages": _x("[text(a.exe) for a in e.process.ancestry]"),
    "User": _x("e.process.user or str(e.process.uid)"),
    "Uid": _x("e.process.uid"),
    "Comm": _x(text_expression("e.process.comm")),
    "Sandbox": _x("e.sandbox", "str"),
    "ContainerId": _x("e.container_id", "str"),
    "CgroupPath": _x("e.cgroup_path", "str"),
    "Host": _x("e.host", "str"),
}
# An exec event has its own argv and parent: read without the type test
EXEC_ARGV = _x('[a.decode("utf-8", "backslashreplace") for a in e.argv]')

# Getters of list fields -> the same field lowered and joined (FieldDict.joined) in one go,
# for generated matchers (detect.codegen.CodeContext.load).
LOWER_JOINED: dict[Getter, Getter] = {
    COMMON_GETTERS["Argv"]: _x("lower_joined(_argv(e))"),
    EXEC_ARGV: _x(_joined("e.argv", "\0", lower=True)),
}

# ... and to the field's elements decoded and NUL-joined as they are (nul_joined)
RAW_JOINED: dict[Getter, Getter] = {
    COMMON_GETTERS["Argv"]: _x("nul_joined(_argv(e))"),
    EXEC_ARGV: _x(_joined("e.argv", "\0")),
}

# Getters of a text that is a list field's elements joined with single spaces -> the getter
# of that list (its LOWER_JOINED form holds the same text with NULs for the spaces).
SPACE_JOINED: dict[Getter, Getter] = {COMMON_GETTERS["CommandLine"]: COMMON_GETTERS["Argv"]}
EXEC_COMMAND_LINE = _x(_joined("e.argv", " "))
SPACE_JOINED[EXEC_COMMAND_LINE] = EXEC_ARGV

GETTERS: dict[type, dict[str, Getter]] = {
    ExecEvent: {
        **COMMON_GETTERS,
        "CommandLine": EXEC_COMMAND_LINE,
        "Argv": EXEC_ARGV,
        "ParentImage": _decoding("e.parent_exe"),
        "ParentCommandLine": _x(_joined("e.parent_argv", " ")),
        "CurrentDirectory": _decoding("e.cwd"),
        "OriginalFileName": _decoding("e.filename"),
        "ArgvCount": _x("len(e.argv)"),
        "ArgvTruncated": _x('"true" if e.argv_truncated else "false"', "low"),
        "Fileless": _x('"true" if e.fileless else "false"', "low"),
        "Deleted": _x('"true" if e.deleted else "false"', "low"),
    },
    ConnectEvent: {
        **COMMON_GETTERS,
        "Initiated": _const("true"),
        "Protocol": _x("e.protocol", "str"),
        "DestinationIp": _x("e.daddr", "str"),
        "DestinationPort": _x("e.dport"),
        "DestinationIsIpv6": _x('"true" if e.family == "ipv6" else "false"', "low"),
        "SourceIp": _x("e.saddr", "str"),
        "SourcePort": _x("e.sport"),
        "Outcome": _x("e.outcome", "str"),
        "ErrnoName": _x("e.errno_name", "str"),
    },
    BindEvent: {
        **COMMON_GETTERS,
        "Action": _const("bind"),
        "Protocol": _x("e.protocol", "str"),
        "LocalIp": _x("e.addr", "str"),
        "LocalPort": _x("e.port"),
        "RequestedPort": _x("e.requested_port"),
        "Outcome": _x("e.outcome", "str"),
    },
    ListenEvent: {
        **COMMON_GETTERS,
        "Action": _const("listen"),
        "Protocol": _x("e.protocol", "str"),
        "LocalIp": _x("e.addr", "str"),
        "LocalPort": _x("e.port"),
        "Outcome": _const("success"),
    },
    SocketEvent: {
        **COMMON_GETTERS,
        "Action": _const("held"),
        "Protocol": _x("e.protocol", "str"),
        "LocalIp": _x("e.laddr", "str"),
        "LocalPort": _x("e.lport"),
        "State": _x("e.state", "str"),
        "Outcome": _const("success"),
    },
}
"""Per event type, how each Sigma field is read from the event (on demand: most rules read
only a few fields of most events)."""


def fields_of(event: AnyEvent) -> dict[str, Value] | None:
    """The Sigma field dict of an event, or None for kinds no rule category covers."""
    getters = GETTERS.get(type(event))
    if getters is None:
        return None
    return {name: get(event) for name, get in getters.items()}
