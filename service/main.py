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
from detect.engine import Engine, Matcher
from detect.loader import load_paths
from detect.pack import builtin_rules
from detect.policyfile import PolicyFileError, read_policy_file
from detect.ruleset import RuleSet
from service.config import ConfigError, ServiceConfig, check, load, read, read_token, tls_context

if TYPE_CHECKING:
    from service.app import Gate, Ingest
    from service.outputs.base import Output

log = structlog.get_logger("sandtrace.service")


def build_config(args: argparse.Namespace) -> tuple[ServiceConfig, list[str]]:
    """Defaults, then the file, then the command line; and every problem with the file's
    keys (ConfigError only when the file cannot be read or is not TOML)."""
    cfg, problems = read(args.config) if args.config else (ServiceConfig(), [])
    for attr in ("listen", "token_file", "tls_cert", "tls_key", "state_dir", "insecure"):
        value = getattr(args, attr)
        if value is not None:
            setattr(cfg, attr, value)
            cfg.origins[attr] = "--" + attr.replace("_", "-")
    for attr in ("rules", "egress_allow"):
        extra = getattr(args, attr)
        if extra:
            option = "--" + attr.replace("_", "-")
            before = cfg.origins.get(attr)
            cfg.origins[attr] = f"{before} and {option}" if getattr(cfg, attr) else option
            setattr(cfg, attr, [*getattr(cfg, attr), *extra])
    for attr in ("kill_on", "freeze_on"):
        if getattr(args, attr, None):
            setattr(cfg, attr, getattr(args, attr))
            cfg.origins[attr] = "--" + attr.replace("_", "-")
    for attr in ("allow_refused_rules", "egress_check_loopback"):
        if getattr(args, attr):
            setattr(cfg, attr, True)
            cfg.origins[attr] = "--" + attr.replace("_", "-")
    if args.no_builtin_rules:
        cfg.builtin_rules = False
    for path, what in ((args.alerts, "alerts"), (args.events, "events")):
        if path:
            cfg.outputs.append({"type": "jsonl", "path": path, "what": what, "name": f"--{what}"})
            cfg.output_origins.append(f"--{what}")
    return cfg, problems


def load_rules(cfg: ServiceConfig) -> RuleSet:
    """The built-in pack and the rules the configuration names (those that exist: check
    says which do not)."""
    paths = ([builtin_rules()] if cfg.builtin_rules else []) + [
        Path(r) for r in cfg.rules if Path(r).exists()
    ]
    return load_paths(paths)


REFUSED_HINT = (
    "a refused rule raises no alerts: fix it or remove it, or accept refused rules knowingly "
    "with --allow-refused-rules ([detection] allow_refused_rules = true)"
)


def refused_problems(cfg: ServiceConfig, rules: RuleSet) -> list[str]:
    """A problem for each rule that did not load, unless refused rules are accepted."""
    if cfg.allow_refused_rules:
        return []
    return [f"{cfg.where('rules')}: {where}: rule refused: {why}" for where, why in rules.refused]


def egress_of(cfg: ServiceConfig) -> EgressPolicies | None:
    """The egress policies: of egress_allow and resolvers, or of the egress_policy file;
    ConfigError naming every bad entry."""
    where = cfg.where("egress_allow")
    if cfg.egress_policy:
        others = [
            cfg.where(attr)
            for attr in ("egress_allow", "resolvers", "egress_check_loopback")
            if getattr(cfg, attr)
        ]
        if others:
            raise ConfigError(
                f"{cfg.where('egress_policy')}: the policy file holds the whole policy "
                f"(expected {' and '.join(others)} in the file instead: allow, resolvers, "
                "check_loopback)"
            )
        try:
            return read_policy_file(Path(cfg.egress_policy))
        except PolicyFileError as exc:
            raise ConfigError(
                [f"{cfg.where('egress_policy')}: {problem}" for problem in exc.problems]
            ) from None
    if not cfg.egress_allow:
        for attr in ("egress_check_loopback", "resolvers"):
            if getattr(cfg, attr):
                raise ConfigError(
                    f"{cfg.where(attr)}: applies to an egress allow-list, and there is none "
                    f"(expected {where} entries too, or no {attr})"
                )
        return None
    loopback = not cfg.egress_check_loopback
    problems = []
    for spec in cfg.egress_allow:
        try:
            EgressPolicies.parse([spec], allow_loopback=loopback)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    if problems:
        raise ConfigError(problems)
    for spec in cfg.resolvers:
        try:
            EgressPolicies.parse(cfg.egress_allow, allow_loopback=loopback, resolvers=[spec])
        except ValueError as exc:
            problems.append(f"{cfg.where('resolvers')}: {exc}")
    if problems:
        raise ConfigError(problems)
    return EgressPolicies.parse(cfg.egress_allow, allow_loopback=loopback, resolvers=cfg.resolvers)


def reload_egress(
    policy_file: str, engines: Callable[[], Iterable[Engine]], holder: list[EgressPolicies | None]
) -> None:
    """SIGHUP: the egress_policy file read again and put in every engine `engines` gives (and
    in holder[0], which engines made later take); a file with problems keeps the policy in
    use, and they are said. Without a policy file there is nothing to re-read: the service
    says so and goes on (SIGHUP does not end it)."""
    if not policy_file:
        _say(["SIGHUP: no [detection] egress_policy to re-read; nothing changed"])
        return
    try:
        policies = read_policy_file(Path(policy_file))
    except PolicyFileError as exc:
        n = len(exc.problems)
        _say(f"SIGHUP: {problem}" for problem in exc.problems)
        _say(
            [
                f"SIGHUP: {policy_file} not reloaded ({n} problem{'s' if n != 1 else ''}, "
                "listed above); the previous egress policy stays"
            ]
        )
        return
    holder[0] = policies
    for engine in engines():
        engine.egress = policies
    _say([f"SIGHUP: egress policy {policy_file} of {len(policies)}"])


