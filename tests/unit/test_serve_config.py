"""`sandtrace serve` configuration (TOML + command line, --check-config), TLS between the
collector and the service, and replay state that survives a service restart."""

from __future__ import annotations

import argparse
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from api.events import AnyEvent, Event, LostEvent
from collector.stream import StreamSink
from detect.engine import Engine
from detect.loader import load_paths
from detect.pack import builtin_rules
from detect.ruleset import RuleSet
from detect.testing import event_from_fields
from sandtrace.cli import build_parser
from service.app import Ingest, make_app
from service.config import ConfigError, ServiceConfig, check, load, tls_context
from service.main import REFUSED_HINT, build_config, prepare
from service.metrics import IngestMetrics, exposition
from tests.serving import ROOT_DIR, free_port, serving
from tests.tlsutil import make_tls


def serve_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandtrace", "serve", *args],
        check=False,
        cwd=ROOT_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_check_config_accepts_a_complete_file(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls", ["127.0.0.1"])
    token = write(tmp_path / "token", "s3cret\n")
    conf = write(
        tmp_path / "service.toml",
        f"""
[server]
listen = "0.0.0.0:8790"
token_file = "{token}"
tls_cert = "{tls.cert}"
tls_key = "{tls.key}"
state_dir = "{tmp_path / "state"}"

[detection]
egress_allow = ["10.0.0.0/8", "box-1=192.0.2.0/24:443"]

[[output]]
type = "jsonl"
path = "{tmp_path / "alerts.jsonl"}"
what = "alerts"
""",
    )
    done = serve_cmd("--config", str(conf), "--check-config")
    assert done.returncode == 0, done.stderr
    assert "configuration OK" in done.stderr
    assert "listen 0.0.0.0:8790 https" in done.stderr
    assert "2 egress allow-list entries, 1 outputs" in done.stderr
    assert (tmp_path / "state").is_dir()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[server]\nlisten = "127.0.0.1:1"\nlisen = 3\n', "[server] lisen: unknown key (expected"),
        (
            "[servr]\n",
            "[servr]: unknown table (expected one of [server], [detection], [response], [tail]",
        ),
        (
            '[server]\nread_timeout = "soon"\n',
            "[server] read_timeout: 'soon' is a string; expected a number of seconds",
        ),
        ('[server]\nlisten = "nowhere"\n', "[server] listen: 'nowhere': expected HOST:PORT"),
        (
            '[server]\nlisten = "192.0.2.1:8780"\n',
            "[server] listen: 192.0.2.1 is not loopback and there is no TLS",
        ),
        (
            '[server]\ntoken_file = "/nonexistent/token"\n',
            "[server] token_file: cannot read /nonexistent/token",
        ),
        (
            '[server]\ntls_cert = "/nonexistent.pem"\n',
            "[server] tls_cert: given without tls_key: tls_cert and tls_key go together",
        ),
        (
            '[detection]\negress_allow = ["not a net"]\n',
            "[detection] egress_allow: egress allow-list entry 'not a net'",
        ),
        (
            '[detection]\negress_allow = ["192.0.2.0/24:99999"]\n',
            "[detection] egress_allow: egress allow-list entry '192.0.2.0/24:99999': port 99999 "
            "is out of range (expected ports 1-65535",
        ),
        (
            "[detection]\negress_check_loopback = true\n",
            "[detection] egress_check_loopback: applies to an egress allow-list, and there is none",
        ),
        (
            '[detection]\nrules = ["/nonexistent/rules"]\n',
            "[detection] rules: /nonexistent/rules does not exist",
        ),
        ("[detection]\nfold_seconds = -1\n", "[detection] fold_seconds: -1: expected 0"),
        ("[tail]\nqueue = 1.5\n", "[tail] queue: 1.5 is a float; expected an integer"),
        (
            '[detection]\nrules = ["a", 1]\n',
            "[detection] rules: ['a', 1] is an array with an integer; expected a list of strings",
        ),
        (
            '[[output]]\ntype = "carrier-pigeon"\n',
            "[[output]] #1 type: 'carrier-pigeon' is not an output type",
        ),
        ('[output]\ntype = "jsonl"\n', "[output]: is a table; expected [[output]] tables"),
        ("server = [\n", "not valid TOML"),
    ],
)
def test_check_config_names_what_is_wrong(tmp_path: Path, toml: str, message: str) -> None:
    conf = write(tmp_path / "service.toml", toml)
    done = serve_cmd("--config", str(conf), "--check-config")
    assert done.returncode == 2
    assert f"configuration error: {conf}: {message}" in done.stderr, done.stderr


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    conf = write(tmp_path / "service.toml", '[server]\nlisten = "192.0.2.1:8780"\n')
    done = serve_cmd("--config", str(conf), "--listen", "127.0.0.1:8791", "--check-config")
    assert done.returncode == 0, done.stderr
    assert "listen 127.0.0.1:8791 http" in done.stderr
    done = serve_cmd("--config", str(conf), "--insecure", "--check-config")
    assert done.returncode == 0 and "clear text on 192.0.2.1" in done.stderr


