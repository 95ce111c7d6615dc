"""`sandtrace serve`: the detection service's command line, configuration and lifetime.

Settings come from the built-in defaults, then the TOML file given with --config
(service/config.py), then the command line. `--check-config` loads and checks everything
(files, TLS material, rules, outputs) and exits without serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import ssl
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from api.events import Alert, AnyEvent
from detect.egress import EgressPolicies
from detect.engine import Engine
from detect.loader import load_paths
from detect.pack import builtin_rules
from detect.ruleset import RuleSet
from service.config import ConfigError, ServiceConfig, check, load, read_token, tls_context

log = structlog.get_logger("sandtrace.service")


def build_config(args: argparse.Namespace) -> ServiceConfig:
    """Defaults, then the file, then the command line."""
    cfg = load(args.config) if args.config else ServiceConfig()
    for attr in ("listen", "token_file", "tls_cert", "tls_key", "state_dir", "insecure"):
        value = getattr(args, attr)
        if value is not None:
            setattr(cfg, attr, value)
    if args.rules:
        cfg.rules = [*cfg.rules, *args.rules]
    if args.no_builtin_rules:
        cfg.builtin_rules = False
    if args.egress_allow:
        cfg.egress_allow = [*cfg.egress_allow, *args.egress_allow]
    for path, what in ((args.alerts, "alerts"), (args.events, "events")):
        if path:
            cfg.outputs.append({"type": "jsonl", "path": path, "what": what,
                                "name": f"--{what}"})  # fmt: skip
    return cfg


def load_rules(cfg: ServiceConfig) -> RuleSet:
    paths = ([builtin_rules()] if cfg.builtin_rules else []) + [Path(r) for r in cfg.rules]
    return load_paths(paths)


def egress_of(cfg: ServiceConfig) -> EgressPolicies | None:
    if not cfg.egress_allow:
        return None
    try:
        return EgressPolicies.parse(cfg.egress_allow)
    except ValueError as exc:
        raise ConfigError(f"detection.egress_allow: {exc}") from None


def build_outputs(cfg: ServiceConfig) -> list[Any]:
    from service.outputs import OutputConfigError, outputs_from_config  # noqa: PLC0415

    try:
        return outputs_from_config(cfg.outputs)
    except OutputConfigError as exc:
        raise ConfigError(f"output: {exc}") from None


class OutputGate:
    """Acknowledge a batch once the file outputs that keep up have written what it gave them.

    The service hands a batch's events and alerts to every output, then marks the batch's
    end on each JSON-lines output (Output.mark) and, before acknowledging, waits until each
    has finished everything up to that mark. A file output that does not get there within
    `wait` seconds (a full disk) is not waited on again until it has caught up on its own, so
    it holds ingestion up for one `wait` at most. Network outputs (syslog, HEC,
    Elasticsearch) are not waited on: a round trip to a SIEM per batch would bound every
    collector's rate by the SIEM's latency. Their bounded queues, retries and drop counters
    account for their items.

    points() says where in each file the acknowledged batches end; the replay state keeps it
    so that a restarted service can take back lines of batches it never acknowledged
    (JsonlOutput.take_back), which keeps the files exactly once across a crash.
    """

    WAITED_ON = frozenset({"jsonl"})

    def __init__(self, outputs: list[Any], wait: float = 1.0) -> None:
        self.all = outputs
        self.outputs = [o for o in outputs if o.output_type in self.WAITED_ON]
        self.wait = wait
        self.lagging = [False] * len(self.outputs)
        self.progress = asyncio.Event()
        for out in self.outputs:
            out.on_progress = self.progress.set

    def __bool__(self) -> bool:
        return bool(self.outputs)

    def submit(self, item: Alert | AnyEvent) -> None:
        for out in self.all:
            out.submit(item)

    def end_batch(self, ticket: int) -> None:
        """Everything of batch `ticket` has been submitted."""
        for out in self.outputs:
            out.mark(ticket)

    async def settle(self, ticket: int) -> None:
        """Return once every output that keeps up has finished batch `ticket`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while True:
            self.progress.clear()  # before looking: progress made after this still wakes us
            behind = False
            for i, out in enumerate(self.outputs):
                if out.resolved >= ticket:
                    self.lagging[i] = False
                elif not self.lagging[i]:
                    behind = True
            if not behind:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                for i, out in enumerate(self.outputs):
                    if out.resolved < ticket and not self.lagging[i]:
                        self.lagging[i] = True
                        log.warning("output falls behind; batches are acknowledged without "
                                    "waiting for it", output=out.name)  # fmt: skip
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), remaining)

    def points(self, ticket: int) -> dict[str, list[int] | None]:
        """Each output file's end of batch `ticket`, by path; None for a file that has not
        finished it (falling behind). Forgets the points of earlier batches."""
        out: dict[str, list[int] | None] = {}
        for o in self.outputs:
            point = o.point_at(ticket)
            if o.state_key is not None:
                out[o.state_key] = list(point) if point else None
            o.forget_points(ticket)
        return out


