"""SIEM outputs against real receivers: rsyslogd (TCP and TLS), an HTTP receiver speaking
Splunk HEC and Elasticsearch _bulk, files on a real, small tmpfs that runs full.

Everything listens on 127.0.0.1 only; every receiver, mount and process is removed after
the test, also when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from api.events import (
    Alert,
    AncestorRef,
    ConnectEvent,
    ExecEvent,
    LostEvent,
    Process,
    text_bytes,
)
from service.outputs.base import Output
from service.outputs.config import outputs_from_config
from service.outputs.metrics import prometheus_lines
from service.schemas.ecs import ecs
from service.schemas.native import native
from service.schemas.ocsf import ocsf
from tests.tlsutil import TLSFiles, make_tls
from tests.unit.test_schema_conformance import ecs_problems, ocsf_problems

T0 = 1_700_000_000_123_456_789
RSYSLOGD = "/usr/sbin/rsyslogd"
# What rsyslog writes for each message it receives: the header fields it parsed, the raw
# structured data and the message, separated by |.
RSYSLOG_TEMPLATE = (
    "%hostname%|%app-name%|%procid%|%msgid%|%pri%|%timereported:::date-rfc3339%|"
    "%structured-data%|%msg%\\n"
)


def process(pid: int = 4242, comm: bytes = b"curl", exe: bytes = b"/usr/bin/curl") -> Process:
    return Process(
        pid=pid,
        tid=pid,
        ns_pid=7,
        ppid=4000,
        uid=1000,
        gid=1000,
        comm=comm,
        start_ns=99,
        key=f"{pid}@99",
        exe=exe,
        argv=[b"curl", b"http://x/"],
        user="alice",
        group="alice",
        ancestry=[AncestorRef(pid=4000, key="4000@50", exe=b"/bin/bash", argv=[b"bash"])],
    )


def exec_event(pid: int = 4242, argv: list[bytes] | None = None, **kw: Any) -> ExecEvent:
    return ExecEvent(
        time_ns=T0 + pid,
        mono_ns=1,
        host="node1",
        sandbox="sb-1",
        cgroup_id=11,
        cgroup_path="/sandboxes/sb-1",
        container_id="c0ffee",
        process=process(pid, **kw),
        argv=argv if argv is not None else [b"curl", b"http://x/"],
        filename=b"/usr/bin/curl",
    )


def connect_event(pid: int = 4242) -> ConnectEvent:
    return ConnectEvent(
        time_ns=T0,
        mono_ns=1,
        host="node1",
        sandbox="sb-1",
        cgroup_id=11,
        cgroup_path="/sandboxes/sb-1",
        container_id="c0ffee",
        process=process(pid),
        protocol="tcp",
        family="ipv4",
        daddr="203.0.113.10",
        dport=3333,
        saddr="198.51.100.2",
        sport=40000,
        outcome="success",
    )


def make_alert(rule_id: str = "r-1", level: str = "high") -> Alert:
    return Alert(
        alert_id="a-1",
        rule_id=rule_id,
        title='Miner "pool" [stratum]',
        level=level,
        tags=["attack.impact", "attack.t1496"],
        description="connects to a stratum port",
        time_ns=T0,
        host="node1",
        sandbox="sb-1",
        process=process(),
        events=[connect_event()],
    )


def lost_event() -> LostEvent:
    return LostEvent(time_ns=T0, host="node1", kernel={"exec": 2}, user=1, errors={}, spool=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_for(check: Callable[[], bool], within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


def file_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def dumped(doc: dict[str, Any]) -> Any:
    """doc as a receiver reads it back: through ASCII JSON."""
    return json.loads(json.dumps(doc, ensure_ascii=True))


# --- rsyslogd ------------------------------------------------------------------------------


@dataclass
class Rsyslog:
    port: int
    out: Path
    proc: subprocess.Popen[bytes]

    def lines(self) -> list[str]:
        if not self.out.exists():
            return []
        return self.out.read_text().splitlines()

    def records(self) -> list[list[str]]:
        """Each received message as [hostname, app, procid, msgid, pri, time, sd, msg]."""
        return [line.split("|", 7) for line in self.lines()]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def run_rsyslogd(directory: Path, port: int, tls: TLSFiles | None = None) -> Iterator[Rsyslog]:
    """rsyslogd in the foreground with its own config, pid file and work directory, imtcp on
    127.0.0.1:port (TLS with gtls when tls is given), writing what it gets to a file."""
    directory.mkdir(parents=True, exist_ok=True)
    work = directory / "work"
    work.mkdir(exist_ok=True)
    out = directory / "received.log"
    conf = directory / "rsyslog.conf"
    glob = f'workDirectory="{work}" maxMessageSize="256k"'
    module = 'module(load="imtcp")'
    if tls is not None:
        glob += (
            f' defaultNetstreamDriverCAFile="{tls.ca}"'
            f' defaultNetstreamDriverCertFile="{tls.cert}"'
            f' defaultNetstreamDriverKeyFile="{tls.key}"'
        )
        module = (
            'module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" '
            'streamDriver.authMode="anon")'
        )
    conf.write_text(
        f"global({glob})\n"
        f"{module}\n"
        f'input(type="imtcp" port="{port}" address="127.0.0.1")\n'
        f'template(name="raw" type="string" string="{RSYSLOG_TEMPLATE}")\n'
        f'action(type="omfile" file="{out}" template="raw" flushOnTXEnd="on")\n'
    )
    log = (directory / "rsyslogd.log").open("wb")
    proc = subprocess.Popen(
        [RSYSLOGD, "-n", "-f", str(conf), "-i", str(directory / "rsyslogd.pid")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"rsyslogd did not listen on {port}: {(directory / 'rsyslogd.log').read_text()}"
                )
            time.sleep(0.05)
        yield Rsyslog(port=port, out=out, proc=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture
def tls(tmp_path: Path) -> TLSFiles:
    return make_tls(tmp_path / "tls", hosts=["127.0.0.1"])


@pytest_asyncio.fixture
async def started() -> AsyncIterator[Callable[[list[dict[str, Any]]], Awaitable[list[Output]]]]:
    """Make and start outputs from config sections; all are closed after the test."""
    made: list[Output] = []

    async def start(sections: list[dict[str, Any]]) -> list[Output]:
        outputs = outputs_from_config(sections)
        for o in outputs:
            await o.start()
            made.append(o)
        return outputs

    yield start
    for o in made:
        await o.aclose(deadline=0.5)


Start = Callable[[list[dict[str, Any]]], Awaitable[list[Output]]]


def syslog_fields(r: Rsyslog) -> list[tuple[str, ...]]:
    return [tuple(rec[:7]) for rec in r.records()]


@pytest.mark.asyncio
async def test_syslog_over_tcp_to_rsyslogd(tmp_path: Path, started: Start) -> None:
    # a real backslash before a bad byte, then b"a\\xffb" (a real backslash) and b"a\xffb"
    # (a real 0xff byte): apart in the output, and the exact bytes back (escaped text)
    argv = [b"sh", b"-c", b'\x1b[2J]"\\\xff', b"a\\xffb", b"a\xffb"]
    evil = exec_event(pid=31337, argv=argv, comm=b'x]"\xff')
    items: list[Any] = [make_alert(), evil, lost_event()]
    with run_rsyslogd(tmp_path / "rsyslog", free_port()) as rs:
        (out,) = await started(
            [
                {
                    "type": "syslog",
                    "address": f"127.0.0.1:{rs.port}",
                    "schema": "ecs",
                    "facility": "local0",
                    "app_name": "sandtrace",
                }
            ]
        )
        for item in items:
            out.submit(item)
        await wait_for(lambda: len(rs.lines()) == 3, what="3 messages in rsyslog's file")
    assert out.stats.sent == 3
    assert out.stats.dropped == {}
    assert syslog_fields(rs) == [
        (
            "node1",
            "sandtrace",
            "4242",
            "alert",
            "131",
            "2023-11-14T22:13:20.123456Z",
            '[sandtrace@32473 kind="alert" alert_id="a-1" rule_id="r-1" level="high" '
            'sandbox="sb-1" pid="4242" exe="/usr/bin/curl"]',
        ),
        (
            "node1",
            "sandtrace",
            "31337",
            "exec",
            "134",
            "2023-11-14T22:13:20.123488Z",
            '[sandtrace@32473 kind="exec" sandbox="sb-1" pid="31337" comm="x\\]\\"\\\\xff" '
            'exe="/usr/bin/curl"]',
        ),
        (
            "node1",
            "sandtrace",
            "-",
            "lost",
            "132",
            "2023-11-14T22:13:20.123456Z",
            '[sandtrace@32473 kind="lost" kernel="2" user="1" spool="0"]',
        ),
    ]
    messages = [json.loads(rec[7]) for rec in rs.records()]
    assert messages == [dumped(ecs(item)) for item in items]
    assert [ecs_problems(m) for m in messages] == [[], [], []]  # ECS 9.4.0 as it arrived
    assert messages[0]["rule"]["id"] == "r-1"
    assert messages[0]["event"]["kind"] == "alert"
    args = messages[1]["process"]["args"]
    assert args == ["sh", "-c", '\x1b[2J]"\\\\\\xff', "a\\\\xffb", "a\\xffb"]
    assert [text_bytes(a) for a in args] == argv


@pytest.mark.asyncio
async def test_syslog_reconnects_and_resends(tmp_path: Path, started: Start) -> None:
    port = free_port()
    (out,) = await started(
        [
            {
                "type": "syslog",
                "address": f"127.0.0.1:{port}",
                "schema": "native",
                "backoff": 0.05,
                "backoff_max": 0.2,
            }
        ]
    )
    for pid in (1001, 1002):
        out.submit(exec_event(pid))
    await wait_for(lambda: out.stats.errors["connect"] >= 2, what="failed connects")
    assert out.stats.sent == 0
    with run_rsyslogd(tmp_path / "rs1", port) as rs:
        await wait_for(lambda: len(rs.lines()) == 2, what="both messages after rsyslogd started")
        out.submit(exec_event(1003))
        await wait_for(lambda: len(rs.lines()) == 3, what="a third message")
    assert [rec[2] for rec in rs.records()] == ["1001", "1002", "1003"]
    assert json.loads(rs.records()[0][7]) == dumped(native(exec_event(1001)))
    assert out.stats.sent == 3
    assert out.stats.retries == out.stats.errors["connect"]
    # rsyslogd is gone (its FIN seen): the next message waits until a server is back.
    await asyncio.sleep(0.1)
    failed_connects = out.stats.errors["connect"]
    out.submit(exec_event(1004))
    await wait_for(
        lambda: out.stats.errors["connect"] >= failed_connects + 2, what="retries with no server"
    )
    assert out.depth() == 1
    assert out.stats.sent == 3
    with run_rsyslogd(tmp_path / "rs2", port) as rs2:
        await wait_for(lambda: len(rs2.lines()) >= 1, what="the message after the restart")
    assert [rec[2] for rec in rs2.records()] == ["1004"]
    assert out.stats.sent == 4


@pytest.mark.asyncio
async def test_syslog_over_tls(tmp_path: Path, tls: TLSFiles, started: Start) -> None:
    other = make_tls(tmp_path / "other", hosts=["127.0.0.1"], name="other")
    with run_rsyslogd(tmp_path / "rsyslog", free_port(), tls=tls) as rs:
        good, bad = await started(
            [
                {
                    "type": "syslog",
                    "name": "tls-ok",
                    "address": f"127.0.0.1:{rs.port}",
                    "tls": True,
                    "ca_file": str(tls.ca),
                    "schema": "ocsf",
                    "what": "alerts",
                },
                {
                    "type": "syslog",
                    "name": "tls-wrong-ca",
                    "address": f"127.0.0.1:{rs.port}",
                    "tls": True,
                    "ca_file": str(other.ca),
                    "backoff": 0.05,
                    "backoff_max": 0.1,
                },
            ]
        )
        alert = make_alert(level="critical")
        for o in (good, bad):
            o.submit(alert)
            o.submit(exec_event())
        await wait_for(lambda: len(rs.lines()) == 1, what="the alert over TLS")
        await wait_for(lambda: bad.stats.errors["tls_verify"] >= 3, what="refused certificate")
        await asyncio.sleep(0.2)
        ((host, app, procid, msgid, pri, ts, sd, msg),) = rs.records()
    assert (host, app, procid, msgid, pri, ts) == (
        "node1",
        "sandtrace",
        "4242",
        "alert",
        "10",
        "2023-11-14T22:13:20.123456Z",
    )
    assert sd == (
        '[sandtrace@32473 kind="alert" alert_id="a-1" rule_id="r-1" level="critical" '
        'sandbox="sb-1" pid="4242" exe="/usr/bin/curl"]'
    )
    assert json.loads(msg) == dumped(ocsf(alert))
    assert ocsf_problems(json.loads(msg)) == []  # OCSF 1.8.0 as it arrived
    assert json.loads(msg)["finding_info"]["title"] == 'Miner "pool" [stratum]'
    assert good.stats.sent == 1
    assert good.stats.dropped == {}
    assert bad.stats.sent == 0
    assert bad.stats.retries == bad.stats.errors["tls_verify"]
    assert bad.depth() == 2
    await bad.aclose(deadline=0.1)
    assert bad.stats.dropped == {"shutdown": 2}


# --- HTTP receivers ------------------------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An aiohttp server on loopback that records requests and answers as told."""

    url: str
    requests: list[Received] = field(default_factory=list)
    fail_first: int = 0  # answer 503 to this many requests first
    bulk_item_status: Callable[[dict[str, Any], int], int] = lambda _doc, _n: 201
    hang: asyncio.Event | None = None  # never answer until set
    got_request: asyncio.Event = field(default_factory=asyncio.Event)


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(url="")
    seen: dict[str, int] = {}

    async def hec(request: web.Request) -> web.Response:
        body = await request.read()
        rec.requests.append(Received(request.method, request.path, dict(request.headers), body))
        rec.got_request.set()
        if rec.hang is not None:
            await rec.hang.wait()
        if request.path.endswith("/bad"):
            return web.json_response({"text": "Invalid token", "code": 4}, status=403)
        if len(rec.requests) <= rec.fail_first:
            return web.json_response({"text": "Server is busy", "code": 9}, status=503)
        return web.json_response({"text": "Success", "code": 0})

    async def bulk(request: web.Request) -> web.Response:
        body = await request.read()
        rec.requests.append(Received(request.method, request.path, dict(request.headers), body))
        if len(rec.requests) <= rec.fail_first:
            return web.Response(status=503, text="busy")
        lines = body.decode().split("\n")
        docs = [json.loads(d) for d in lines[1::2] if d]
        items = []
        for doc in docs:
            key = json.dumps(doc, sort_keys=True)
            seen[key] = seen.get(key, 0) + 1
            status = rec.bulk_item_status(doc, seen[key])
            result: dict[str, Any] = {"_index": "sandtrace", "status": status}
            if status >= 300:
                result["error"] = {
                    "type": "mapper_parsing_exception"
                    if status == 400
                    else "es_rejected_execution_exception",
                    "reason": "test",
                }
            items.append({"create": result})
        return web.json_response(
            {"took": 1, "errors": any(i["create"]["status"] >= 300 for i in items), "items": items}
        )

    app = web.Application()
    app.router.add_post("/services/collector/event", hec)
    app.router.add_post("/services/collector/event/bad", hec)
    app.router.add_post("/_bulk", bulk)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}"
    try:
        yield rec
    finally:
        if rec.hang is not None:
            rec.hang.set()
        await runner.cleanup()