def test_config_keys_land_where_they_should(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "s.toml",
        "[server]\nread_timeout = 5\n[tail]\nqueue = 7\n"
        "clients = 3\n[detection]\nbuiltin_rules = false\nfold_seconds = 0\n",
    )
    cfg = load(conf)
    assert (
        cfg.read_timeout,
        cfg.tail_queue,
        cfg.tail_clients,
        cfg.builtin_rules,
        cfg.fold_seconds,
    ) == (5.0, 7, 3, False, 0)
    with pytest.raises(ConfigError, match="cannot load"):
        tls_context(ServiceConfig(tls_cert=str(conf), tls_key=str(conf)))
    assert check(ServiceConfig()) == [
        "no token_file: any client that reaches the port may send and tail events",
        "no state_dir: after a restart, a batch in flight may be handled twice",
    ]


def connect_events(n: int, start: int = 0) -> list[AnyEvent]:
    return [
        event_from_fields("network_connection", {"ProcessId": start + i, "DestinationPort": 9})
        for i in range(n)
    ]


@pytest.mark.asyncio
async def test_collector_streams_over_tls_and_refuses_an_unknown_certificate(
    tmp_path: Path,
) -> None:
    tls = make_tls(tmp_path / "ok", ["127.0.0.1"])
    other = make_tls(tmp_path / "other", ["127.0.0.1"], name="other")
    received: list[AnyEvent] = []
    ingest = Ingest(RuleSet(), on_batch=lambda _c, _s, evs: received.extend(evs))
    runner = web.AppRunner(make_app(ingest, "tok"))
    await runner.setup()
    port = free_port()
    ctx = tls_context(ServiceConfig(tls_cert=str(tls.cert), tls_key=str(tls.key)))
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    try:
        untrusting = StreamSink(
            f"https://127.0.0.1:{port}", "tok", linger=0.05, ca_file=str(other.ca), max_backoff=0.1
        )
        for event in connect_events(5):
            untrusting.emit(event)
        await untrusting.aclose(deadline=1.0)
        assert received == [] and untrusting.stats.retries > 0
        assert untrusting.stats.sent_events == 0

        trusting = StreamSink(f"https://127.0.0.1:{port}", "tok", linger=0.05, ca_file=str(tls.ca))
        for event in connect_events(5, start=100):
            trusting.emit(event)
        await trusting.aclose(deadline=10)
    finally:
        await runner.cleanup()
    assert [e.process.pid for e in received if isinstance(e, Event)] == list(range(100, 105))


def test_replay_state_survives_a_service_restart(tmp_path: Path) -> None:
    events = connect_events(3)
    first = Ingest(RuleSet(), state_dir=tmp_path)
    assert [first.handle("c1", seq, events) for seq in range(3)] == [1, 2, 3]  # tickets
    assert first.handle("c2", 0, events) == 4
    # a replay of a batch handled but not committed waits for the latest ticket
    assert first.handle("c1", 2, events) == 4
    first.commit(2)  # a prefix of what was handled: c1's batches 0 and 1, not c2's
    assert Ingest(RuleSet(), state_dir=tmp_path).last_seq == {"c1": 1}
    first.commit(4)
    first.commit(3)  # committed with 4 already: changes nothing
    assert Ingest(RuleSet(), state_dir=tmp_path).last_seq == {"c1": 2, "c2": 0}
    assert first.handle("c1", 2, events) == 0  # committed: acknowledged at once

    second = Ingest(RuleSet(), state_dir=tmp_path)  # the restarted service
    assert second.handle("c1", 2, events) == 0
    assert second.handle("c2", 0, events) == 0
    assert second.handle("c1", 3, events) == 1
    assert Ingest(RuleSet(), state_dir=tmp_path).last_seq == {"c1": 2, "c2": 0}  # not committed
    second.commit(1)
    assert second.stats.batches == {"replayed": 2, "accepted": 1}
    assert Ingest(RuleSet(), state_dir=tmp_path).last_seq == {"c1": 3, "c2": 0}


