"""The ``sandtrace`` command: ``run`` a command in a fresh sandbox, or ``watch`` existing ones."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from collector import cgroups
from collector import tail as tail_command
from collector.assemble import Assembler, Scope
from collector.pipeline import (
    CallbackSink,
    EscapeFollower,
    JsonFileSink,
    Pipeline,
    Sink,
    TerminalSink,
    Totals,
)
from collector.proctable import ProcessTable, parse_stat
from collector.render import TextRenderer, totals_line
from collector.startup import held_socket_events
from collector.stream import StreamSink, read_token_file
from detect.engine import EgressPolicies, Engine
from detect.sigma import load_paths
from service import main as serve_command
from service.tail import DEFAULT_SOCKET, LocalTail, TailHub, TailSocketBusy, TailSocketError

if TYPE_CHECKING:
    from probes.loader import Probes

log = structlog.get_logger("sandtrace")

BUILTIN_RULES = Path(__file__).resolve().parent.parent / "rules"
DEFAULT_SPOOL = Path("/var/lib/sandtrace/spool")

EXAMPLES_RUN = """examples:
  sudo sandtrace run -- curl -s http://192.0.2.10/
  sudo sandtrace run --json --events run.jsonl -- python3 agent.py
  sudo sandtrace run --wait-all -- ./start-services.sh
"""
EXAMPLES_WATCH = """examples:
  sudo sandtrace watch                       # sandtrace's sandboxes and container cgroups
  sudo sandtrace watch --cgroup /sys/fs/cgroup/mybox --cgroup /sys/fs/cgroup/other
  sudo sandtrace watch --pid 4242            # a process and all its descendants
  sudo sandtrace watch --all --json          # the whole host, as JSON lines