def take_back(outputs: list[Any], saved: dict[str, Any]) -> list[str]:
    """Cut each JSON-lines file back to where the last acknowledged batch ended (see
    OutputGate); what was done, for the log."""
    notes = []
    for out in outputs:
        if out.state_key not in saved:
            continue
        point = saved[out.state_key]
        if point is None:
            notes.append(
                f"output {out.name}: it was behind when the last batch was "
                "acknowledged; lines of unacknowledged batches may appear twice"
            )
            continue
        note = out.take_back(tuple(point))
        if note:
            notes.append(f"output {out.name}: {note}")
    return notes


def _say(lines: Iterable[str]) -> None:
    for line in lines:
        print(f"sandtrace serve: {line}", file=sys.stderr)


@dataclass(slots=True)
class Prepared:
    """Everything the service needs, loaded and checked; nothing started yet."""

    cfg: ServiceConfig
    notes: list[str]
    token: str | None
    ssl_ctx: ssl.SSLContext | None
    rules: RuleSet
    egress: EgressPolicies | None
    outputs: list[Any]


def prepare(args: argparse.Namespace) -> Prepared:
    """The configuration and all it names, checked; ConfigError on the first problem."""
    cfg = build_config(args)
    notes = check(cfg)
    return Prepared(cfg, notes, read_token(cfg), tls_context(cfg), load_rules(cfg),
                    egress_of(cfg), build_outputs(cfg))  # fmt: skip


def check_config(args: argparse.Namespace) -> int:
    """--check-config: every check the service makes before serving; 0 when all pass."""
    try:
        p = prepare(args)
    except ConfigError as exc:
        _say([f"configuration error: {exc}"])
        return 2
    _say(f"note: {n}" for n in p.notes)
    _say(f"rule not loaded: {where}: {why}" for where, why in p.rules.refused)
    host, port = p.cfg.host_port
    _say([
        f"configuration OK ({p.cfg.source}): listen {host}:{port} "
        f"{'https' if p.cfg.tls else 'http'}, {len(p.rules.rules)} rules, "
        f"{len(p.rules.correlations)} correlations, "
        f"{len(p.egress) if p.egress else 0} egress allow-list entries, "
        f"{len(p.outputs)} outputs ({', '.join(o.name for o in p.outputs) or 'none'}), "
        f"tail {'on' if p.cfg.tail else 'off'}"
    ])  # fmt: skip
    return 0