def test_metrics_show_collector_losses_spool_and_lag() -> None:
    ingest = Ingest(RuleSet())
    lost = LostEvent(
        time_ns=0,
        host="h1",
        kernel={"exec": 3, "connect": 4},
        user=2,
        errors={},
        spool=50,
        collector="h1/ab",
    )
    events = connect_events(2)
    for e in events:
        if isinstance(e, Event):
            e.host = "h1"
            e.time_ns = time.time_ns()
    assert ingest.handle("h1/ab", 0, [lost, *events])
    ingest.note_collector("h1/ab", spool_bytes=4096, held_batches=3)
    text = exposition(IngestMetrics(ingest.stats))
    lines = set(text.splitlines())
    assert 'sandtrace_collector_lost_total{cause="kernel",host="h1"} 7.0' in lines
    assert 'sandtrace_collector_lost_total{cause="user",host="h1"} 2.0' in lines
    assert 'sandtrace_collector_lost_total{cause="spool",host="h1"} 50.0' in lines
    assert 'sandtrace_collector_spool_bytes{collector="h1/ab",host="h1"} 4096.0' in lines
    assert 'sandtrace_collector_held_batches{collector="h1/ab",host="h1"} 3.0' in lines
    assert 'sandtrace_collector_last_seq{collector="h1/ab",host="h1"} 0.0' in lines
    assert 'sandtrace_events_received_total{host="h1"} 3.0' in lines
    # one batch; its oldest event (the LostEvent, time 0) is decades old
    assert "sandtrace_batch_lag_seconds_count 1.0" in lines
    assert 'sandtrace_batch_lag_seconds_bucket{le="60"} 0.0' in lines
    assert 'sandtrace_batch_lag_seconds_bucket{le="+Inf"} 1.0' in lines
    assert ingest.handle("h1/ab", 1, events)  # fresh events: under a second old
    lines = set(exposition(IngestMetrics(ingest.stats)).splitlines())
    assert 'sandtrace_batch_lag_seconds_bucket{le="1"} 1.0' in lines
    assert "sandtrace_batch_lag_seconds_count 2.0" in lines