"""


def configure_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
    )


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    p.add_argument("--events", metavar="FILE", help="also append every event to FILE as JSON")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--width", type=int, default=80, help="line width of text output")
    p.add_argument(
        "--ring-pages",
        type=int,
        default=1024,
        help="kernel ring buffer size in pages, a power of two (default 1024 = 4 MiB)",
    )
    p.add_argument(
        "--perf-buffer",
        action="store_true",
        help="use the perf buffer even where the BPF ring buffer exists",
    )
    p.add_argument(
        "--no-connect-hook",
        action="store_true",
        help="do not hook connect(): spares every process on the host the kernel's per-connect "
        "hook cost; TCP connects are still traced, UDP connects are not",
    )
    p.add_argument(
        "--no-bind-hook",
        action="store_true",
        help="do not hook bind(): spares every process on the host the kernel's per-bind hook "
        "cost; TCP listeners are still traced, binds (and UDP servers) are not",
    )
    p.add_argument("--server", metavar="URL",
                   help="stream events to a detection service (sandtrace serve) instead of "
                   "detecting here")  # fmt: skip
    p.add_argument("--server-token-file", metavar="FILE",
                   help="bearer token for --server, read from FILE")  # fmt: skip
    p.add_argument(
        "--server-ca-file",
        metavar="FILE",
        help="verify an https:// --server's certificate against the CA in FILE",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain http:// to a --server that is not on this host",
    )
    p.add_argument(
        "--server-transport",
        choices=["http", "websocket"],
        default="http",
        help="one POST per batch (default), or one WebSocket for all of them",
    )
    p.add_argument(
        "--server-linger",
        type=float,
        default=0.05,
        metavar="SECONDS",
        help="send a batch once its first event is this old, if it has not filled (500 "
        "events) before; default 0.05",
    )
    p.add_argument(
        "--spool-dir",
        metavar="DIR",
        type=Path,
        default=None,
        help="keep batches the service has not taken yet in DIR, also across restarts "
        f"(watch: default {DEFAULT_SPOOL}; run: no spool unless given)",
    )
    p.add_argument(
        "--spool-max",
        metavar="MIB",
        type=int,
        default=256,
        help="size bound of the spool in MiB; beyond it the oldest batches are "
        "discarded and counted (default 256)",
    )
    p.add_argument(
        "--no-spool",
        action="store_true",
        help="hold undelivered batches in memory only (16 MiB, then discard)",
    )
    d = p.add_argument_group("detection")
    d.add_argument(
        "--rules",
        action="append",
        default=[],
        metavar="DIR",
        help="add the Sigma rules in DIR (or a file) to the built-in pack (repeatable)",
    )
    d.add_argument("--no-builtin-rules", action="store_true", help="leave the built-in pack out")
    d.add_argument("--no-detect", action="store_true", help="trace only, raise no alerts")
    d.add_argument("--alerts", metavar="FILE", help="also append every alert to FILE as JSON")
    d.add_argument("--alerts-only", action="store_true", help="show only alerts (and losses)")
    d.add_argument("--egress-allow", action="append", default=None,
                   metavar="[SANDBOX=]NET[:PORTS]",
                   help="allow connects to NET (CIDR or address, optional ports 80,443), for "
                   "every sandbox or only SANDBOX; any other destination alerts; repeatable "
                   "(default: no allow-list)")  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandtrace",
        description="Trace exec, connect and bind of sandboxed processes with eBPF.",
        epilog=EXAMPLES_RUN + "\n" + EXAMPLES_WATCH,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a command in a fresh sandbox and trace it",
        description="Start CMD in a new cgroup v2 sandbox, trace it and every descendant, "
        "and exit with CMD's exit code once every event has been printed.",
        epilog=EXAMPLES_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_args(run)
    _tail_args(run)
    run.add_argument(
        "--wait-all",
        action="store_true",
        help="after CMD exits, wait for every process left in the sandbox (default: kill them)",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    watch = sub.add_parser(
        "watch",
        help="trace existing sandboxes until stopped",
        description="Trace cgroup subtrees, process subtrees, or the whole host until "
        "Ctrl-C or SIGTERM.",
        epilog=EXAMPLES_WATCH,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_args(watch)
    _tail_args(watch)
    watch.add_argument(
        "--cgroup",
        action="append",
        default=[],
        metavar="PATH",
        help="trace this cgroup v2 directory and its subtree (repeatable)",
    )
    watch.add_argument(
        "--pid",
        action="append",
        type=int,
        default=[],
        metavar="PID",
        help="trace this process and all its descendants (repeatable)",
    )
    watch.add_argument("--all", action="store_true", help="trace every process on the host")
    serve_command.add_parser(sub)
    tail_command.add_parser(sub)
    return parser


def _tail_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tail-socket", metavar="PATH", default=DEFAULT_SOCKET,
                   help=f"serve `sandtrace tail` on this Unix socket, mode 0600 "
                   f"(default {DEFAULT_SOCKET})")  # fmt: skip
    p.add_argument("--no-tail", action="store_true", help="serve no live tail")


def _tail_sinks(hub: TailHub | None) -> list[Sink]:
    return [] if hub is None else [CallbackSink(hub.publish)]


async def _local_tail(
    hub: TailHub | None, path: str
) -> tuple[LocalTail | None, TailSocketError | None]:
    """The live tail on its Unix socket, before the startup line, so that a tail started
    after that line connects; or why not (said after that line: tracing goes on)."""
    if hub is None:
        return None, None
    local = LocalTail(hub, Path(path))
    try:
        await local.start()
    except TailSocketError as exc:
        return None, exc
    return local, None


def _say_no_tail(why: TailSocketError | None, *, busy_is_normal: bool = False) -> None:
    """Warn that there is no live tail; but several `run`s at once are normal, and the
    first one to start serves the socket (a debug log says so for the others)."""
    if why is None:
        return
    if busy_is_normal and isinstance(why, TailSocketBusy):
        log.debug("live tail served by another sandtrace", reason=str(why))
    else:
        log.warning("live tail disabled", reason=str(why))


@dataclass(slots=True)
class Session:
    """Everything one run/watch sets up, torn down in reverse whatever happens."""

    args: argparse.Namespace
    root: Path
    scopes: list[Scope] = field(default_factory=list)
    probes: object = None
    sandbox: cgroups.SandboxCgroup | None = None


def _color(args: argparse.Namespace) -> bool:
    if args.color == "always":
        return True
    if args.color == "never":
        return False
    return sys.stdout.isatty() and os.environ.get("NO_COLOR") is None


def _sinks(args: argparse.Namespace) -> list[Sink]:
    renderer = None if args.json else TextRenderer(color=_color(args), width=args.width)
    sinks: list[Sink] = [TerminalSink(sys.stdout, renderer, alerts_only=args.alerts_only)]
    if args.events:
        sinks.append(JsonFileSink(args.events))
    if args.alerts:
        sinks.append(JsonFileSink(args.alerts, alerts_only=True))
    return sinks


def _stream(args: argparse.Namespace) -> list[Sink]:
    if not args.server:
        return []
    token = None
    if args.server_token_file:
        try:
            token = read_token_file(args.server_token_file)
        except ValueError as exc:
            raise SystemExit(f"sandtrace: --server-token-file: {exc}") from None
    if args.spool_max <= 0:
        raise SystemExit("sandtrace: --spool-max must be a positive number of MiB")
    spool = args.spool_dir
    if spool is None and args.command == "watch":
        spool = DEFAULT_SPOOL  # a long-running collector; a run is one command's life
    if not 0 < args.server_linger <= 60:
        raise SystemExit("sandtrace: --server-linger is a number of seconds above 0, at most 60")
    try:
        return [StreamSink(args.server, token, ca_file=args.server_ca_file,
                           insecure=args.insecure, transport=args.server_transport,
                           linger=args.server_linger,
                           spool_dir=None if args.no_spool else spool,
                           spool_bytes=args.spool_max << 20)]  # fmt: skip
    except ValueError as exc:
        raise SystemExit(f"sandtrace: --server: {exc}") from None
    except OSError as exc:
        raise SystemExit(
            f"sandtrace: cannot use the spool directory {spool}: {exc} "
            "(choose another with --spool-dir, or --no-spool)"
        ) from None


def _engine(args: argparse.Namespace) -> Engine | None:
    """The detection engine with the built-in pack and the user's rules; refusals said."""
    if args.no_detect or args.server:
        return None  # with --server, the service detects
    paths = [] if args.no_builtin_rules else [BUILTIN_RULES]
    paths += [Path(r) for r in args.rules]
    for path in paths:
        if not path.exists():
            raise SystemExit(f"sandtrace: rules path {path} does not exist")
    rules = load_paths(paths)
    for where, why in rules.refused:
        print(f"sandtrace: rule not loaded: {where}: {why}", file=sys.stderr)
    try:
        egress = EgressPolicies.parse(args.egress_allow) if args.egress_allow else None
    except ValueError as exc:
        raise SystemExit(f"sandtrace: {exc}") from None
    return Engine(rules, egress)


