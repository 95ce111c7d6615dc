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
from typing import TYPE_CHECKING

import structlog

from api.events import Alert, AnyEvent
from detect.egress import EgressPolicies
from detect.engine import Engine
from detect.loader import load_paths
from detect.pack import builtin_rules
from detect.ruleset import RuleSet
from service.config import ConfigError, ServiceConfig, check, load, read_token, tls_context

if TYPE_CHECKING:
    from service.outputs.base import Output

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
            cfg.outputs.append({"type": "jsonl", "path": path, "what": what, "name": f"--{what}"})
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


def build_outputs(cfg: ServiceConfig) -> list[Output]:
    from service.outputs.config import OutputConfigError, outputs_from_config  # noqa: PLC0415

    try:
        return outputs_from_config(cfg.outputs)
    except OutputConfigError as exc:
        raise ConfigError(f"output: {exc}") from None


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
    outputs: list[Output]


def prepare(args: argparse.Namespace) -> Prepared:
    """The configuration and all it names, checked; ConfigError on the first problem."""
    cfg = build_config(args)
    notes = check(cfg)
    return Prepared(
        cfg,
        notes,
        read_token(cfg),
        tls_context(cfg),
        load_rules(cfg),
        egress_of(cfg),
        build_outputs(cfg),
    )


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
    _say(
        [
            f"configuration OK ({p.cfg.source}): listen {host}:{port} "
            f"{'https' if p.cfg.tls else 'http'}, {len(p.rules.rules)} rules, "
            f"{len(p.rules.correlations)} correlations, "
            f"{len(p.egress) if p.egress else 0} egress allow-list entries, "
            f"{len(p.outputs)} outputs ({', '.join(o.name for o in p.outputs) or 'none'}), "
            f"tail {'on' if p.cfg.tail else 'off'}"
        ]
    )
    return 0


async def serve(args: argparse.Namespace) -> int:
    from aiohttp import web  # noqa: PLC0415

    from service.app import Ingest, make_app  # noqa: PLC0415
    from service.outputs.jsonl import OutputGate, take_back  # noqa: PLC0415
    from service.outputs.metrics import OutputMetrics  # noqa: PLC0415
    from tail.hub import TailHub  # noqa: PLC0415

    if getattr(args, "nats", None) or (args.config and _has_fleet(args.config)):
        from service.fleet import serve_fleet  # noqa: PLC0415

        return await serve_fleet(args)
    if args.check_config:
        return check_config(args)
    try:
        p = prepare(args)
    except ConfigError as exc:
        _say([f"configuration error: {exc}", "check it with: sandtrace serve --check-config"])
        return 2
    _say(f"note: {n}" for n in p.notes)
    _say(f"rule not loaded: {where}: {why}" for where, why in p.rules.refused)
    cfg, token, ssl_ctx, rules, egress, outputs = (
        p.cfg,
        p.token,
        p.ssl_ctx,
        p.rules,
        p.egress,
        p.outputs,
    )
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

    state = Path(cfg.state_dir) if cfg.state_dir else None
    # Ingest allocates some 50 short-lived objects per event and frees them a batch later:
    # collect the young generation every 50,000 allocations, not every 700, and keep the
    # rules and compiled matchers (alive for good) out of the collector's full scans.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    ingest = Ingest(
        rules,
        on_alert=on_alert,
        on_batch=on_batch,
        state_dir=state,
        engine_factory=lambda r: Engine(r, egress, cfg.fold_seconds),
    )
    if ingest.state is not None:  # before the files open: see outputs.jsonl.OutputGate
        _say(take_back(outputs, ingest.state.outputs))
    app = make_app(
        ingest,
        token,
        cfg.read_timeout,
        tail=hub,
        metrics=[OutputMetrics(outputs)],
        gate=gate if gate else None,
        failpoint=failpoint(),
    )
    for out in outputs:
        await out.start()
    runner = web.AppRunner(app)
    await runner.setup()
    host, port = cfg.host_port
    try:
        try:
            await web.TCPSite(runner, host, port, ssl_context=ssl_ctx).start()
        except OSError as exc:
            _say(
                [
                    f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another "
                    "service running there? choose another with --listen)"
                ]
            )
            return 2
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        scheme = "https" if ssl_ctx else "http"
        _say(
            [
                f"serving on {scheme}://{host}:{port} ({len(rules.rules)} rules, "
                f"{len(outputs)} outputs, {'token required' if token else 'no token'}); "
                "Ctrl-C or SIGTERM stops"
            ]
        )
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


def _has_fleet(path: Path) -> bool:
    """Whether a configuration file has a [fleet] url: then serve runs as a fleet worker."""
    try:
        return bool(load(path).fleet.get("url"))
    except ConfigError:
        return False  # prepare() says what is wrong with it


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