def hec_objects(body: bytes) -> list[dict[str, Any]]:
    """The concatenated JSON objects of a HEC request body."""
    decoder = json.JSONDecoder()
    text = body.decode("ascii")
    objects, pos = [], 0
    while pos < len(text):
        obj, pos = decoder.raw_decode(text, pos)
        objects.append(obj)
    return objects


@pytest.mark.asyncio
async def test_splunk_hec(tmp_path: Path, receiver: Receiver, started: Start) -> None:
    token = tmp_path / "hec.token"
    token.write_text("11111111-2222-3333-4444-555555555555\n")
    receiver.fail_first = 2
    (out,) = await started(
        [
            {
                "type": "splunk_hec",
                "url": f"{receiver.url}/services/collector/event",
                "token_file": str(token),
                "index": "sandbox",
                "schema": "ecs",
                "batch": 10,
                "backoff": 0.05,
            }
        ]
    )
    items: list[Any] = [make_alert(), exec_event(1001), exec_event(1002)]
    for item in items:
        out.submit(item)
    await wait_for(lambda: out.stats.sent == 3, what="3 events sent")
    assert out.stats.retries == 2
    assert out.stats.errors == {"http_503": 2}
    assert len(receiver.requests) == 3
    for req in receiver.requests:
        assert req.method == "POST"
        assert req.path == "/services/collector/event"
        assert req.headers["Authorization"] == "Splunk 11111111-2222-3333-4444-555555555555"
        assert req.headers["Content-Type"] == "application/json"
        assert req.body == receiver.requests[0].body  # the same batch, resent whole
    objects = hec_objects(receiver.requests[-1].body)
    assert objects == [
        {
            "time": 1700000000.123456,
            "host": "node1",
            "source": "sandtrace",
            "sourcetype": "sandtrace",
            "index": "sandbox",
            "event": dumped(ecs(items[0])),
        },
        {
            "time": 1700000000.123457,
            "host": "node1",
            "source": "sandtrace",
            "sourcetype": "sandtrace",
            "index": "sandbox",
            "event": dumped(ecs(items[1])),
        },
        {
            "time": 1700000000.123457,
            "host": "node1",
            "source": "sandtrace",
            "sourcetype": "sandtrace",
            "index": "sandbox",
            "event": dumped(ecs(items[2])),
        },
    ]
    assert list(objects[0]) == ["time", "host", "source", "sourcetype", "index", "event"]