def _detecting(engine: Engine | None, server: str | None = None) -> str:
    """What the startup line says about detection."""
    if server:
        return f"streaming to {server}"
    if engine is None:
        return "no detection"
    rules = engine.rules
    allow = f", egress allow-list of {len(engine.egress)}" if engine.egress else ""
    return f"{len(rules.rules)} rules, {len(rules.correlations)} correlations{allow}"


def _load_probes(args: argparse.Namespace, trace_all: bool = False) -> Probes:
    from probes import kernel  # noqa: PLC0415
    from probes.loader import ProbeConfig, Probes  # noqa: PLC0415

    features = kernel.check()
    for note in features.notes:
        print(f"sandtrace: {note}", file=sys.stderr)
    if args.ring_pages < 1 or args.ring_pages & (args.ring_pages - 1):
        raise SystemExit("sandtrace: --ring-pages must be a power of two")
    return Probes(
        ProbeConfig(
            ring_pages=args.ring_pages,
            trace_all=trace_all,
            perf_buffer=args.perf_buffer,
            connect_hooks=not args.no_connect_hook,
            bind_hooks=not args.no_bind_hook,
        ),
        features,
    )


def _print_totals(totals: Totals, sinks: list[Sink] | None = None) -> None:
    print(
        "sandtrace: " + totals_line(dict(totals.events), totals.lost_kernel, totals.lost_user),
        file=sys.stderr,
    )
    for sink in sinks or []:
        if isinstance(sink, StreamSink):
            st = sink.stats
            causes = " ".join(f"{k}={v}" for k, v in sorted(st.discarded_by.items()))
            why = f" ({causes})" if causes else ""
            print(f"sandtrace: streamed {st.sent_events} events in {st.sent_batches} batches "
                  f"to {sink.base_url}; discarded {st.discarded}{why}; "
                  f"{sink.spool_batches} batches left in the spool", file=sys.stderr)  # fmt: skip
    if totals.decode_errors or totals.map_errors:
        print(
            f"sandtrace: {totals.decode_errors} undecodable records, "
            f"{totals.map_errors} kernel map errors (tracking may be incomplete)",
            file=sys.stderr,
        )


