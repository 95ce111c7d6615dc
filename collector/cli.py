"""`sandtrace run` (a command in a fresh sandbox) and `sandtrace watch` (existing sandboxes):
the collector's lifetime, from loading the probes to the totals at the end."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit

import structlog

from api.endpoints import read_token_file
from api.render import TerminalSink, TextRenderer, line_width, totals_line, use_color
from collector import cgroups
from collector.args import DEFAULT_SPOOL
from collector.assemble import FLOW_HOLD_NS, Assembler, Scope
from collector.egresspolicy import EgressPolicySource
from collector.enrich import ExecEnricher
from collector.identity import Identities
from collector.packages import PackageIndex
from collector.packet_sockets import PacketSocketPoller
from collector.pipeline import (
    CallbackSink,
    EscapeFollower,
    JsonFileSink,
    Pipeline,
    Sink,
    Totals,
)
from collector.proctable import ProcessTable, descendants
from collector.response import Responder, TracedSandbox
from collector.startup import held_socket_events
from collector.stdio import StdioReader
from collector.stream import StreamSink
from collector.summary import RunSummary
from detect.egress import EgressPolicies
from detect.engine import Engine
from detect.pack import RulesPathError, load_rules, refusal_lines
from detect.policyfile import PolicyFileError
from fleet.connect import is_nats_url
from tail.hub import LocalTail, TailHub, TailSocketBusy, TailSocketError

if TYPE_CHECKING:
    from collector.enforce import Enforcer
    from probes.loader import Probes

log = structlog.get_logger("sandtrace")

EXIT_DISCARDED = 3  # run: CMD succeeded, but events were discarded on the way to --server


def _say(message: str) -> None:
    """A line for the user on stderr (logs go through structlog)."""
    print(f"sandtrace: {message}", file=sys.stderr, flush=True)


def _file_sink(option: str, path: str, *, alerts_only: bool = False) -> JsonFileSink:
    try:
        return JsonFileSink(path, alerts_only=alerts_only)
    except OSError as exc:
        raise SystemExit(f"sandtrace: cannot open {option} {path}: {exc.strerror or exc}") from None


def _sinks(args: argparse.Namespace) -> list[Sink]:
    sinks: list[Sink] = []
    if args.events:
        sinks.append(_file_sink("--events", args.events))
    if args.alerts:
        sinks.append(_file_sink("--alerts", args.alerts, alerts_only=True))
    renderer = (
        None
        if args.json
        else TextRenderer(
            color=use_color(args.color, sys.stdout), width=line_width(args.width, sys.stdout)
        )
    )
    return [TerminalSink(sys.stdout, renderer, alerts_only=args.alerts_only), *sinks]


def _stream(args: argparse.Namespace) -> list[Sink]:
    if not args.server:
        return []
    token = None
    if args.server_token_file and not is_nats_url(args.server):
        try:
            token = read_token_file(args.server_token_file)
        except ValueError as exc:
            raise SystemExit(f"sandtrace: --server-token-file: {exc}") from None
    spool = args.spool_dir
    if spool is None and args.command == "watch":
        spool = DEFAULT_SPOOL  # a long-running collector; a run is one command's life
    if is_nats_url(args.server):  # a fleet on NATS JetStream (collector/natsstream.py)
        from collector.natsstream import NatsStreamSink  # noqa: PLC0415

        try:
            return [
                NatsStreamSink(
                    args.server,
                    args.server_token_file,
                    nkey_file=args.server_nkey_file,
                    creds_file=args.server_creds_file,
                    ca_file=args.server_ca_file,
                    insecure=args.insecure,
                    linger=args.server_linger,
                    spool_dir=None if args.no_spool else spool,
                    spool_bytes=args.spool_max << 20,
                )
            ]
        except ValueError as exc:
            raise SystemExit(f"sandtrace: --server: {exc}") from None
        except OSError as exc:
            raise SystemExit(f"sandtrace: cannot use the spool directory {spool}: {exc}") from None
    try:
        urlsplit(args.server).port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise SystemExit(
            f"sandtrace: --server: {args.server!r} has no valid port (want "
            "http://HOST:PORT or https://HOST:PORT, PORT from 1 to 65535)"
        ) from None
    try:
        return [
            StreamSink(
                args.server,
                token,
                ca_file=args.server_ca_file,
                insecure=args.insecure,
                transport=args.server_transport,
                linger=args.server_linger,
                spool_dir=None if args.no_spool else spool,
                spool_bytes=args.spool_max << 20,
                notify=_say,
            )
        ]
    except ValueError as exc:
        raise SystemExit(f"sandtrace: --server: {exc}") from None
    except OSError as exc:
        raise SystemExit(
            f"sandtrace: cannot use the spool directory {spool}: {exc} "
            "(choose another with --spool-dir, or --no-spool)"
        ) from None


def _engine(args: argparse.Namespace, egress: EgressPolicySource | None = None) -> Engine | None:
    """The detection engine with the built-in pack and the user's rules, judging egress by
    `egress` (and by each policy it reloads); refusals said."""
    if args.no_detect or args.server:
        return None  # with --server, the service detects
    try:
        rules = load_rules(args.rules, builtin=not args.no_builtin_rules)
    except RulesPathError as exc:
        raise SystemExit(f"sandtrace: {exc}") from None
    for line in refusal_lines(rules):
        print(f"sandtrace: {line}", file=sys.stderr)
    if rules.refused:
        print(
            f"sandtrace: WARNING: {len(rules.refused)} rule(s) refused (listed above) will "
            "raise no alerts; fix or remove them",
            file=sys.stderr,
        )
    engine = Engine(rules, egress.policies if egress is not None else None)
    if egress is not None:
        egress.on_policy_change(partial(setattr, engine, "egress"))  # first: then the others
    return engine


def _egress(args: argparse.Namespace) -> EgressPolicySource | None:
    """The egress policy of --egress-allow and --resolver, or of --egress-policy; a bad
    entry, or options that would be ignored, end the command (exit 2) naming the problem
    (every problem of a policy file)."""
    given = [
        option
        for option, value in (
            ("--egress-allow", args.egress_allow),
            ("--resolver", args.resolver),
            ("--egress-check-loopback", args.egress_check_loopback),
            ("--egress-policy", args.egress_policy),
        )
        if value
    ]
    problems: list[str] = []
    if given and (args.server or args.no_detect) and not args.enforce:
        problems.append(
            f"{given[0]} has no effect with --server (the service checks egress: set "
            "[detection] egress_allow or egress_policy in its configuration)"
            if args.server
            else f"{given[0]} has no effect with --no-detect"
        )
    elif args.egress_policy and len(given) > 1:
        problems.append(
            "--egress-policy holds the whole policy: give "
            f"{', '.join(o for o in given if o != '--egress-policy')} in its file "
            "instead (allow, resolvers, check_loopback)"
        )
    elif args.egress_policy:
        try:
            return EgressPolicySource.from_file(Path(args.egress_policy))
        except PolicyFileError as exc:
            problems += [f"--egress-policy: {problem}" for problem in exc.problems]
    elif args.egress_check_loopback and not args.egress_allow:
        problems.append("--egress-check-loopback applies to an allow-list: give --egress-allow too")
    elif args.resolver and not args.egress_allow:
        problems.append(
            "--resolver applies to an egress allow-list: give --egress-allow too (or both "
            "in an --egress-policy file)"
        )
    elif args.egress_allow:
        loopback = not args.egress_check_loopback
        try:
            EgressPolicies.parse(args.egress_allow, allow_loopback=loopback)
        except ValueError as exc:
            problems.append(f"--egress-allow: {exc}")
        else:
            try:
                policies = EgressPolicies.parse(
                    args.egress_allow, allow_loopback=loopback, resolvers=args.resolver or ()
                )
            except ValueError as exc:
                problems.append(f"--resolver: {exc}")
            else:
                return EgressPolicySource(policies)
    for problem in problems:
        print(f"sandtrace: {problem}", file=sys.stderr)
    if problems:
        raise SystemExit(2)
    return None


def _enforcement(args: argparse.Namespace) -> bool:
    """Whether --enforce holds the sandboxes to their egress policy (that of --egress-allow
    and --resolver, or of --egress-policy: _egress parses it); options that cannot go
    together end the command (exit 2) naming the problem."""
    problem = None
    if not args.enforce:
        if args.dns_ttl_floor is not None:
            problem = "--dns-ttl-floor applies to --enforce"
    elif not (args.egress_allow or args.egress_policy):
        problem = (
            "--enforce holds each sandbox to its egress policy: give --egress-allow (names "
            "such as pypi.org or *.githubusercontent.com, networks, ports) or --egress-policy"
        )
    elif getattr(args, "all", False):
        problem = "--enforce applies to sandbox cgroups; watch --all traces the whole host"
    elif getattr(args, "pid", None):
        problem = "--enforce applies to sandbox cgroups (watch --cgroup), not to --pid"
    elif args.no_connect_hook:
        problem = "--enforce refuses connects in the connect hooks: drop --no-connect-hook"
    elif args.dns_ttl_floor is not None and not 0 <= args.dns_ttl_floor <= 86400:
        problem = f"--dns-ttl-floor {args.dns_ttl_floor:g}: expected seconds, 0 to 86400"
    if problem is not None:
        print(f"sandtrace: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return bool(args.enforce)


def _enforcer(
    args: argparse.Namespace,
    probes: Probes,
    scopes: dict[str, int],
    egress: EgressPolicySource | None,
) -> Enforcer | None:
    """With --enforce, the sandboxes (scope name -> index) held to their policies in the
    kernel, before their hooks are attached; a reload of --egress-policy (SIGHUP) gives the
    kernel the new policies too."""
    if not _enforcement(args) or egress is None:
        return None
    from collector.enforce import DEFAULT_TTL_FLOOR, EnforceError, Enforcer  # noqa: PLC0415

    floor = DEFAULT_TTL_FLOOR if args.dns_ttl_floor is None else args.dns_ttl_floor
    enforcer = Enforcer(probes.policy(), scopes, ttl_floor=floor)
    try:
        enforcer.apply(egress.policies)
    except EnforceError as exc:
        raise SystemExit(f"sandtrace: --enforce: {exc}") from None

    def reload(policies: EgressPolicies) -> None:
        try:
            enforcer.apply(policies)
        except EnforceError as exc:
            _say(f"SIGHUP: the kernel keeps enforcing the previous egress policy: {exc}")

    egress.on_policy_change(reload)
    held = [name for name in scopes if egress.policies.policy_for(name) is not None]
    _say(
        f"enforcing egress in the kernel for {', '.join(held) or 'no sandbox'} (DNS answers "
        f"allow their addresses for at least {floor:g} s); a clean stop lifts it"
    )
    return enforcer


def _package_index() -> PackageIndex:
    """The package digest index (dpkg, rpm, apk), built from now on in the background
    (while the probes compile: BCC's compiler does not hold the GIL), so that the first new
    executable finds it ready instead of holding up every event behind its exec while it is
    built (~0.3 s)."""
    packages = PackageIndex()
    if packages.available():
        threading.Thread(target=packages.warm, name="sandtrace-packages", daemon=True).start()
    return packages


def _enricher(packages: PackageIndex | None = None) -> ExecEnricher:
    """Exec identity and standard streams; a host without a package database is said once."""
    packages = packages or PackageIndex()
    if not packages.available():
        print(
            "sandtrace: no package database (dpkg, rpm, apk): renamed system binaries are"
            " recognised by name only",
            file=sys.stderr,
        )
    return ExecEnricher(Identities(packages if packages.available() else None), StdioReader())


def _detecting(
    engine: Engine | None, server: str | None = None, egress: EgressPolicySource | None = None
) -> str:
    """What the startup line says about detection."""
    if server:
        return f"streaming to {server}"
    if engine is None:
        return "no detection"
    rules = engine.rules
    allow = f", {egress.describe()}" if egress is not None else ""
    return f"{len(rules.rules)} rules, {len(rules.correlations)} correlations{allow}"


def _load_probes(args: argparse.Namespace, trace_all: bool = False) -> Probes:
    from probes import kernel  # noqa: PLC0415
    from probes.loader import ProbeConfig, Probes  # noqa: PLC0415

    features = kernel.check()
    for note in features.notes:
        _say(note)
    return Probes(
        ProbeConfig(
            ring_pages=args.ring_pages,
            trace_all=trace_all,
            perf_buffer=args.perf_buffer,
            connect_hooks=not args.no_connect_hook,
            enforce=args.enforce,
            bind_hooks=not args.no_bind_hook,
            loop_reads=True,  # the pipeline collects (Pipeline.run)
        ),
        features,
    )


def _print_refused(enforcer: Enforcer | None) -> None:
    """With --enforce, what the kernel refused, by kind (each was also an event, or a count
    on one)."""
    if enforcer is not None:
        counts = enforcer.kernel.denied()
        _say("refused in the kernel: " + " ".join(f"{k}={v}" for k, v in counts.items()))


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
            print(
                f"sandtrace: streamed {st.sent_events} events in {st.sent_batches} batches "
                f"to {sink.base_url}; discarded {st.discarded}{why}; "
                f"{sink.spool_batches} batches left in the spool",
                file=sys.stderr,
            )
    if totals.enrich:
        e = totals.enrich
        print(
            f"sandtrace: exec identity: {e['identity_hits']} cache hits, "
            f"{e['identity_misses']} files hashed ({e['identity_bytes_hashed'] / 2**20:.1f} MiB), "
            f"{e['identity_too_large']} too large to hash, {e['identity_failures']} unreachable; "
            f"stdio: {e['stdio_captured']} captured at exec, {e['stdio_inspected']} read, "
            f"{e['stdio_unknown']} gone, "
            f"{e['stdio_socket_lookups']} socket lookups ({e['stdio_socket_failures']} failed)",
            file=sys.stderr,
        )
    if totals.decode_errors or totals.map_errors:
        print(
            f"sandtrace: {totals.decode_errors} undecodable records, "
            f"{totals.map_errors} kernel map errors (tracking may be incomplete)",
            file=sys.stderr,
        )


@dataclass(slots=True)
class _Outputs:
    """What the command line asks for, built (files opened, rules loaded, the service's URL
    checked) before the probes compile, so that a mistake is said at once, not seconds
    later after the compile."""

    engine: Engine | None
    sinks: list[Sink]  # terminal, files, service
    egress: EgressPolicySource | None  # the engine's egress policy

    @classmethod
    def build(cls, args: argparse.Namespace) -> _Outputs:
        egress = _egress(args)
        engine = _engine(args, egress)
        stream = _stream(args)  # before the terminal's header: its refusals come alone
        return cls(engine, [*_sinks(args), *stream], egress)

    def discarded(self) -> int:
        """Events discarded on the way to the service (never to arrive there)."""
        return sum(s.stats.discarded for s in self.sinks if isinstance(s, StreamSink))


def _check_response(args: argparse.Namespace) -> None:
    """--kill-on and --freeze-on act inside sandboxes: refused where there are none."""
    if not (args.kill_on or args.freeze_on):
        return
    if getattr(args, "all", False):
        raise SystemExit(
            "sandtrace: --kill-on and --freeze-on act inside sandboxes; --all traces the "
            "whole host (give --cgroup or --pid instead)"
        )
    if args.freeze_on and getattr(args, "pid", None) and not getattr(args, "cgroup", None):
        raise SystemExit(
            "sandtrace: --freeze-on freezes a sandbox's cgroup; a --pid scope has none of "
            "its own (trace the cgroup with --cgroup, or use --kill-on)"
        )
    if args.no_detect and not args.server:
        raise SystemExit(
            "sandtrace: --kill-on and --freeze-on act on alerts; --no-detect raises none"
        )


def _responder(
    args: argparse.Namespace, root: Path, scopes: list[Scope], host: str
) -> Responder | None:
    """The responder of --kill-on/--freeze-on, knowing the sandboxes it may act on; with
    --server, also the one that takes the service's orders (refusing them, reported, when
    neither option was given)."""
    if not (args.kill_on or args.freeze_on or args.server):
        return None
    sandboxes = {}
    for scope in scopes:
        dirs = [root / rel.lstrip("/") for rel in scope.cgroup_paths if rel != "/"]
        root_pid = int(scope.name[4:]) if scope.name.startswith("pid-") else 0
        if dirs or root_pid:
            sandboxes[scope.name] = TracedSandbox(dirs, root_pid)
    return Responder(
        sandboxes,
        root,
        host=host,
        kill_on=args.kill_on,
        freeze_on=args.freeze_on,
        say=_say,
        embedded=not args.server,
    )


def _tail_notice(args: argparse.Namespace, engine: Engine | None) -> str:
    """What a local tail is told when it cannot get alerts from here (empty when it can)."""
    if args.server:
        return (
            f"detection runs in the service at {args.server}; alerts are not available here "
            f"(follow them with: sandtrace tail --server {args.server})"
        )
    if engine is None:
        return "detection is off in this collector (--no-detect); alerts are not available here"
    return ""


class _Tracing:
    """What `run` and `watch` share, built in one place: the pipeline from the probes to
    every sink (terminal, files, service, live tail) and the live tail's socket."""

    def __init__(
        self,
        args: argparse.Namespace,
        probes: Probes,
        root: Path,
        scopes: list[Scope],
        packages: PackageIndex,
        *,
        outputs: _Outputs,
    ) -> None:
        resolver = cgroups.CgroupResolver(root)
        self.assembler = Assembler(
            scopes,
            resolver.path_of,
            cgroups.container_id_from_path,
            procs=ProcessTable(),
            flow_hold_ns=FLOW_HOLD_NS if probes.classifies_flows else 0,
        )
        self.engine = outputs.engine
        self.egress = outputs.egress
        self.detecting = _detecting(self.engine, args.server, self.egress)
        self.hub = None if args.no_tail else TailHub(notice=_tail_notice(args, self.engine))
        sinks = [EscapeFollower(probes, root), *outputs.sinks]
        if self.hub is not None:
            sinks.append(CallbackSink(self.hub.publish))
        self.enricher = _enricher(packages)
        self.responder = _responder(args, root, scopes, self.assembler.host)
        if self.responder is not None:
            sinks.insert(0, self.responder)  # acts first; reports after the others have it
            for sink in outputs.sinks:
                if isinstance(sink, StreamSink):
                    sink.on_order = self.responder.order_from_service
        # Without kprobes, packet sockets are looked up in /proc instead of seen being made.
        pollers = []
        if not probes.features.packet_kprobe:
            pollers.append(PacketSocketPoller(self.assembler, root).poll)
        self.pipeline = Pipeline(
            probes,
            self.assembler,
            sinks,
            engine=self.engine,
            enricher=self.enricher,
            pollers=pollers,
        )
        if self.responder is not None:
            self.responder.out = self.pipeline.emit
        self.tail_socket = Path(args.tail_socket)
        self.local_tail: LocalTail | None = None
        self._reloads: set[asyncio.Task[None]] = set()

    def on_policy_change(self, callback: Callable[[EgressPolicies], None]) -> None:
        """Call `callback` with the new egress policies after each reload of the policy
        file (the engine already judges by them); nothing without --egress-policy."""
        if self.egress is not None:
            self.egress.on_policy_change(callback)

    def reload_on_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        """With --egress-policy, SIGHUP re-reads the file (tracing goes on meanwhile; a file
        with problems keeps the policy in use, and they are said). Without it SIGHUP keeps
        its default action."""
        source = self.egress
        if source is None or source.path is None:
            return

        async def reload() -> None:
            problems = await source.reload()
            for problem in problems:
                _say(f"SIGHUP: {problem}")
            if problems:
                _say(
                    f"SIGHUP: {source.path} not reloaded ({_problems(len(problems))}, listed "
                    "above); the previous egress policy stays"
                )
            else:
                _say(f"SIGHUP: {source.describe()}")

        def reload_soon() -> None:
            task = loop.create_task(reload())
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload_soon)
        # With --enforce, what holds the sandboxes to their policies in the kernel:
        # enforcer.apply(policies) takes new ones at any time (a reload).
        self.enforcer: Enforcer | None = None

    async def serve_tail(self) -> TailSocketError | None:
        """Serve the live tail on its Unix socket before the startup line, so that a tail
        started after that line connects; or say why not (tracing goes on without it)."""
        if self.hub is None:
            return None
        local = LocalTail(self.hub, self.tail_socket)
        try:
            await local.start()
        except TailSocketError as exc:
            return exc
        self.local_tail = local
        return None

    async def close(self) -> None:
        if self.local_tail is not None:
            await self.local_tail.close()


