"""sandtrace events presented under Sigma's field names, per log source.

Exec events are Sigma's ``product: linux, category: process_creation``; connect events are
``network_connection``; bind, listen and held-socket events are sandtrace's own
``network_listen``; raw sockets and io_uring instances sandtrace's own ``kernel_interface``.
Each category's field set is fixed and documented here, so that a rule naming a field
sandtrace does not provide is refused at load time, never silently dead.

String fields hold text (bytes from the traced process decoded as UTF-8 with invalid bytes
escaped as \\xNN); list fields (``Argv``, ``AncestorImages``) match when any element does.

``Image`` keeps Sigma's meaning, the executable the kernel runs: the interpreter for a
script, the dynamic loader for a program started through it. ``TargetImage`` is the file
that actually runs (the script, the loaded program, else Image), so path and name rules test
both. ``OriginalFileName`` and ``Hashes`` say what the executable is whatever its name (the
packaged file it copies, a Go main module, its SHA-256); ``Std*Type`` and ``Std*Peer`` what
its standard streams were at exec (a shell whose stdin is a TCP socket is a reverse shell).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any, cast

from api.events import (
    AnyEvent,
    BindEvent,
    ConnectEvent,
    DnsEvent,
    Event,
    ExecEvent,
    IoUringEvent,
    ListenEvent,
    RawSocketEvent,
    SocketEvent,
)

PRODUCT = "linux"
PROCESS_CREATION = "process_creation"
NETWORK_CONNECTION = "network_connection"
NETWORK_LISTEN = "network_listen"  # sandtrace's own: bind, listen, sockets held at start
# sandtrace's own: kernel interfaces that get around what the connect and bind hooks show,
# raw IP sockets and io_uring instances
KERNEL_INTERFACE = "kernel_interface"
# Sigma's (Sysmon's) DNS category: the answers a sandboxed process received
DNS_QUERY = "dns_query"

# Fields every category has: who did it, in which sandbox.
COMMON_FIELDS = {
    "Image": "absolute path of the executable",
    "TargetImage": (
        "the file that actually runs: the script when Image is its interpreter (run by #! or"
        " named on the command line), the program when Image is the dynamic loader, else"
        " Image; other events work it out from the process's argv, working directory and"
        " execve name as its exec event had them"
    ),
    "CommandLine": "argv joined with spaces",
    "Argv": "argv as a list (matches when any element does)",
    "ProcessId": "pid as the host sees it",
    "ParentProcessId": "parent's pid",
    "ParentImage": "parent's executable",
    "ParentCommandLine": "parent's argv joined with spaces",
    "AncestorImages": "executables of all ancestors up to the sandbox's first process (list)",
    "CurrentDirectory": (
        "working directory at exec (other events: the process's, from its exec event; ''"
        " until that is known)"
    ),
    "OriginalFileName": (
        "what the executable is, whatever it is called: the packaged file it is a copy of"
        " (/usr/bin/ssh), else a Go program's main module (github.com/jpillora/chisel),"
        " else ''; other events: the process's, from its exec event"
    ),
    "GoModule": "a Go program's main module path, '' when not Go or not known",
    "Hashes": "'SHA256=<hex>' of the executable's content, '' when not known",
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
        "ExecFileName": "the file name given to execve, as given",
        "StdinType": (
            "what fd 0 was at exec: tty, pipe, null, file, tcp, udp, unix, socket, closed,"
            " unknown ('' when not known)"
        ),
        "StdoutType": "what fd 1 was at exec (as StdinType)",
        "StderrType": "what fd 2 was at exec (as StdinType)",
        "StdinPeer": (
            "fd 0's detail: PEER:PORT of a tcp/udp socket, the path of a file or unix socket"
        ),
        "StdoutPeer": "fd 1's detail (as StdinPeer)",
        "StderrPeer": "fd 2's detail (as StdinPeer)",
        "ArgvCount": "number of arguments",
        "ArgvTruncated": "'true' when argv was longer than sandtrace captures",
        "Fileless": "'true' when the executable is a memfd",
        "Deleted": "'true' when the executable file had no links left",
    },
    NETWORK_CONNECTION: {
        **COMMON_FIELDS,
        "Initiated": "'true' (sandtrace sees outgoing connects)",
        "Protocol": "tcp, udp, unix",
        "DestinationIp": "destination address",
        "DestinationPort": "destination port",
        "DestinationIsIpv6": "'true' or 'false'",
        "SourceIp": "local address, when known",
        "SourcePort": "local port, when known",
        "Outcome": "success, error, in_progress, pending; sent (UDP without connect), "
        "repeated (a count of repeats the kernel folded), denied (refused by --enforce)",
        "Denied": "'true' when the kernel refused it (EPERM) under the sandbox's egress "
        "policy (--enforce), else 'false'",
        "ErrnoName": "errno name when the connect failed, e.g. ECONNREFUSED",
        # unix socket connects (Protocol unix; DestinationIp '' and DestinationPort 0):
        "DestinationPath": "unix socket path, or @name for an abstract one ('' for IP)",
        "DestinationImage": "executable of the process listening on the unix socket, if found",
        "DestinationProcessId": "pid of the process listening on the unix socket, 0 if not found",
        # names and protocols, from the sandbox's own packets (untrusted: the peer and the
        # process choose them)
        "DestinationHostname": (
            "the name the sandbox resolved DestinationIp as (a DNS answer it received), else"
            " the server name of a TLS ClientHello on the flow; '' when neither was seen"
        ),
        "ApplicationProtocol": (
            "what the flow speaks, from its first bytes whatever the port: ssh, tls, http,"
            " stratum, dns; unknown for none of those; '' when no payload was seen"
        ),
        "TlsServerName": "server name (SNI) of the flow's TLS ClientHello",
        "HttpHost": "Host of the flow's HTTP request",
        "ApplicationDetail": "an HTTP request line, a Stratum method, an SSH banner",
    },
    DNS_QUERY: {
        **COMMON_FIELDS,
        "QueryName": "the question's name, lower-case, without the trailing dot",
        "QueryType": "A, AAAA, CNAME, MX, TXT, ..., TYPE<n>",
        "QueryStatus": "the response code as a number: 0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN",
        "QueryStatusName": "the response code's name: NOERROR, NXDOMAIN, ...",
        "QueryResults": (
            "the question's addresses and its CNAME chain's names (list: matches when any"
            " element does)"
        ),
        "ResolverIp": "the address the answer came from",
        "ResolverPort": "the port it came from (53)",
        "Protocol": "udp or tcp",
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
    KERNEL_INTERFACE: {
        **COMMON_FIELDS,
        "Action": (
            "raw_socket (a raw IP or packet socket was made) or io_uring (a ring was set up)"
        ),
        "Family": "raw sockets: ipv4, ipv6, or packet (AF_PACKET: link-layer frames)",
        "Protocol": (
            "raw sockets: the IP protocol, icmp, icmpv6, tcp, udp, raw, ip/<n>; packet"
            " sockets: the ethertype, all, ip, ipv6, arp, none, eth/0x<hex>"
        ),
        "ProtocolNumber": "raw sockets: the protocol number given to socket() (host order)",
        "Flags": "io_uring: its IORING_SETUP_* flags",
        "SqEntries": "io_uring: submission queue entries",
    },
}


# Fields only correlations read, to group events (not for a detection's tests): every
# category has them.
GROUP_FIELDS = {
    "LineageProcessIds": (
        "the process's pid, then its ancestors' up to the sandbox's first process, nearest"
        " first (list): grouped by it, an event joins the group of each, so a correlation can"
        " follow what a process's descendants do (Sigma aliases name it for one rule and"
        " ProcessId for another)"
    ),
}
# Group fields whose values are lists (an event is in the group of each element).
GROUP_LIST_FIELDS = frozenset({"LineageProcessIds"})

# Fields whose values are lists (a rule's test holds when it holds for any element).
LIST_FIELDS = frozenset({"Argv", "AncestorImages", "QueryResults"})
# Fields whose values are always text (str), so a regex can run on them as they are.
TEXT_FIELDS = frozenset(
    {
        "Image",
        "TargetImage",
        "CommandLine",
        "ParentImage",
        "ParentCommandLine",
        "CurrentDirectory",
        "OriginalFileName",
        "ExecFileName",
        "GoModule",
        "Hashes",
        "StdinType",
        "StdoutType",
        "StderrType",
        "StdinPeer",
        "StdoutPeer",
        "StderrPeer",
        "User",
        "Comm",
        "DestinationPath",
        "DestinationImage",
        "DestinationHostname",
        "TlsServerName",
        "HttpHost",
        "ApplicationDetail",
        "QueryName",
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
    if issubclass(etype, RawSocketEvent | IoUringEvent):
        return KERNEL_INTERFACE
    if issubclass(etype, DnsEvent):
        return DNS_QUERY
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


# --- the file that actually runs ----------------------------------------------------------
# A script run by its interpreter (shebang or command line) or a program run through the
# dynamic loader has the interpreter or loader as its executable (Image). target_image
# finds the script or program from what the kernel and the caller put in argv, which the
# traced process controls: options are skipped as each interpreter parses them, and inline
# code (-c, -e, -r ...), a module (-m) or stdin ("-", -s) mean there is no other file.


class _Options:
    """How one interpreter family parses the options before its script."""

    __slots__ = ("attached", "code", "file", "long_arg", "long_code", "long_file", "plus", "takes")

    def __init__(
        self,
        *,
        code: bytes = b"",
        takes: bytes = b"",
        attached: bytes = b"",
        file: bytes = b"",
        long_code: tuple[bytes, ...] = (),
        long_arg: tuple[bytes, ...] = (),
        long_file: tuple[bytes, ...] = (),
        plus: bool = False,
    ) -> None:
        self.code = frozenset(code[i : i + 1] for i in range(len(code)))  # no file: -c, -e, -m
        self.takes = frozenset(takes[i : i + 1] for i in range(len(takes)))  # value, maybe next
        self.attached = frozenset(attached[i : i + 1] for i in range(len(attached)))  # rest
        self.file = frozenset(file[i : i + 1] for i in range(len(file)))  # the script: php -f
        self.long_code = frozenset(long_code)
        self.long_arg = frozenset(long_arg)
        self.long_file = frozenset(long_file)
        self.plus = plus  # '+o name' options (shells)


_SHELL = _Options(code=b"cs", takes=b"oO", long_arg=(b"--rcfile", b"--init-file"), plus=True)
_INTERPRETER_OPTIONS: dict[str, _Options] = {
    "sh": _SHELL,
    "python": _Options(code=b"cm", takes=b"WXQ", long_arg=(b"--check-hash-based-pycs",)),
    "perl": _Options(code=b"eE", takes=b"IMm", attached=b"0lixFCdDV"),
    "ruby": _Options(code=b"e", takes=b"IrCE", attached=b"xF0lKWT", long_arg=(b"--encoding",)),
    "node": _Options(
        code=b"ep",
        takes=b"rC",
        long_code=(b"--eval", b"--print"),
        long_arg=(
            b"--require",
            b"--import",
            b"--loader",
            b"--experimental-loader",
            b"--conditions",
            b"--input-type",
            b"--env-file",
            b"--title",
            b"--inspect-port",
            b"--stack-size",
        ),
    ),
    "php": _Options(code=b"rBRE", takes=b"dcztS", file=b"fF", long_file=(b"--file",)),
    "lua": _Options(code=b"e", takes=b"l"),
    "ld.so": _Options(
        long_arg=(
            b"--library-path",
            b"--preload",
            b"--audit",
            b"--argv0",
            b"--inhibit-rpath",
            b"--glibc-hwcaps-prepend",
            b"--glibc-hwcaps-mask",
        ),
    ),
}
_SHELLS = frozenset(b"sh bash dash zsh ksh ksh93 mksh ash csh tcsh fish yash posh".split())
_STRIP = b"0123456789.-"


def interpreter_family(path: bytes) -> str:
    """The interpreter family of an executable path ("sh", "python", ..., "ld.so" for the
    dynamic loader), "" for any other program."""
    name = path.rpartition(b"/")[2]
    if name in _SHELLS:
        return "sh"
    if name.startswith((b"ld-linux", b"ld-musl", b"ld.so")):
        return "ld.so"
    stem = name.rstrip(_STRIP)
    if stem in (b"python", b"pypy"):
        return "python"
    if stem == b"nodejs":
        return "node"
    if stem == b"luajit":
        return "lua"
    return stem.decode() if stem in (b"perl", b"ruby", b"node", b"php", b"lua") else ""


_FAMILIES: dict[bytes, _Options | None] = {}


def _options_of(exe: bytes) -> _Options | None:
    options = _FAMILIES.get(exe, _FAMILIES)
    if options is _FAMILIES:
        if len(_FAMILIES) >= 4096:
            _FAMILIES.clear()
        options = _FAMILIES[exe] = _INTERPRETER_OPTIONS.get(interpreter_family(exe))
    return options  # type: ignore[return-value]  # an entry: _Options | None


def script_argument(options: _Options, argv: list[bytes]) -> bytes:
    """The script (or program) an interpreter (or loader) started with `argv` runs: its
    first operand after the options; b"" when it runs inline code, a module or stdin."""
    i, n = 1, len(argv)
    while i < n:
        a = argv[i]
        i += 1
        if a == b"--":
            return argv[i] if i < n else b""
        if len(a) < 2 or not (a[0] == 45 or (a[0] == 43 and options.plus)):  # '-', '+'
            return b"" if a == b"-" else a
        if a[1] == 45:  # a long option
            name, eq, value = a.partition(b"=")
            if name in options.long_code:
                return b""
            if name in options.long_file:
                return value if eq else (argv[i] if i < n else b"")
            if not eq and name in options.long_arg:
                i += 1
            continue
        for j in range(1, len(a)):  # a cluster of one-letter options: -uB, -Wignore, -ex
            c = a[j : j + 1]
            if c in options.code:
                return b""
            if c in options.file:
                return a[j + 1 :] or (argv[i] if i < n else b"")
            if c in options.takes:
                if j + 1 == len(a):
                    i += 1  # its value is the next argument
                break
            if c in options.attached:
                break
    return b""


def _resolved(path: bytes, cwd: bytes) -> str:
    if path[:1] != b"/" and cwd:
        path = cwd.rstrip(b"/") + b"/" + path
    if b"/." in path or b"//" in path or path[:2] == b"./":
        path = posixpath.normpath(path)
    return path.decode("utf-8", "backslashreplace")


def target_image(
    exe: bytes, filename: bytes, argv: list[bytes], cwd: bytes, identity: bytes = b""
) -> str:
    """The file that actually runs: a #! script (the kernel puts the name given to execve,
    `filename`, after the interpreter and its one optional argument in argv), the script or
    program an interpreter or the dynamic loader was given, else the executable itself.
    Relative names are resolved against `cwd` (b"" when not known: kept relative);
    `identity` is the packaged file `exe` is a copy of, when known (a renamed interpreter)."""
    if (
        filename
        and len(argv) > 1
        and filename != exe
        and (argv[1] == filename or (len(argv) > 2 and argv[2] == filename))
    ):
        return _resolved(filename, cwd)
    known = _FAMILIES.get(exe, _FAMILIES)  # _options_of without a call, when known
    options = _options_of(exe) if known is _FAMILIES else cast("_Options | None", known)
    if options is None and identity:  # a renamed copy of an interpreter
        options = _options_of(identity)
    if options is not None:
        script = script_argument(options, argv)
        if script:
            return _resolved(script, cwd)
    return exe.decode("utf-8", "backslashreplace")


_PROCESS_TARGETS: dict[tuple[bytes, ...], str] = {}


def process_target(
    exe: bytes,
    argv: list[bytes],
    filename: bytes = b"",
    cwd: bytes = b"",
    identity: bytes = b"",
) -> str:
    """target_image of a running process (other events than exec: the execve name, working
    directory and identity its exec event had, b"" when not known), worked out once per
    interpreter command line: a process connects many times with the same argv."""
    if (
        _options_of(exe) is None
        and (not identity or _options_of(identity) is None)
        and not (
            filename
            and len(argv) > 1
            and filename != exe
            and (argv[1] == filename or (len(argv) > 2 and argv[2] == filename))
        )
    ):  # not an interpreter (by name or identity), not a #! script
        return exe.decode("utf-8", "backslashreplace")
    if len(argv) > 16:  # kept out of the memo: long command lines would fill it
        return target_image(exe, filename, argv, cwd, identity)
    key = (exe, filename, cwd, identity, *argv)
    target = _PROCESS_TARGETS.get(key)
    if target is None:
        if len(_PROCESS_TARGETS) >= 4096:
            _PROCESS_TARGETS.clear()
        target = _PROCESS_TARGETS[key] = target_image(exe, filename, argv, cwd, identity)
    return target


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
    "target_image": target_image,
    "process_target": process_target,
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
    "TargetImage": _x(
        "process_target(e.process.exe, e.process.argv, e.process.filename, e.process.cwd,"
        " e.process.original_exe)",
        "str",
    ),
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
    "LineageProcessIds": _x("[e.process.pid, *[a.pid for a in e.process.ancestry]]"),
    # what the process runs, as its exec event said (exec events read their own fields)
    "CurrentDirectory": _decoding("e.process.cwd"),
    "OriginalFileName": _x(
        f"({text_expression('e.process.original_exe')} if e.process.original_exe"
        " else e.process.go_module)",
        "str",
    ),
    "GoModule": _x("e.process.go_module", "str"),
    "Hashes": _x('("SHA256=" + e.process.sha256) if e.process.sha256 else ""', "str"),
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
        "TargetImage": _x(
            "target_image(e.process.exe, e.filename, e.argv, e.cwd, e.original_exe)", "str"
        ),
        "ExecFileName": _decoding("e.filename"),
        "OriginalFileName": _x(
            f"({text_expression('e.original_exe')} if e.original_exe else e.go_module)", "str"
        ),
        "GoModule": _x("e.go_module", "str"),
        "Hashes": _x('("SHA256=" + e.sha256) if e.sha256 else ""', "str"),
        "StdinType": _x('(e.stdio[0].partition(":")[0] if len(e.stdio) > 0 else "")', "str"),
        "StdoutType": _x('(e.stdio[1].partition(":")[0] if len(e.stdio) > 1 else "")', "str"),
        "StderrType": _x('(e.stdio[2].partition(":")[0] if len(e.stdio) > 2 else "")', "str"),
        "StdinPeer": _x('(e.stdio[0].partition(":")[2] if len(e.stdio) > 0 else "")', "str"),
        "StdoutPeer": _x('(e.stdio[1].partition(":")[2] if len(e.stdio) > 1 else "")', "str"),
        "StderrPeer": _x('(e.stdio[2].partition(":")[2] if len(e.stdio) > 2 else "")', "str"),
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
        "Denied": _x('"true" if e.denied else "false"', "low"),
        "ErrnoName": _x("e.errno_name", "str"),
        "DestinationPath": _decoding("e.path"),
        "DestinationImage": _decoding("e.peer_exe"),
        "DestinationProcessId": _x("e.peer_pid"),
        "DestinationHostname": _x("e.hostname", "str"),
        "ApplicationProtocol": _x("e.app_protocol", "str"),
        "TlsServerName": _x("e.sni", "str"),
        "HttpHost": _x("e.http_host", "str"),
        "ApplicationDetail": _x("e.app_detail", "str"),
    },
    DnsEvent: {
        **COMMON_GETTERS,
        "QueryName": _x("e.query_name", "str"),
        "QueryType": _x("e.query_type", "str"),
        "QueryStatus": _x("e.rcode"),
        "QueryStatusName": _x("e.rcode_name", "str"),
        "QueryResults": _x("e.addresses + e.cnames"),
        "ResolverIp": _x("e.resolver", "str"),
        "ResolverPort": _x("e.resolver_port"),
        "Protocol": _x("e.protocol", "str"),
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
    RawSocketEvent: {
        **COMMON_GETTERS,
        "Action": _const("raw_socket"),
        "Family": _x("e.family", "str"),
        "Protocol": _x("e.protocol", "str"),
        "ProtocolNumber": _x("e.protocol_number"),
        "Flags": _x("0"),
        "SqEntries": _x("0"),
    },
    IoUringEvent: {
        **COMMON_GETTERS,
        "Action": _const("io_uring"),
        "Family": _const(""),
        "Protocol": _const(""),
        "ProtocolNumber": _x("0"),
        "Flags": _x("e.flags"),
        "SqEntries": _x("e.sq_entries"),
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