def test_serve_runs_with_tls_from_config_and_stops(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls", ["127.0.0.1"])
    conf = write(tmp_path / "s.toml", f'[server]\ntls_cert = "{tls.cert}"\ntls_key = "{tls.key}"\n')
    with serving(["--config", str(conf)], scheme="https") as svc:
        assert f"serving on https://127.0.0.1:{svc.port}" in svc.log()
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        with urllib.request.urlopen(f"{svc.url}/healthz", context=ctx, timeout=10) as resp:  # noqa: S310
            assert resp.status == 200
        assert svc.stop() == 0


def test_an_event_the_engine_fails_on_is_counted_and_the_batch_goes_on() -> None:
    class Fragile(Engine):
        def feed(self, event: AnyEvent) -> list[Any]:
            if isinstance(event, Event) and event.process.pid == 1:
                raise RuntimeError("boom")
            return super().feed(event)

    seen: list[int] = []
    ingest = Ingest(
        load_paths([builtin_rules()]),
        engine_factory=Fragile,
        on_alert=lambda a: seen.append(a.process.pid),
    )
    miners = [
        event_from_fields(
            "process_creation",
            {
                "Image": "/tmp/x",
                "ProcessId": pid,
                "CommandLine": "x -o stratum+tcp://192.0.2.1:3333",
            },
        )
        for pid in range(3)
    ]
    assert ingest.handle("c", 0, miners)
    assert ingest.stats.rejected == {"unprocessable_event": 1}
    assert sorted(set(seen)) == [0, 2]  # the events around the bad one were detected


@pytest.mark.parametrize(("fold", "expected"), [(None, 1), (0, 3)])
def test_fold_seconds_decides_whether_repeats_are_one_alert(
    tmp_path: Path, fold: int | None, expected: int
) -> None:
    """Three miner execs of one process: each rule they match alerts once under the default
    60 s fold (the repeats summed at shutdown), three times with detection.fold_seconds = 0."""
    import json  # noqa: PLC0415
    from collections import Counter  # noqa: PLC0415

    from api.wire import encode_batch  # noqa: PLC0415

    alerts = tmp_path / "alerts.jsonl"
    setting = "" if fold is None else f"[detection]\nfold_seconds = {fold}\n"
    conf = write(tmp_path / "s.toml", setting)
    miners = [
        event_from_fields(
            "process_creation",
            {"Image": "/tmp/x", "ProcessId": 7, "CommandLine": "x -o stratum+tcp://192.0.2.1:3333"},
        )
        for _ in range(3)
    ]
    with serving(["--config", str(conf), "--alerts", str(alerts)]) as svc:
        request = urllib.request.Request(  # noqa: S310 - the test's own service
            f"{svc.url}/v1/batches",
            method="POST",
            data=encode_batch("c1", 0, miners),
            headers={"Content-Type": "application/msgpack"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
            assert resp.status == 200
        assert svc.stop() == 0
    docs = [json.loads(line) for line in alerts.read_text().splitlines()]
    per_rule = Counter(d["rule_id"] for d in docs if not d["repeat"])
    assert per_rule and set(per_rule.values()) == {expected}, per_rule


REFUSED_RULE = """title: a Windows rule
logsource: {product: windows, category: process_creation}
detection: {s: {Image: x.exe}, condition: s}
"""


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_every_problem_is_reported_at_once_with_its_file_table_and_key(tmp_path: Path) -> None:
    """One run names them all: the file's tables and keys (outputs counted from 1), the
    settings given on the command line by their option, and what each expects."""
    not_a_cert = write(tmp_path / "ca.pem", "not a certificate\n")
    log = tmp_path / "alerts.jsonl"
    conf = write(
        tmp_path / "s.toml",
        f"""
[server]
read_timeout = "soon"
colour = "blue"
[detection]
fold_seconds = -1
egress_allow = ["10.0.0.0/8:0", "192.0.2.1:443"]
[[output]]
type = "jsonl"
path = "{log}"
[[output]]
type = "syslog"
name = "siem"
address = "siem:6514"
tls = true
ca_file = "{not_a_cert}"
queue = "big"
""",
    )
    with pytest.raises(ConfigError) as info:
        prepare(serve_args("--config", str(conf), "--listen", "nowhere", "--alerts", str(log)))
    problems = info.value.problems
    cert_problem = next(p for p in problems if "ca_file" in p)
    assert cert_problem.startswith(
        f"{conf}: [[output]] #2 (siem) ca_file: {not_a_cert} holds no usable certificate"
    )
    assert [p for p in problems if p != cert_problem] == [
        f"{conf}: [server] read_timeout: 'soon' is a string; expected a number of seconds",
        f"{conf}: [server] colour: unknown key (expected one of listen, token_file, tls_cert, "
        "tls_key, insecure, state_dir, read_timeout)",
        "--listen: 'nowhere': expected HOST:PORT with a port 1-65535, e.g. 0.0.0.0:8780",
        f"{conf}: [detection] fold_seconds: -1: expected 0 (every alert alone) or more seconds",
        f"{conf}: [detection] egress_allow: egress allow-list entry '10.0.0.0/8:0': port 0 is "
        "out of range (expected ports 1-65535: one (443), a range (8000-8100) or a list "
        "(80,443))",
        f"{conf}: [[output]] #2 (siem) queue: 'big' is a string; expected an integer",
        f"--alerts path: {log} is also written by {conf}: [[output]] #1; expected a file of its "
        "own for each output",
    ]
    assert str(info.value).startswith(f"{len(problems)} problems:\n  {conf}: [server]")


def test_a_refused_rule_is_an_error_unless_accepted_knowingly(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    write(rules / "windows.yml", REFUSED_RULE)
    conf = write(tmp_path / "s.toml", f'[detection]\nrules = ["{rules}"]\n')
    with pytest.raises(ConfigError) as info:
        prepare(serve_args("--config", str(conf)))
    (problem,) = info.value.problems
    assert problem.startswith(
        f"{conf}: [detection] rules: {rules / 'windows.yml'}: a Windows rule: rule refused: "
        "log source product=windows"
    )
    assert info.value.hints == [REFUSED_HINT]
    with pytest.raises(ConfigError, match=r"^--rules: .*windows\.yml: a Windows rule: rule"):
        prepare(serve_args("--rules", str(rules)))
    # accepted: by the option, or by the key in [detection]; the refusal is kept, not lost
    accepted = prepare(serve_args("--config", str(conf), "--allow-refused-rules"))
    assert [where for where, _ in accepted.rules.refused] == [
        f"{rules / 'windows.yml'}: a Windows rule"
    ]
    write(conf, f'[detection]\nrules = ["{rules}"]\nallow_refused_rules = true\n')
    assert len(prepare(serve_args("--config", str(conf))).rules.refused) == 1
    # the built-in pack alone loads whole
    assert prepare(serve_args()).rules.refused == []


def test_egress_settings_reach_the_policies(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "s.toml",
        '[detection]\negress_allow = ["192.0.2.0/24:8000-8100"]\negress_check_loopback = true\n',
    )
    egress = prepare(serve_args("--config", str(conf))).egress
    assert egress is not None and egress.default is not None
    assert not egress.default.allow_loopback
    assert [egress.default.allows("192.0.2.1", p) for p in (7999, 8000, 8100, 8101)] == [
        False,
        True,
        True,
        False,
    ]
    assert not egress.default.allows("127.0.0.1", 5432)
    by_option = prepare(serve_args("--egress-allow", "192.0.2.0/24", "--egress-check-loopback"))
    assert by_option.egress is not None and by_option.egress.default is not None
    assert not by_option.egress.default.allow_loopback
    default = prepare(serve_args("--egress-allow", "192.0.2.0/24")).egress
    assert default is not None and default.default is not None
    assert default.default.allows("127.0.0.1", 5432)
    with pytest.raises(ConfigError, match=r"^--egress-allow: egress allow-list entry 'x y:1'"):
        prepare(serve_args("--egress-allow", "x y:1"))


def test_relative_paths_in_the_file_are_beside_it(tmp_path: Path) -> None:
    """As in systemd's credentials directory: the file and the secrets it names together."""
    conf = write(
        tmp_path / "s.toml",
        '[server]\ntoken_file = "token"\ntls_cert = "/abs/cert.pem"\nstate_dir = "state"\n'
        '[detection]\nrules = ["rules", "/abs/rules"]\n'
        '[[output]]\ntype = "jsonl"\npath = "alerts.jsonl"\n'
        '[[output]]\ntype = "jsonl"\npath = "-"\n'
        '[[output]]\ntype = "syslog"\naddress = "h:6514"\ntls = true\nca_file = "ca.pem"\n',
    )
    cfg = load(conf)
    assert (cfg.token_file, cfg.tls_cert, cfg.state_dir) == (
        str(tmp_path / "token"),
        "/abs/cert.pem",
        str(tmp_path / "state"),
    )
    assert cfg.rules == [str(tmp_path / "rules"), "/abs/rules"]
    assert [o.get("path") or o.get("ca_file") for o in cfg.outputs] == [
        str(tmp_path / "alerts.jsonl"),
        "-",
        str(tmp_path / "ca.pem"),
    ]
    # on the command line, a relative path is the working directory's, as everywhere
    cfg, problems = build_config(serve_args("--config", str(conf), "--token-file", "tok"))
    assert (cfg.token_file, cfg.where("token_file"), problems) == ("tok", "--token-file", [])


def test_run_and_watch_say_loudly_that_rules_were_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from collector.cli import _engine  # noqa: PLC0415

    write(tmp_path / "windows.yml", REFUSED_RULE)
    for argv in (
        ["run", "--rules", str(tmp_path), "--", "true"],
        ["watch", "--rules", str(tmp_path)],
    ):
        engine = _engine(build_parser().parse_args(argv))
        assert engine is not None and len(engine.rules.rules) > 0
        err = capsys.readouterr().err.splitlines()
        assert err == [
            f"sandtrace: rule not loaded: {tmp_path / 'windows.yml'}: a Windows rule: log source "
            "product=windows category=process_creation service=None is not one sandtrace "
            "provides (product linux, categories dns_query, kernel_interface, network_connection, "
            "network_listen, process_creation)",
            "sandtrace: WARNING: 1 rule(s) refused (listed above) will raise no alerts; fix or "
            "remove them",
        ]