def _assembler(root: Path, scopes: list[Scope]) -> Assembler:
    resolver = cgroups.CgroupResolver(root)
    return Assembler(scopes, resolver.path_of, cgroups.container_id_from_path, procs=ProcessTable())


def _install_stop(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def _wait_empty(sandbox: cgroups.SandboxCgroup) -> None:
    """Return once no process is left in the sandbox."""
    while sandbox.pids():
        time.sleep(0.1)


async def _run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise SystemExit("sandtrace run: give a command after --, e.g. sandtrace run -- ls")
    root = cgroups.find_cgroup2_root()
    probes = _load_probes(args)
    sandbox = None
    hub, local_tail = (None if args.no_tail else TailHub()), None
    try:
        sandbox = cgroups.create_sandbox(root)
        rel = "/" + str(sandbox.path.relative_to(root))
        scopes = [Scope(sandbox.name, [rel])]
        probes.trace_cgroup(sandbox.path, 0)
        assembler = _assembler(root, scopes)
        engine = _engine(args)
        pipeline = Pipeline(
            probes,
            assembler,
            [EscapeFollower(probes, root), *_sinks(args), *_stream(args), *_tail_sinks(hub)],
            engine=engine,
        )
        stop = asyncio.Event()
        local_tail, why_no_tail = await _local_tail(hub, args.tail_socket)
        print(
            f"sandtrace: tracing sandbox {sandbox.name} "
            f"(cgroup {rel}, {_detecting(engine, args.server)}) "
            f"running {' '.join(cmd)!r}; Ctrl-C stops",
            file=sys.stderr,
        )
        _say_no_tail(why_no_tail, busy_is_normal=True)
        runner = asyncio.create_task(pipeline.run(stop))
        try:
            child = await asyncio.create_subprocess_exec(*cmd, preexec_fn=sandbox.join)
        except OSError as exc:
            stop.set()
            await runner
            print(f"sandtrace: cannot start {cmd[0]}: {exc}", file=sys.stderr)
            return 127
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, child.send_signal, sig)
        code = await child.wait()
        if args.wait_all:
            await asyncio.to_thread(_wait_empty, sandbox)
        await asyncio.to_thread(sandbox.destroy)
        stop.set()
        totals = await runner
        _print_totals(totals, pipeline.sinks)
        return code if code >= 0 else 128 - code
    finally:
        if local_tail is not None:
            await local_tail.close()
        probes.close()
        if sandbox is not None:
            sandbox.destroy()