def _problems(n: int) -> str:
    return f"{n} problem" if n == 1 else f"{n} problems"


def _say_no_tail(why: TailSocketError | None, *, busy_is_normal: bool = False) -> None:
    """Warn that there is no live tail; but several `run`s at once are normal, and the
    first one to start serves the socket (a debug log says so for the others)."""
    if why is None:
        return
    if busy_is_normal and isinstance(why, TailSocketBusy):
        log.debug("live tail served by another sandtrace", reason=str(why))
    else:
        log.warning("live tail disabled", reason=str(why))


def _wait_empty(sandbox: cgroups.SandboxCgroup) -> None:
    """Return once no process is left in the sandbox."""
    while sandbox.pids():
        time.sleep(0.1)


async def _run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise SystemExit("sandtrace: run: give a command after --, e.g. sandtrace run -- ls")
    root = cgroups.find_cgroup2_root()
    command_output = _command_output(args)
    outputs = _Outputs.build(args)
    packages = _package_index()
    probes = _load_probes(args)
    sandbox = None
    tracing = None
    try:
        sandbox = cgroups.create_sandbox(root)
        rel = "/" + str(sandbox.path.relative_to(root))
        enforcer = _enforcer(args, probes, {sandbox.name: 0}, outputs.egress)
        probes.trace_cgroup(sandbox.path, 0)
        tracing = _Tracing(
            args, probes, root, [Scope(sandbox.name, [rel])], packages, outputs=outputs
        )
        tracing.enforcer = enforcer
        summary = RunSummary(detecting=tracing.engine is not None)
        tracing.pipeline.sinks.append(summary)
        stop = asyncio.Event()
        why_no_tail = await tracing.serve_tail()
        print(
            f"sandtrace: tracing sandbox {sandbox.name} (cgroup {rel}, {tracing.detecting}) "
            f"running {' '.join(cmd)!r}; Ctrl-C stops",
            file=sys.stderr,
        )
        _say_no_tail(why_no_tail, busy_is_normal=True)
        runner = asyncio.create_task(tracing.pipeline.run(stop))
        tracing.reload_on_sighup(asyncio.get_running_loop())  # before CMD can ask for one
        try:
            child = await asyncio.create_subprocess_exec(
                *cmd, preexec_fn=sandbox.join, stdout=command_output
            )
        except OSError as exc:
            stop.set()
            await runner
            _say(f"cannot start {cmd[0]}: {exc.strerror or exc}")
            return 127
        finally:
            if command_output is not None and not isinstance(command_output, int):
                command_output.close()  # the child has its own copy
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, child.send_signal, sig)
        code = await child.wait()
        if args.wait_all:
            await asyncio.to_thread(_wait_empty, sandbox)
        if tracing.responder is not None:
            await tracing.responder.aclose()
        await asyncio.to_thread(sandbox.destroy)
        stop.set()
        totals = await runner
        _print_totals(totals, tracing.pipeline.sinks)
        _print_refused(tracing.enforcer)
        summary.report(sys.stderr, args.summary)
        if code == 0 and outputs.discarded():
            _say(
                f"exit status {EXIT_DISCARDED}: {cmd[0]} succeeded, but "
                f"{outputs.discarded()} events never reached {args.server}"
            )
            return EXIT_DISCARDED
        return code if code >= 0 else 128 - code
    finally:
        if tracing is not None:
            await tracing.close()
        probes.close()
        if sandbox is not None:
            sandbox.destroy()


