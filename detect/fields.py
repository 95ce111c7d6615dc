"""sandtrace events presented under Sigma's field names, per log source.

Exec events are Sigma's ``product: linux, category: process_creation``; connect events are
``network_connection``; bind, listen and held-socket events are sandtrace's own
``network_listen``. Each category's field set is fixed and documented here, so that a rule
naming a field sandtrace does not provide is refused at load time, never silently dead.

String fields hold text (bytes from the traced process decoded as UTF-8 with invalid bytes
escaped as \\xNN); list fields (``Argv``, ``AncestorImages``) match when any element does.
"""

from __future__ import annotations

from typing import Any

from collector.events import (
    AnyEvent,
    BindEvent,
    ConnectEvent,
    Event,
    ExecEvent,
    ListenEvent,
    Process,
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


def text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


def command_line(argv: list[bytes]) -> str:
    return " ".join(text(a) for a in argv)


def category_of(event: AnyEvent) -> str | None:
    if isinstance(event, ExecEvent):
        return PROCESS_CREATION
    if isinstance(event, ConnectEvent):
        return NETWORK_CONNECTION
    if isinstance(event, BindEvent | ListenEvent | SocketEvent):
        return NETWORK_LISTEN
    return None


def _process_fields(event: Event, argv: list[bytes], parent_exe: bytes,
                    parent_argv: list[bytes]) -> dict[str, Any]:  # fmt: skip
    p: Process = event.process
    return {
        "Image": text(p.exe),
        "CommandLine": command_line(argv),
        "Argv": [text(a) for a in argv],
        "ProcessId": p.pid,
        "ParentProcessId": p.ppid,
        "ParentImage": text(parent_exe),
        "ParentCommandLine": command_line(parent_argv),
        "AncestorImages": [text(a.exe) for a in p.ancestry],
        "User": p.user or str(p.uid),
        "Uid": p.uid,
        "Comm": text(p.comm),
        "Sandbox": event.sandbox,
        "ContainerId": event.container_id,
        "CgroupPath": event.cgroup_path,
        "Host": event.host,
    }


def _bool(value: bool) -> str:
    return "true" if value else "false"


def fields_of(event: AnyEvent) -> dict[str, Any] | None:
    """The Sigma field dict of an event, or None for kinds no rule category covers."""
    if isinstance(event, ExecEvent):
        f = _process_fields(event, event.argv, event.parent_exe, event.parent_argv)
        f.update(
            CurrentDirectory=text(event.cwd),
            OriginalFileName=text(event.filename),
            ArgvCount=len(event.argv),
            ArgvTruncated=_bool(event.argv_truncated),
            Fileless=_bool(event.fileless),
            Deleted=_bool(event.deleted),
        )
        return f
    if not isinstance(event, ConnectEvent | BindEvent | ListenEvent | SocketEvent):
        return None
    # Network events carry the process's current argv and parent from the process table.
    ancestry = event.process.ancestry
    parent = ancestry[0] if ancestry else None
    f = _process_fields(
        event,
        event.process.argv,
        parent.exe if parent else b"",
        parent.argv if parent else [],
    )
    if isinstance(event, ConnectEvent):
        f.update(
            Initiated="true",
            Protocol=event.protocol,
            DestinationIp=event.daddr,
            DestinationPort=event.dport,
            DestinationIsIpv6=_bool(event.family == "ipv6"),
            SourceIp=event.saddr,
            SourcePort=event.sport,
            Outcome=event.outcome,
            ErrnoName=event.errno_name,
        )
    elif isinstance(event, BindEvent):
        f.update(Action="bind", Protocol=event.protocol, LocalIp=event.addr, LocalPort=event.port,
                 RequestedPort=event.requested_port, Outcome=event.outcome)  # fmt: skip
    elif isinstance(event, ListenEvent):
        f.update(Action="listen", Protocol=event.protocol, LocalIp=event.addr,
                 LocalPort=event.port, Outcome="success")  # fmt: skip
    else:
        f.update(Action="held", Protocol=event.protocol, LocalIp=event.laddr,
                 LocalPort=event.lport, State=event.state, Outcome="success")  # fmt: skip
    return f