def _watch_scopes(
    args: argparse.Namespace, root: Path
) -> tuple[list[Scope], list[Path], list[tuple[int, int]]]:
    """The scopes to trace, the cgroup directories to hook and (pid, scope index) pairs."""
    scopes: list[Scope] = []
    cgroup_dirs: list[Path] = []
    if args.all:
        scopes.append(Scope("host", ["/"]))
        cgroup_dirs.append(root)
    for c in args.cgroup:
        path = Path(c).resolve()
        if not path.is_relative_to(root) or not (path / "cgroup.procs").exists():
            raise SystemExit(f"sandtrace watch: {c} is not a cgroup v2 directory under {root}")
        rel = "/" + str(path.relative_to(root))
        scopes.append(Scope(rel, [rel]))
        cgroup_dirs.append(path)
    pid_scopes: list[tuple[int, int]] = []
    for pid in args.pid:
        if not Path(f"/proc/{pid}").exists():
            raise SystemExit(f"sandtrace watch: no process {pid}")
        pid_scopes.append((pid, len(scopes)))
        scopes.append(Scope(f"pid-{pid}", []))
    if not scopes:
        defaults = cgroups.default_scopes(root)
        if not defaults:
            (root / "sandtrace").mkdir(exist_ok=True)
            defaults = [root / "sandtrace"]
        for path in defaults:
            rel = "/" + str(path.relative_to(root))
            scopes.append(Scope(rel, [rel]))
            cgroup_dirs.append(path)
    return scopes, cgroup_dirs, pid_scopes


async def _watch(args: argparse.Namespace) -> int:
    root = cgroups.find_cgroup2_root()
    scopes, cgroup_dirs, pid_scopes = await asyncio.to_thread(_watch_scopes, args, root)
    pids_by_scope = {index: cgroups.pids_in_subtree(path) for index, path in enumerate(cgroup_dirs)}
    pids_by_scope.update({index: _descendants(pid) for pid, index in pid_scopes})
    probes = _load_probes(args, trace_all=args.all)
    hub, local_tail = (None if args.no_tail else TailHub()), None
    try:
        for index, path in enumerate(cgroup_dirs):
            if args.all:
                probes.attach_cgroup(path)
            else:
                probes.trace_cgroup(path, index)
        for _pid, index in pid_scopes:
            for p in pids_by_scope[index]:
                with contextlib.suppress(OSError):
                    probes.attach_cgroup(root / _cgroup_of(p).lstrip("/"))
        if not args.all:
            for index, pids in pids_by_scope.items():
                probes.add_traced_pids(pids, index)
        assembler = _assembler(root, scopes)
        for pids in pids_by_scope.values():
            for p in pids:
                assembler.procs.seed_from_proc(p)
        held = await asyncio.to_thread(held_socket_events, assembler, pids_by_scope, root)
        engine = _engine(args)
        pipeline = Pipeline(
            probes,
            assembler,
            [EscapeFollower(probes, root), *_sinks(args), *_stream(args), *_tail_sinks(hub)],
            engine=engine,
        )
        stop = asyncio.Event()
        _install_stop(stop)
        what = ", ".join(s.name for s in scopes)
        local_tail, why_no_tail = await _local_tail(hub, args.tail_socket)
        print(
            f"sandtrace: watching {what} ({_detecting(engine, args.server)}); "
            "Ctrl-C or SIGTERM stops",
            file=sys.stderr,
        )
        _say_no_tail(why_no_tail)
        for event in held:
            pipeline.emit(event)
        totals = await pipeline.run(stop)
        _print_totals(totals, pipeline.sinks)
        return 0
    finally:
        if local_tail is not None:
            await local_tail.close()
        probes.close()


def _cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def _descendants(pid: int) -> set[int]:
    """pid and every live descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            _, ppid, _ = parse_stat((entry / "stat").read_bytes())
        except (OSError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(children.get(p, []))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    from probes.kernel import KernelSupportError  # noqa: PLC0415
    from probes.loader import ProbeError  # noqa: PLC0415

    try:
        if args.command == "run":
            return asyncio.run(_run(args))
        if args.command == "serve":
            return asyncio.run(serve_command.serve(args))
        if args.command == "tail":
            return tail_command.main(args)
        return asyncio.run(_watch(args))
    except (KernelSupportError, ProbeError, cgroups.CgroupError) as exc:
        print(f"sandtrace: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