def build_outputs(cfg: ServiceConfig) -> list[Output]:
    """The outputs; ConfigError naming every problem with them."""
    from service.outputs.config import OutputConfigError, outputs_from_config  # noqa: PLC0415

    try:
        return outputs_from_config(cfg.outputs, list(cfg.output_origins))
    except OutputConfigError as exc:
        raise ConfigError(exc.problems) from None


def _say(lines: Iterable[str]) -> None:
    for text in lines:
        for line in text.splitlines():
            print(f"sandtrace: {line}", file=sys.stderr)


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
    """The configuration and all it names, checked; ConfigError listing every problem
    (the settings, the files they name, refused rules, egress entries, outputs)."""
    cfg, problems = build_config(args)
    notes: list[str] = []
    try:
        notes = check(cfg)
    except ConfigError as exc:
        problems += exc.problems
    rules = load_rules(cfg)
    refused = refused_problems(cfg, rules)
    problems += refused
    egress = outputs = None
    try:
        egress = egress_of(cfg)
    except ConfigError as exc:
        problems += exc.problems
    try:
        outputs = build_outputs(cfg)
    except ConfigError as exc:
        problems += exc.problems
    if problems or outputs is None:
        raise ConfigError(problems, [REFUSED_HINT] if refused else [])
    # check() found no problem: the token and the TLS material load
    return Prepared(cfg, notes, read_token(cfg), tls_context(cfg), rules, egress, outputs)


def check_config(args: argparse.Namespace) -> int:
    """--check-config: every check the service makes before serving; 0 when all pass."""
    try:
        p = prepare(args)
    except ConfigError as exc:
        _say([f"configuration error: {exc}"])
        return 2
    _say(f"note: {n}" for n in p.notes)
    _say(
        f"warning: rule refused, accepted (allow_refused_rules): {where}: {why}"
        for where, why in p.rules.refused
    )
    host, port = p.cfg.host_port
    refused = f" ({len(p.rules.refused)} refused)" if p.rules.refused else ""
    _say(
        [
            f"configuration OK ({p.cfg.source}): listen {host}:{port} "
            f"{'https' if p.cfg.tls else 'http'}, {len(p.rules.rules)} rules{refused}, "
            f"{len(p.rules.correlations)} correlations, "
            f"{len(p.egress) if p.egress else 0} egress allow-list entries"
            f"{' (loopback checked)' if p.cfg.egress_check_loopback else ''}, "
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
    matchers: dict[type, Matcher] = {}  # compiled once, shared by every host's engine
    current_egress = [egress]  # the policy engines made from now on take (SIGHUP)
    ingest = Ingest(
        rules,
        on_alert=on_alert,
        on_batch=on_batch,
        state_dir=state,
        engine_factory=lambda r: Engine(r, current_egress[0], cfg.fold_seconds, matchers),
        kill_on=cfg.kill_on or None,
        freeze_on=cfg.freeze_on or None,
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
    expiry: asyncio.Task[None] | None = None
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
        loop.add_signal_handler(
            signal.SIGHUP,
            reload_egress,
            cfg.egress_policy,
            ingest.engines.values,
            current_egress,
        )
        scheme = "https" if ssl_ctx else "http"
        _say(
            [
                f"serving on {scheme}://{host}:{port} ({len(rules.rules)} rules, "
                f"{len(outputs)} outputs, {'token required' if token else 'no token'}); "
                "Ctrl-C or SIGTERM stops"
            ]
        )
        expiry = asyncio.create_task(expire_every_second(ingest, gate if gate else None))
        await stop.wait()
    finally:
        if expiry is not None:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
        if hub is not None:
            with contextlib.suppress(Exception):
                await hub.aclose()
        await runner.cleanup()
        ingest.flush()  # folded repeats still pending
        last = ingest.new_ticket()  # the files' ends after these, kept for the next start
        gate.end_batch(last)
        # each output gets the same few seconds to deliver what it holds, at the same time
        await asyncio.gather(*(out.aclose(5.0) for out in outputs))
        # what every file finished is handled for good; an output that could not finish
        # (counted as dropped) keeps the batches after it to be sent again
        ingest.commit(min((o.resolved for o in gate.outputs), default=last), gate.points)
    return 0


EXPIRY_INTERVAL = 1.0


async def expire_every_second(ingest: Ingest, gate: Gate | None) -> None:
    """Every second, what the engines hold that is over ends (Ingest.expire): repeat
    summaries go out while the service runs, to every output and the tails like any alert,
    and are committed as a batch is (a crash afterwards does not take them back from the
    files). A failure is logged and the next second tries again."""
    failed = False
    while True:
        await asyncio.sleep(EXPIRY_INTERVAL)
        try:
            if not ingest.expire():
                continue
            ticket = ingest.new_ticket()
            if gate is not None:
                gate.end_batch(ticket)
                await gate.settle(ticket)
            ingest.commit(ticket, gate.points if gate is not None else None)
        except Exception as exc:  # a bug: logged (the first with its traceback), not fatal
            if failed:
                log.error("expiring the engines failed again", error=repr(exc))  # noqa: TRY400
            else:
                log.exception("expiring the engines failed", error=repr(exc))
            failed = True


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
