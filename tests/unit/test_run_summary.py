"""The end-of-run summary (collector/summary.py) fed real events and alerts: exact counts,
folded repeats counted as events, kernel repeat counts added, untrusted names escaped."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from api.events import ConnectEvent, ExecEvent, LostEvent
from collector.summary import SHOWN, RunSummary
from detect.engine import Engine
from detect.loader import load_paths
from detect.pack import builtin_rules
from detect.testing import T0, event_from_fields


def _exec(pid: int, image: str) -> ExecEvent:
    event = event_from_fields("process_creation", {"ProcessId": pid, "Image": image})
    assert isinstance(event, ExecEvent)
    return event


def _connect(pid: int, at: float, **fields: object) -> ConnectEvent:
    event = event_from_fields("network_connection", {"ProcessId": pid, **fields}, at)
    assert isinstance(event, ConnectEvent)
    return event


def test_counts_what_the_run_did() -> None:
    summary = RunSummary()
    engine = Engine(load_paths([builtin_rules()]))
    events: list[Any] = [
        _exec(1, "/usr/bin/dash"),
        _exec(2, "/usr/bin/dash"),
        _exec(3, "/dev/shm/x"),
        _exec(3, "/dev/shm/x"),  # the same process again: one alert, then a fold
        _exec(3, "/dev/shm/x"),
        _connect(4, 0, DestinationIp="127.0.0.1", DestinationPort=8000),
        _connect(4, 1, DestinationIp="2001:db8::1", DestinationPort=443, Outcome="error"),
        _connect(4, 2, DestinationIp="127.0.0.1", DestinationPort=8000, Outcome="repeated"),
        _connect(4, 3, DestinationIp="127.0.0.1", DestinationPort=8000),
        _connect(5, 4, DestinationPath="/run/docker.sock"),
        LostEvent(time_ns=T0, host="h", kernel={"exec": 2, "connect": 1}, user=4, errors={}),
    ]
    events[7].repeats = 5  # the kernel counted 5 connects it did not send, nothing more
    events[8].repeats = 2  # this connect and 2 before it
    for event in events:
        summary.emit(event)
        for alert in engine.feed(event):
            summary.emit(alert)
    for alert in engine.flush():
        summary.emit(alert)
    d = summary.as_dict()
    assert d["executables"] == [
        {"path": "/dev/shm/x", "count": 3},
        {"path": "/usr/bin/dash", "count": 2},
    ]
    assert [(x["destination"], x["connects"], x["failed"]) for x in d["destinations"]] == [
        ("127.0.0.1:8000/tcp", 1 + 5 + 3, 0),
        ("[2001:db8::1]:443/tcp", 1, 1),
        ("unix:/run/docker.sock", 1, 0),
    ]
    assert d["lost"] == {"kernel": 3, "user": 4, "spool": 0, "map_errors": 0}
    shm = [r for r in d["alerts"]["by_rule"] if r["title"].startswith("Execution From A Temp")]
    assert [(r["level"], r["alerts"], r["events"]) for r in shm] == [("medium", 1, 3)]
    by_rule = d["alerts"]["by_rule"]
    assert d["alerts"]["total"] == sum(r["alerts"] for r in by_rule)
    assert list(d["alerts"]["by_level"]) == sorted(
        d["alerts"]["by_level"],
        key=["critical", "high", "medium", "low", "informational"].index,
    )
    assert [r["level"] for r in by_rule] == sorted(
        (r["level"] for r in by_rule),
        key=["critical", "high", "medium", "low", "informational"].index,
    )
    lines = summary.lines()
    assert "  executables: 2 distinct, 5 execs" in lines
    assert "  destinations: 3 distinct, 11 connects" in lines
    assert "       1  [2001:db8::1]:443/tcp (1 failed)" in lines
    assert "  lost: kernel 3, user 4" in lines


def test_untrusted_names_are_escaped_and_long_lists_cut(tmp_path: Path) -> None:
    summary = RunSummary(detecting=False)
    bad = _exec(3, "y")
    bad.process.exe = b"/tmp/\xff\xfe"
    for _ in range(2):  # more than the rest: shown first
        summary.emit(_exec(1, "/tmp/\x1b[31mred"))
        summary.emit(bad)
    summary.emit(_exec(2, "x"))
    for n in range(SHOWN + 5):
        summary.emit(_exec(10 + n, f"/opt/tool-{n:02d}"))
    lines = summary.lines()
    text = "\n".join(lines)
    assert "\x1b" not in text and "/tmp/\\x1b[31mred" in text and "/tmp/\\xff\\xfe" in text
    assert lines[1] == "  alerts: none raised here (detection is off or done by the service)"
    assert f"    ... {SHOWN + 8 - SHOWN} more (all of them with --summary FILE)" in lines
    out = tmp_path / "summary.json"
    stream = io.StringIO()
    summary.report(stream, str(out))
    d = json.loads(out.read_text())
    assert len(d["executables"]) == SHOWN + 8
    assert {"path": "/tmp/\\xff\\xfe", "count": 2} in d["executables"]
    assert d["detection"] is False
    assert stream.getvalue().splitlines() == [f"sandtrace: {line}" for line in lines]
    stream = io.StringIO()
    summary.report(stream, str(tmp_path / "no" / "such.json"))
    assert (
        stream.getvalue()
        .splitlines()[-1]
        .startswith(f"sandtrace: --summary {tmp_path}/no/such.json: cannot write: ")
    )