async def serve(args: argparse.Namespace) -> int:
    from aiohttp import web  # noqa: PLC0415

    from service.app import Ingest, make_app  # noqa: PLC0415
    from tail.hub import TailHub  # noqa: PLC0415

    if args.check_config:
        return check_config(args)
    try:
        p = prepare(args)
    except ConfigError as exc:
        _say([f"configuration error: {exc}", "check it with: sandtrace serve --check-config"])
        return 2
    _say(f"note: {n}" for n in p.notes)
    _say(f"rule not loaded: {where}: {why}" for where, why in p.rules.refused)
    cfg, token, ssl_ctx, rules, egress, outputs = (p.cfg, p.token, p.ssl_ctx, p.rules,
                                                   p.egress, p.outputs)  # fmt: skip
    hub = TailHub(max_queue=cfg.tail_queue, max_clients=cfg.tail_clients) if cfg.tail else None
    gate = OutputGate(outputs)

    def on_alert(alert: Alert) -> None:
        gate.submit(alert)
        if hub is not None:
            hub.publish(alert)

    def on_batch(_collector: str, _seq: int, events: list[AnyEvent]) -> None:
        if outputs:
            for event in events:
                gate.submit(event)
        if hub is not None and hub.subscribers:
            for event in events:
                hub.publish(event)

    def output_metrics() -> list[str]:
        from service.outputs import prometheus_lines  # noqa: PLC0415

        lines: list[str] = prometheus_lines(outputs)
        return lines

    state = Path(cfg.state_dir) if cfg.state_dir else None
    # Ingest allocates some 50 short-lived objects per event and frees them a batch later:
    # collect the young generation every 50,000 allocations, not every 700, and keep the
    # rules and compiled matchers (alive for good) out of the collector's full scans.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    ingest = Ingest(rules, on_alert=on_alert, on_batch=on_batch, state_dir=state,
                    engine_factory=lambda r: Engine(r, egress, cfg.fold_seconds))  # fmt: skip
    if ingest.state is not None:  # before the files open: see OutputGate
        _say(take_back(outputs, ingest.state.outputs))
    app = make_app(ingest, token, cfg.read_timeout, tail=hub, extra_metrics=output_metrics,
                   gate=gate if gate else None, failpoint=failpoint())  # fmt: skip
    for out in outputs:
        await out.start()
    runner = web.AppRunner(app)
    await runner.setup()
    host, port = cfg.host_port
    try:
        try:
            await web.TCPSite(runner, host, port, ssl_context=ssl_ctx).start()
        except OSError as exc:
            _say([f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another service "
                  "running there? choose another with --listen)"])  # fmt: skip
            return 2
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        scheme = "https" if ssl_ctx else "http"
        _say([f"serving on {scheme}://{host}:{port} ({len(rules.rules)} rules, "
              f"{len(outputs)} outputs, {'token required' if token else 'no token'}); "
              "Ctrl-C or SIGTERM stops"])  # fmt: skip
        await stop.wait()
    finally:
        if hub is not None:
            with contextlib.suppress(Exception):
                await hub.aclose()
        await runner.cleanup()
        for engine in ingest.engines.values():  # folded repeats still pending
            for alert in engine.flush():
                on_alert(alert)
        last = ingest.new_ticket()  # the files' ends after these, kept for the next start
        gate.end_batch(last)
        # each output gets the same few seconds to deliver what it holds, at the same time
        await asyncio.gather(*(out.aclose(5.0) for out in outputs))
        # what every file finished is handled for good; an output that could not finish
        # (counted as dropped) keeps the batches after it to be sent again
        ingest.commit(min((o.resolved for o in gate.outputs), default=last), gate.points)
    return 0


def failpoint() -> Callable[[int, int], None] | None:
    """For tests only: SANDTRACE_FAILPOINT=kill-before-commit:alerts>=N makes the service
    SIGKILL itself once a batch that brought its alerts to N or more is in the outputs but
    not yet committed (the window a crash is most likely to leave half done);
    kill-before-commit:ticket=N does it at batch ticket N."""
    spec = os.environ.get("SANDTRACE_FAILPOINT", "")
    what, _, value = spec.removeprefix("kill-before-commit:").partition("=")
    if not spec.startswith("kill-before-commit:") or what not in ("alerts>", "ticket"):
        if spec:
            log.warning("unknown failpoint ignored", failpoint=spec)
        return None
    if not value.isdigit():
        log.warning("failpoint without a number ignored", failpoint=spec)
        return None
    n = int(value)
    log.warning("failpoint armed: the service will kill itself", failpoint=spec)

    def hit(ticket: int, alerts: int) -> None:
        if (alerts if what == "alerts>" else ticket) >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    return hit
