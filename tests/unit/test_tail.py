"""Live tail: filters, the hub's bounded queues, frames, the WebSocket endpoint, the local
Unix socket, and what the client prints for hostile strings."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import socket
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec.structs
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from api.events import WIRE_VERSION, Alert, AnyEvent, ExecEvent, LostEvent, decode, encode
from api.render import TextRenderer, bytes_from_json
from api.tail import BadFilter, TailFilter, dropped_message, hello_message, parse_control
from detect.testing import event_from_fields
from service.metrics import exposition
from tail.args import add_parser
from tail.client import Follower, TailError, Target, target_of
from tail.hub import (
    Dropped,
    LocalTail,
    TailHub,
    TailMetrics,
    TailSocketBusy,
    TailSocketError,
    add_tail_routes,
)

TOKEN = "tail-t0ken"  # noqa: S105 - a test token
SGR = re.compile(r"\x1b\[[0-9;]*m")


def exec_event(pid: int = 10, host: str = "h1", sandbox: str = "sb1") -> ExecEvent:
    fields = {"Image": "/bin/x", "ProcessId": pid, "CommandLine": f"x {pid}", "Sandbox": sandbox}
    event = event_from_fields("process_creation", fields)
    assert isinstance(event, ExecEvent)
    return msgspec.structs.replace(event, host=host)


def connect_event(pid: int = 11, host: str = "h1", sandbox: str = "sb1") -> AnyEvent:
    event = event_from_fields("network_connection", {"ProcessId": pid, "Sandbox": sandbox})
    return msgspec.structs.replace(event, host=host)


def alert_on(event: AnyEvent, rule: str = "r1") -> Alert:
    assert not isinstance(event, LostEvent)
    return Alert(
        alert_id=f"a-{rule}",
        rule_id=rule,
        title="t",
        level="high",
        tags=[],
        description="",
        time_ns=event.time_ns,
        host=event.host,
        sandbox=event.sandbox,
        process=event.process,
        events=[event],
    )


def lost(host: str = "h1") -> LostEvent:
    return LostEvent(time_ns=1, host=host, kernel={"exec": 2}, user=0, errors={})


def pid_of(frame: bytes) -> int:
    item = decode(frame)
    assert not isinstance(item, LostEvent)
    return item.process.pid


# --- filters -------------------------------------------------------------------------------


def test_filter_parses_lists_and_round_trips() -> None:
    flt = TailFilter.parse(
        [
            ("kind", "exec,connect"),
            ("kind", "bind"),
            ("sandbox", "a, b"),
            ("host", "h1"),
            ("alerts_only", "1"),
        ]
    )
    assert flt == TailFilter(
        True, frozenset({"a", "b"}), frozenset({"h1"}), frozenset({"exec", "connect", "bind"})
    )
    assert flt.query() == {
        "alerts_only": "1",
        "sandbox": "a,b",
        "host": "h1",
        "kind": "bind,connect,exec",
    }
    assert TailFilter.parse(flt.query()) == flt
    assert TailFilter.parse({}) == TailFilter()
    assert TailFilter().query() == {}
    assert TailFilter.parse({"alerts_only": "0"}) == TailFilter()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (
            {"kind": "exec,exce"},
            "unknown kind 'exce'; known: bind, cgroup_move, connect, dns, exec, "
            "exit, fork, io_uring, listen, raw_socket, response, socket",
        ),
        ({"kind": "alert"}, "unknown kind 'alert'"),
        (
            {"hots": "h1", "x": "1"},
            "unknown parameter 'hots', 'x'; known: alerts_only, sandbox, host, kind",
        ),
        ({"alerts_only": "maybe"}, "alerts_only wants 1 or 0, not 'maybe'"),
    ],
)
def test_filter_refuses_what_it_does_not_know(query: dict[str, str], message: str) -> None:
    with pytest.raises(BadFilter) as info:
        TailFilter.parse(query)
    assert str(info.value).startswith(message)


def test_filter_matching() -> None:
    ex, co = exec_event(), connect_event()
    other_host, other_box = exec_event(host="h2"), exec_event(sandbox="sb2")
    ex_alert, co_alert = alert_on(ex), alert_on(co)
    items: list[AnyEvent | Alert] = [
        ex,
        co,
        other_host,
        other_box,
        ex_alert,
        co_alert,
        lost(),
        lost("h2"),
    ]

    def passing(**query: str) -> list[int]:
        flt = TailFilter.parse(query)
        return [i for i, item in enumerate(items) if flt.matches(item)]

    assert passing() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert passing(alerts_only="1") == [4, 5, 6, 7]
    assert passing(host="h1") == [0, 1, 3, 4, 5, 6]
    assert passing(sandbox="sb1") == [0, 1, 2, 4, 5, 6, 7]
    assert passing(kind="connect") == [1, 5, 6, 7]
    assert passing(kind="exec", alerts_only="1", host="h1") == [4, 6]


# --- the hub -------------------------------------------------------------------------------


def test_hub_counts_what_a_full_queue_drops_and_says_where() -> None:
    async def scenario() -> None:
        hub = TailHub(max_queue=3)
        slow = hub.subscribe(TailFilter())
        execs = hub.subscribe(TailFilter(kinds=frozenset({"exec"})))
        events = [exec_event(pid=100 + i) for i in range(5)]
        for event in events:
            hub.publish(event)
        hub.publish(connect_event())  # only for slow, whose queue is full
        assert (slow.queued, slow.missed, slow.dropped) == (3, 3, 3)
        assert (execs.queued, execs.missed, execs.dropped) == (3, 2, 2)
        assert hub.dropped == 5
        first = await slow.next()
        assert isinstance(first, bytes) and decode(first) == events[0]
        hub.publish(events[0])  # room for one again: the gap is marked before it
        got = [await slow.next() for _ in range(4)]
        assert [pid_of(g) if isinstance(g, bytes) else g for g in got] == [
            101,
            102,
            Dropped(3),
            100,
        ]
        # execs was full for that one too; its notice comes after what it has
        assert [await execs.next() for _ in range(4)][3] == Dropped(3)
        hub.close()
        assert await slow.next() is None
        assert await execs.next() is None
        assert await hub.subscribe(TailFilter()).next() is None  # too late
        hub.unsubscribe(hub.subscribers[-1])
        assert exposition(TailMetrics(hub)).splitlines()[2::3] == [
            "sandtrace_tail_subscribers 2.0",
            "sandtrace_tail_sent_total 0.0",
            "sandtrace_tail_dropped_total 6.0",
            "sandtrace_tail_refused_total 0.0",
        ]
        hub.unsubscribe(slow)
        assert exposition(TailMetrics(hub)).splitlines()[2] == "sandtrace_tail_subscribers 1.0"

    asyncio.run(scenario())


def test_hub_encodes_once_and_only_when_someone_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    import tail.hub  # noqa: PLC0415

    calls: list[Any] = []

    def counting(item: Any) -> bytes:
        calls.append(item)
        return b"x"

    monkeypatch.setattr(tail.hub, "encode", counting)
    hub = TailHub()
    hub.publish(exec_event())
    assert calls == []
    hub.subscribe(TailFilter())
    hub.subscribe(TailFilter())
    hub.subscribe(TailFilter(kinds=frozenset({"bind"})))
    hub.publish(exec_event())
    assert len(calls) == 1


# --- frames --------------------------------------------------------------------------------


def test_control_frames() -> None:
    hello = parse_control(hello_message(TailFilter(kinds=frozenset({"exec"}))))
    assert hello == {
        "type": "hello",
        "wire_version": WIRE_VERSION,
        "tail_version": 1,
        "filter": {"kind": "exec"},
    }
    assert parse_control(dropped_message(7, 9)) == {"type": "dropped", "count": 7, "total": 9}
    # a notice only when there is something to say (a client that does not know the key
    # ignores it: the protocol's version stays)
    noticed = parse_control(hello_message(TailFilter(), "no alerts here"))
    assert noticed == {
        "type": "hello",
        "wire_version": WIRE_VERSION,
        "tail_version": 1,
        "filter": {},
        "notice": "no alerts here",
    }
    for bad in ("nope", "[1]", '{"count": 1}'):
        with pytest.raises(ValueError, match="control frame"):
            parse_control(bad)


# --- the endpoint --------------------------------------------------------------------------


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[TailHub, TestClient[Any, Any]]]:
    hub = TailHub(max_queue=2)
    app = web.Application()
    add_tail_routes(app, hub, TOKEN)
    async with TestClient(TestServer(app)) as client:
        yield hub, client


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def wait_subscribers(hub: TailHub, count: int) -> None:
    for _ in range(200):
        if len(hub.subscribers) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(hub.subscribers)} subscribers, not {count}")


@pytest.mark.asyncio
async def test_endpoint_refuses_before_upgrading(
    served: tuple[TailHub, TestClient[Any, Any]],
) -> None:
    hub, client = served
    resp = await client.get("/v1/tail", params={"kind": "exce"}, headers=AUTH)
    assert resp.status == 400
    assert (await resp.json())["message"].startswith("unknown kind 'exce'")
    resp = await client.get("/v1/tail", headers={"Authorization": "Bearer wrong"})
    assert (resp.status, (await resp.json())["error"]) == (401, "unauthorized")
    resp = await client.get("/v1/tail", headers=AUTH)  # no upgrade asked
    assert (resp.status, (await resp.json())["error"]) == (400, "not_websocket")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/v1/tail")
    assert info.value.status == 401
    assert hub.subscribers == []


@pytest.mark.asyncio
async def test_endpoint_streams_filtered_frames_and_drop_notices(
    served: tuple[TailHub, TestClient[Any, Any]],
) -> None:
    hub, client = served
    ws = await client.ws_connect("/v1/tail", params={"host": "h1", "kind": "exec"}, headers=AUTH)
    hello = parse_control(await ws.receive_str(timeout=5))
    assert hello["filter"] == {"host": "h1", "kind": "exec"}
    await wait_subscribers(hub, 1)
    mine = exec_event(pid=1)
    for item in (exec_event(pid=2, host="h2"), connect_event(), mine):
        hub.publish(item)
    assert decode(await ws.receive_bytes(timeout=5)) == mine
    # a burst larger than the queue, published without yielding: two go, three are counted
    for pid in range(20, 25):
        hub.publish(exec_event(pid=pid))
    got = [pid_of(await ws.receive_bytes(timeout=5)) for _ in range(2)]
    assert got == [20, 21]
    assert parse_control(await ws.receive_str(timeout=5)) == {
        "type": "dropped",
        "count": 3,
        "total": 3,
    }
    assert (hub.sent, hub.dropped) == (3, 3)
    closing = asyncio.create_task(ws.receive(timeout=5))  # a client reads all the time
    await hub.aclose()
    msg = await closing
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.GOING_AWAY)
    await ws.close()


@pytest.mark.asyncio
async def test_endpoint_forgets_a_client_that_leaves(
    served: tuple[TailHub, TestClient[Any, Any]],
) -> None:
    hub, client = served
    ws = await client.ws_connect("/v1/tail", headers=AUTH)
    await ws.receive_str(timeout=5)
    await wait_subscribers(hub, 1)
    await ws.close()
    await wait_subscribers(hub, 0)
    hub.publish(exec_event())
    assert (hub.sent, hub.dropped) == (0, 0)


# --- the local socket ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_local_socket_is_private_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "run" / "tail.sock"
    local = LocalTail(TailHub(), path)
    await local.start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(path.stat().st_mode)
        other = LocalTail(TailHub(), path)
        with pytest.raises(TailSocketBusy, match="is in use"):
            await other.start()
        connector = aiohttp.UnixConnector(path=str(path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.ws_connect("http://localhost/v1/tail") as ws,
        ):
            assert parse_control(await ws.receive_str(timeout=5))["type"] == "hello"
    finally:
        await local.close()
    assert not path.exists()


@pytest.mark.asyncio
async def test_local_socket_replaces_a_stale_one_and_keeps_other_files(tmp_path: Path) -> None:
    path = tmp_path / "tail.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # bound, never listening: what a killed watch leaves behind
    local = LocalTail(TailHub(), path)
    await local.start()
    await local.close()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(TailSocketError, match="exists and is not a socket"):
        await LocalTail(TailHub(), path).start()
    assert path.read_text() == "not a socket"
    with pytest.raises(TailSocketError, match="cannot create"):
        await LocalTail(TailHub(), path / "sub" / "tail.sock").start()


@pytest.mark.asyncio
async def test_local_socket_greets_with_the_hub_s_notice(tmp_path: Path) -> None:
    path = tmp_path / "tail.sock"
    local = LocalTail(TailHub(notice="detection runs elsewhere\x1b[2J"), path)
    await local.start()
    try:
        connector = aiohttp.UnixConnector(path=str(path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.ws_connect("http://localhost/v1/tail", params={"alerts_only": "1"}) as ws,
        ):
            hello = parse_control(await ws.receive_str(timeout=5))
            assert hello["notice"] == "detection runs elsewhere\x1b[2J"
        # the client shows it once, escaped (whoever serves the socket wrote it)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sandtrace",
            "tail",
            "--socket",
            str(path),
            "--alerts-only",
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        assert proc.stderr is not None
        lines = [(await proc.stderr.readline()).decode() for _ in range(2)]
        assert lines == [
            f"sandtrace: following {path} (alerts_only=1); Ctrl-C stops\n",
            "sandtrace: detection runs elsewhere\\x1b[2J\n",
        ]
        proc.terminate()
        assert await proc.wait() == 0
    finally:
        await local.close()


# --- what the client prints ----------------------------------------------------------------

HOSTILE_ARGV = [
    b"/bin/sh",
    b"\x1b[2J\x1b]0;owned\x07",
    b"two\nlines",
    b"bad\xff\xfeutf8",
    b"\xe2\x80\xaeevil",
]


def hostile_exec() -> ExecEvent:
    event = exec_event(pid=4242)
    process = msgspec.structs.replace(event.process, comm=b"\x1b[31mred", exe=b"/bin/sh")
    return msgspec.structs.replace(event, process=process, argv=HOSTILE_ARGV)


def shown(item: AnyEvent | Alert, color: bool, output: str = "compact") -> str:
    out = io.StringIO()
    renderer = TextRenderer(color, 200) if output == "compact" else None
    target = Target(URL("http://localhost/v1/tail"), "test")
    follower = Follower(target, TailFilter(), out, renderer)
    follower._show(encode(item))
    lines = out.getvalue().splitlines()
    if renderer is None:
        return lines[-1]
    return "\n".join(lines[1:])  # after the header: an event's line, or an alert's two


@pytest.mark.parametrize("color", [False, True])
def test_compact_lines_escape_every_traced_string(color: bool) -> None:
    event = hostile_exec()
    for item in (event, alert_on(event)):
        lines = shown(item, color).split("\n")
        assert len(lines) == (2 if isinstance(item, Alert) else 1)
        for line in lines:
            plain = SGR.sub("", line)
            assert "\x1b" not in plain and "\x07" not in plain
            assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in plain)
            assert "\u202e" not in plain
        assert "\\x1b[31mred" in SGR.sub("", lines[0])
    alert_context = SGR.sub("", shown(alert_on(event), color).split("\n")[1])
    assert alert_context == (
        "             cmd: /bin/sh '\\x1b[2J\\x1b]0;owned\\x07' 'two\\nlines' "
        "'bad\\xff\\xfeutf8' '\\u{202e}evil'"
    )
    exec_line = SGR.sub("", shown(event, color))
    assert exec_line.endswith(
        "4242    \\x1b[31mred      /bin/sh '\\x1b[2J\\x1b]0;owned\\x07' 'two\\nlines' "
        "'bad\\xff\\xfeutf8' '\\u{202e}evil'"
    )


def test_json_lines_carry_the_exact_bytes() -> None:
    line = shown(hostile_exec(), color=False, output="json")
    assert "\x1b" not in line and "\n" not in line
    parsed = json.loads(line)
    assert parsed["process"]["pid"] == 4242
    assert [bytes_from_json(a) for a in parsed["argv"]] == HOSTILE_ARGV


def test_client_names_both_wire_versions() -> None:
    follower = Follower(
        Target(URL("http://x/v1/tail"), "http://x"), TailFilter(), io.StringIO(), None
    )
    with pytest.raises(TailError) as info:
        follower._check_hello({"type": "hello", "wire_version": 99, "tail_version": 1})
    assert str(info.value) == (
        f"http://x sends event wire version 99; this sandtrace reads version {WIRE_VERSION}: "
        "run the same sandtrace version on both sides"
    )


def test_client_says_how_many_it_missed(capsys: pytest.CaptureFixture[str]) -> None:
    follower = Follower(
        Target(URL("http://x/v1/tail"), "http://x"), TailFilter(), io.StringIO(), None
    )
    follower._notice(parse_control(dropped_message(3, 10)))
    assert capsys.readouterr().err == (
        "sandtrace: missed 3 events/alerts (this tail read too slowly; 10 missed in all)\n"
    )


def tail_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["tail", *argv])


def test_targets() -> None:
    local = target_of(tail_args("--socket", "/tmp/t.sock"))
    assert (str(local.url), local.unix, local.label) == (
        "http://localhost/v1/tail",
        "/tmp/t.sock",
        "/tmp/t.sock",
    )
    server = target_of(tail_args("--server", "http://127.0.0.1:8780/"))
    assert (str(server.url), server.unix, server.label) == (
        "http://127.0.0.1:8780/v1/tail",
        None,
        "http://127.0.0.1:8780",
    )
    remote = target_of(tail_args("--server", "http://192.0.2.7:8780", "--insecure"))
    assert str(remote.url) == "http://192.0.2.7:8780/v1/tail"
    for argv, message in (
        (
            ["--server", "http://192.0.2.7:8780"],
            "refusing to send the token and read events in clear text from 192.0.2.7: use https://",
        ),
        (["--server", "ftp://h"], "--server wants an http:// or https:// URL, not 'ftp://h'"),
        (["--token-file", "/x"], "--token-file, --ca-file and --insecure go with --server"),
        (
            ["--server", "http://127.0.0.1:1", "--ca-file", "/x"],
            "--ca-file goes with an https:// --server",
        ),
        (
            ["--server", "https://h", "--token-file", "/nonexistent"],
            "--token-file: cannot read /nonexistent: No such file or directory",
        ),
    ):
        with pytest.raises(TailError) as info:
            target_of(tail_args(*argv))
        assert str(info.value).startswith(message)


@pytest.mark.asyncio
async def test_clients_beyond_the_limit_are_refused_and_counted(
    served: tuple[TailHub, TestClient[Any, Any]],
) -> None:
    hub, client = served
    hub.max_clients = 2
    first = await client.ws_connect("/v1/tail", headers=AUTH)
    second = await client.ws_connect("/v1/tail", headers=AUTH)
    for ws in (first, second):
        assert parse_control(await ws.receive_str(timeout=5))["type"] == "hello"
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/v1/tail", headers=AUTH)
    assert info.value.status == 503
    assert hub.refused == 1
    assert "sandtrace_tail_refused_total 1.0" in exposition(TailMetrics(hub)).splitlines()
    await first.close()
    for _ in range(100):  # the server notices the close
        if len(hub.subscribers) < 2:
            break
        await asyncio.sleep(0.02)
    third = await client.ws_connect("/v1/tail", headers=AUTH)  # room again
    assert parse_control(await third.receive_str(timeout=5))["type"] == "hello"
    await second.close()
    await third.close()