def _command_output(args: argparse.Namespace) -> IO[bytes] | int | None:
    """Where CMD's stdout goes: --command-output FILE; with --json, stderr (stdout is for
    JSON lines only, so that `run --json | jq` reads nothing else); else stdout."""
    if args.command_output:
        try:
            return Path(args.command_output).open("wb")  # closed once CMD has started
        except OSError as exc:
            raise SystemExit(
                f"sandtrace: cannot open --command-output {args.command_output}: "
                f"{exc.strerror or exc}"
            ) from None
    if args.json:
        return sys.stderr.fileno()
    return None


def _cgroup_dir(spec: str, root: Path) -> Path:
    """The cgroup v2 directory --cgroup names: its directory, its path under the cgroup
    root as sandtrace's startup line prints it (/sandtrace/st-1a2b3c4d, or without the
    leading slash), or its cgroup id (the directory's inode number)."""
    path = cgroups.named_cgroup(spec, root, allow_root=True)
    if path is not None:
        return path
    raise SystemExit(
        f"sandtrace: watch --cgroup {spec!r}: no such cgroup v2 directory under {root} (give "
        f"its directory, its path under {root} such as /sandtrace/st-1a2b3c4d, or its cgroup "
        "id)"
    )


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
        path = _cgroup_dir(c, root)
        rel = "/" + str(path.relative_to(root)) if path != root else "/"
        scopes.append(Scope(rel, [rel]))
        cgroup_dirs.append(path)
    pid_scopes: list[tuple[int, int]] = []
    for pid in args.pid:
        if not Path(f"/proc/{pid}").exists():
            raise SystemExit(f"sandtrace: watch --pid {pid}: no such process")
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
    pids_by_scope.update({index: descendants(pid) for pid, index in pid_scopes})
    outputs = _Outputs.build(args)
    packages = _package_index()
    probes = _load_probes(args, trace_all=args.all)
    tracing = None
    try:
        enforcer = _enforcer(
            args,
            probes,
            {s.name: i for i, s in enumerate(scopes) if s.cgroup_paths},
            outputs.egress,
        )
        for index, path in enumerate(cgroup_dirs):
            if args.all:
                probes.attach_cgroup(path)
            else:
                probes.trace_cgroup(path, index)
        for _pid, index in pid_scopes:
            for p in pids_by_scope[index]:
                with contextlib.suppress(OSError):
                    probes.attach_cgroup(root / cgroups.cgroup_of(p).lstrip("/"))
        if not args.all:
            for index, pids in pids_by_scope.items():
                probes.add_traced_pids(pids, index)
        tracing = _Tracing(args, probes, root, scopes, packages, outputs=outputs)
        tracing.enforcer = enforcer
        for pids in pids_by_scope.values():
            for p in pids:
                tracing.assembler.procs.seed_from_proc(p)
        held = await asyncio.to_thread(held_socket_events, tracing.assembler, pids_by_scope, root)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tracing.reload_on_sighup(loop)
        why_no_tail = await tracing.serve_tail()
        what = ", ".join(s.name for s in scopes)
        print(
            f"sandtrace: watching {what} ({tracing.detecting}); Ctrl-C or SIGTERM stops",
            file=sys.stderr,
        )
        _say_no_tail(why_no_tail)
        for event in held:
            tracing.pipeline.emit(event)
        totals = await tracing.pipeline.run(stop)
        _print_totals(totals, tracing.pipeline.sinks)
        _print_refused(tracing.enforcer)
        return 0
    finally:
        if tracing is not None:
            await tracing.close()
        probes.close()


def main(args: argparse.Namespace) -> int:
    """Run `sandtrace run` or `sandtrace watch` with parsed arguments."""
    from probes.kernel import KernelSupportError  # noqa: PLC0415
    from probes.loader import ProbeError  # noqa: PLC0415

    _egress(args)  # a bad entry is said before the probes compile
    _enforcement(args)
    _check_response(args)
    try:
        return asyncio.run(_run(args) if args.command == "run" else _watch(args))
    except (KernelSupportError, ProbeError, cgroups.CgroupError) as exc:
        _say(str(exc))
        return 2