@pytest.mark.asyncio
async def test_splunk_hec_rejected_request_is_counted(
    tmp_path: Path, receiver: Receiver, started: Start
) -> None:
    token = tmp_path / "hec.token"
    token.write_text("wrong")
    (out,) = await started(
        [
            {
                "type": "splunk_hec",
                "url": f"{receiver.url}/services/collector/event/bad",
                "token_file": str(token),
                "sourcetype": "st",
                "batch": 2,
                "backoff": 0.05,
            }
        ]
    )
    for pid in (1, 2, 3):
        out.submit(exec_event(pid))
    await wait_for(lambda: out.stats.dropped["rejected"] == 3, what="3 rejected")
    assert out.stats.sent == 0
    assert out.stats.retries == 0
    assert len(receiver.requests) == 2  # batches of 2 and 1, neither retried
    assert [o["sourcetype"] for o in hec_objects(receiver.requests[0].body)] == ["st", "st"]
    assert "index" not in hec_objects(receiver.requests[0].body)[0]


@pytest.mark.asyncio
async def test_elasticsearch_bulk(tmp_path: Path, receiver: Receiver, started: Start) -> None:
    key = tmp_path / "es.key"
    key.write_text("VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==\n")
    receiver.fail_first = 1

    def item_status(doc: dict[str, Any], seen: int) -> int:
        pid = doc["process"]["pid"]
        if pid == 1002:
            return 429 if seen == 1 else 201  # busy once, then taken
        if pid == 1003:
            return 400  # refused for good
        return 201

    receiver.bulk_item_status = item_status
    (out,) = await started(
        [
            {
                "type": "elasticsearch",
                "url": receiver.url,
                "index": "sandtrace-events",
                "api_key_file": str(key),
                "schema": "ecs",
                "batch": 5,
                "backoff": 0.05,
            }
        ]
    )
    items = [exec_event(pid) for pid in (1001, 1002, 1003, 1004)]
    for item in items:
        out.submit(item)
    await wait_for(lambda: out.stats.sent == 3, what="3 documents created")
    await asyncio.sleep(0.2)  # nothing more may come
    assert out.stats.sent == 3
    assert out.stats.dropped == {"rejected": 1}
    assert out.stats.retries == 2  # the 503, then the 429 of one item
    assert out.stats.errors == {"http_503": 1, "partial": 1}
    assert len(receiver.requests) == 3
    for req in receiver.requests:
        assert req.path == "/_bulk"
        assert req.headers["Content-Type"] == "application/x-ndjson"
        assert req.headers["Authorization"] == (
            "ApiKey VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw=="
        )
        assert req.body.endswith(b"\n")
    lines = receiver.requests[1].body.decode().split("\n")
    assert lines[-1] == ""
    assert [json.loads(x) for x in lines[0:-1:2]] == [
        {"create": {"_index": "sandtrace-events"}}
    ] * 4
    assert [json.loads(x) for x in lines[1:-1:2]] == [dumped(ecs(i)) for i in items]
    retried = receiver.requests[2].body.decode().split("\n")
    assert [json.loads(x) for x in retried[:-1]] == [
        {"create": {"_index": "sandtrace-events"}},
        dumped(ecs(items[1])),
    ]


@pytest.mark.asyncio
async def test_https_receivers_verify_the_ca(tmp_path: Path, tls: TLSFiles, started: Start) -> None:
    other = make_tls(tmp_path / "other", hosts=["127.0.0.1"], name="other")
    token = tmp_path / "hec.token"
    token.write_text("t0k")
    bodies: list[bytes] = []

    async def hec(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.json_response({"text": "Success", "code": 0})

    app = web.Application()
    app.router.add_post("/services/collector/event", hec)
    runner = web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/services/collector/event"
    try:
        good, wrong_ca = await started(
            [
                {
                    "type": "splunk_hec",
                    "name": "ok",
                    "url": url,
                    "token_file": str(token),
                    "ca_file": str(tls.ca),
                },
                {
                    "type": "splunk_hec",
                    "name": "wrong-ca",
                    "url": url,
                    "token_file": str(token),
                    "ca_file": str(other.ca),
                    "backoff": 0.05,
                    "backoff_max": 0.1,
                },
            ]
        )
        for o in (good, wrong_ca):
            o.submit(exec_event(77))
        await wait_for(lambda: good.stats.sent == 1, what="the event over HTTPS")
        await wait_for(
            lambda: wrong_ca.stats.errors["ClientConnectorCertificateError"] >= 2,
            what="certificate refused",
        )
    finally:
        await runner.cleanup()
    assert len(bodies) == 1
    (obj,) = hec_objects(bodies[0])
    assert obj["event"] == dumped(native(exec_event(77)))
    assert wrong_ca.stats.sent == 0
    assert wrong_ca.depth() == 1


# --- a failing output does not hold the others back ----------------------------------------


@pytest.mark.asyncio
async def test_hung_receiver_fills_only_its_own_queue(
    tmp_path: Path, receiver: Receiver, started: Start
) -> None:
    token = tmp_path / "hec.token"
    token.write_text("t")
    receiver.hang = asyncio.Event()
    hung, files = await started(
        [
            {
                "type": "splunk_hec",
                "name": "hung",
                "url": f"{receiver.url}/services/collector/event",
                "token_file": str(token),
                "queue": 5,
                "batch": 1,
                "timeout": 60,
            },
            {"type": "jsonl", "name": "file", "path": str(tmp_path / "all.jsonl"), "queue": 100},
        ]
    )
    first = exec_event(1)
    hung.submit(first)
    files.submit(first)
    await asyncio.wait_for(receiver.got_request.wait(), 5)  # one item now in flight
    for pid in range(2, 21):
        item = exec_event(pid)
        hung.submit(item)
        files.submit(item)
    assert hung.stats.dropped == {"queue_full": 14}  # 1 in flight + 5 queued of 20
    assert hung.depth() == 6
    await wait_for(lambda: files.stats.sent == 20, what="all 20 in the file")
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    assert [json.loads(x)["process"]["pid"] for x in lines] == list(range(1, 21))
    assert files.stats.dropped == {}
    lines_out = prometheus_lines([hung, files])
    assert 'sandtrace_output_dropped_total{cause="queue_full",output="hung"} 14.0' in lines_out
    assert 'sandtrace_output_queue{output="hung"} 6.0' in lines_out
    assert 'sandtrace_output_sent_total{output="file"} 20.0' in lines_out
    assert 'sandtrace_output_retries_total{output="hung"} 0.0' in lines_out
    await hung.aclose(deadline=0.2)
    assert hung.stats.dropped == {"queue_full": 14, "shutdown": 6}
    assert hung.stats.sent == 0


@pytest.mark.asyncio
async def test_unreachable_port_counts_drops(tmp_path: Path, started: Start) -> None:
    port = free_port()  # nothing listens there
    dead, alive = await started(
        [
            {
                "type": "syslog",
                "name": "dead",
                "address": f"127.0.0.1:{port}",
                "queue": 3,
                "backoff": 0.05,
                "backoff_max": 0.1,
            },
            {"type": "jsonl", "name": "alive", "path": str(tmp_path / "alive.jsonl")},
        ]
    )
    for pid in range(1, 11):  # no await in between: the sender has taken nothing yet
        dead.submit(exec_event(pid))
        alive.submit(exec_event(pid))
    assert dead.stats.dropped == {"queue_full": 7}
    await wait_for(lambda: alive.stats.sent == 10 and dead.stats.errors["connect"] >= 2)
    assert len((tmp_path / "alive.jsonl").read_text().splitlines()) == 10
    assert dead.stats.sent == 0
    await dead.aclose(deadline=0.1)
    assert dead.stats.dropped == {"queue_full": 7, "shutdown": 3}


# --- JSON lines files ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_jsonl_rotation(tmp_path: Path, started: Start) -> None:
    path = tmp_path / "events.jsonl"
    line = len(json.dumps(native(exec_event(1000)), separators=(",", ":"))) + 1
    (out,) = await started(
        [
            {
                "type": "jsonl",
                "path": str(path),
                "max_bytes": 3 * line,
                "backups": 2,
                "what": "events",
            }
        ]
    )
    out.submit(make_alert())  # not wanted: events only
    for pid in range(1000, 1010):  # same width: every line has the same length
        out.submit(exec_event(pid))
    await wait_for(lambda: out.stats.sent == 10, what="10 lines written")
    assert file_names(tmp_path) == [
        "events.jsonl",
        "events.jsonl.1",
        "events.jsonl.2",
    ]

    def pids(p: Path) -> list[int]:
        data = p.read_text()
        assert data.endswith("\n")
        return [json.loads(x)["process"]["pid"] for x in data.splitlines()]

    assert pids(path) == [1009]
    assert pids(tmp_path / "events.jsonl.1") == [1006, 1007, 1008]
    assert pids(tmp_path / "events.jsonl.2") == [1003, 1004, 1005]
    assert path.stat().st_size == line
    assert out.stats.dropped == {}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for this test only."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write path until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"f" * 4096)
    except OSError as exc:
        assert exc.errno == 28  # ENOSPC
    finally:
        os.close(fd)


@pytest.mark.asyncio
async def test_jsonl_full_disk(small_disk: Path, started: Start) -> None:
    path = small_disk / "events.jsonl"
    (out,) = await started(
        [{"type": "jsonl", "path": str(path), "batch": 50, "backoff": 0.05, "backoff_max": 0.1}]
    )
    for pid in range(1000, 1003):
        out.submit(exec_event(pid))
    await wait_for(lambda: out.stats.sent == 3, what="3 lines before the disk is full")
    fill(small_disk / "filler")
    for pid in range(1003, 1040):  # some lines fit in the file's last page, most do not
        out.submit(exec_event(pid))
    await wait_for(lambda: out.stats.errors["ENOSPC"] >= 3, what="failed writes")
    sent_while_full = out.stats.sent
    assert sent_while_full == 3
    data = path.read_bytes()
    assert data.endswith(b"\n")  # whole lines only: the partly written batch was cut back
    assert [json.loads(x)["process"]["pid"] for x in data.splitlines()] == [1000, 1001, 1002]
    assert out.stats.retries == out.stats.errors["ENOSPC"]
    assert out.stats.dropped == {}
    (small_disk / "filler").unlink()
    await wait_for(lambda: out.stats.sent == 40, what="all lines once there is space")
    pids = [json.loads(x)["process"]["pid"] for x in path.read_text().splitlines()]
    assert pids == list(range(1000, 1040))
    assert out.depth() == 0


def test_rsyslogd_and_tools_present() -> None:
    # The e2e layer never skips: a missing rsyslogd or gnutls module is a failure here.
    assert Path(RSYSLOGD).is_file()
    assert any(Path("/usr/lib").rglob("rsyslog/lmnsd_gtls.so")), "apt-get install rsyslog-gnutls"
    assert shutil.which("openssl") is not None
