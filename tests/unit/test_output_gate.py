"""The service acknowledges a batch once its file outputs have it, not waiting on the network;
and it knows where in each file the acknowledged batches end, so that a restarted service
can take back what it wrote for batches it never acknowledged."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from api.events import AnyEvent
from detect.testing import event_from_fields
from service.outputs.config import outputs_from_config
from service.outputs.jsonl import JsonlOutput, OutputGate, take_back
from tests.serving import free_port


def exec_event(pid: int) -> AnyEvent:
    return event_from_fields("process_creation", {"ProcessId": pid, "Image": f"/bin/p{pid}"})


@pytest.mark.asyncio
async def test_settle_waits_for_files_not_for_an_unreachable_siem(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    outputs = outputs_from_config(
        [
            {"type": "jsonl", "path": str(path), "what": "events"},
            {"type": "syslog", "address": f"127.0.0.1:{free_port()}", "what": "events"},
        ]
    )
    for out in outputs:
        await out.start()
    gate = OutputGate(outputs, wait=60.0)
    try:
        assert bool(gate) and [o.output_type for o in gate.outputs] == ["jsonl"]
        for pid in range(25):
            gate.submit(exec_event(pid))
        gate.end_batch(1)
        async with asyncio.timeout(30):  # waiting on the dead receiver would take 60 s
            await gate.settle(1)
        lines = await asyncio.to_thread(lambda: path.read_text().splitlines())
        assert len(lines) == 25  # written before the acknowledgement
        assert outputs[1].stats.sent == 0 and outputs[1].depth() == 25
    finally:
        for out in outputs:
            await out.aclose(0.1)
    assert outputs[1].stats.dropped["shutdown"] == 25


def test_no_file_output_means_nothing_to_wait_for() -> None:
    outputs = outputs_from_config([{"type": "syslog", "address": "127.0.0.1:9"}])
    assert not OutputGate(outputs)


@pytest.mark.asyncio
async def test_points_are_where_each_batch_ends_in_each_file(tmp_path: Path) -> None:
    events, alerts = tmp_path / "events.jsonl", tmp_path / "alerts.jsonl"
    outputs = outputs_from_config(
        [
            {"type": "jsonl", "path": str(events), "what": "events"},  # 100 lines per write
            {"type": "jsonl", "path": str(alerts), "what": "alerts"},
        ]
    )
    for out in outputs:
        await out.start()
    gate = OutputGate(outputs, wait=60.0)
    sizes = [150, 7, 0, 260]  # batches larger than a write, small, and empty
    pid = 0
    try:
        for ticket, size in enumerate(sizes, 1):
            for _ in range(size):
                gate.submit(exec_event(pid))
                pid += 1
            gate.end_batch(ticket)
        async with asyncio.timeout(30):
            await gate.settle(len(sizes))
        points = [gate.points(t) for t in range(1, len(sizes) + 1)]
    finally:
        for out in outputs:
            await out.aclose(1.0)
    lines = events.read_bytes().splitlines(keepends=True)
    assert len(lines) == sum(sizes)
    ends = [sum(len(line) for line in lines[: sum(sizes[:t])]) for t in range(1, len(sizes) + 1)]
    st_events, st_alerts = events.stat(), alerts.stat()
    assert [p[str(events)] for p in points] == [
        [st_events.st_dev, st_events.st_ino, end] for end in ends
    ]
    assert [p[str(alerts)] for p in points] == [[st_alerts.st_dev, st_alerts.st_ino, 0]] * 4


def jsonl(path: Path, **more: object) -> JsonlOutput:
    (out,) = outputs_from_config([{"type": "jsonl", "path": str(path), **more}])
    assert isinstance(out, JsonlOutput)
    return out


def test_take_back_cuts_the_lines_of_unacknowledged_batches(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":2}\n')
    st = path.stat()
    with path.open("ab") as f:
        f.write(b'{"a":3}\n')  # written, never acknowledged
    saved = {str(path): [st.st_dev, st.st_ino, st.st_size]}
    notes = take_back([jsonl(path)], saved)
    assert path.read_bytes() == b'{"a":1}\n{"a":2}\n'
    assert notes == [
        "output jsonl0: took back 8 bytes written for batches never acknowledged; "
        "their collectors send them again"
    ]
    assert take_back([jsonl(path)], saved) == []  # nothing more to take back


def test_take_back_after_rotation_restores_the_acknowledged_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    older = tmp_path / "events.jsonl.1"
    older.write_bytes(b"old\n")
    path.write_bytes(b"acked\n")
    st = path.stat()
    path.write_bytes(b"acked\nnot acked\n")
    # two rotations since the point: the point's file is now .2, the older one .3
    older.replace(tmp_path / "events.jsonl.3")
    path.replace(tmp_path / "events.jsonl.2")
    (tmp_path / "events.jsonl.1").write_bytes(b"not acked either\n")
    path.write_bytes(b"nor this\n")
    notes = take_back(
        [jsonl(path, max_bytes=100, backups=5)], {str(path): [st.st_dev, st.st_ino, st.st_size]}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "events.jsonl.1"]
    assert path.read_bytes() == b"acked\n" and path.stat().st_ino == st.st_ino
    assert older.read_bytes() == b"old\n"
    assert notes == [
        "output jsonl0: took back 10 bytes and 2 newer files written for batches "
        "never acknowledged; their collectors send them again"
    ]


def test_take_back_leaves_files_it_cannot_place(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"one\ntwo\n")
    st = path.stat()
    gone = {str(path): [st.st_dev, st.st_ino + 1, 4]}  # moved away by someone else
    assert "lines of unacknowledged batches may appear twice" in take_back([jsonl(path)], gone)[0]
    behind = {str(path): None}  # the file was falling behind at the last acknowledgement
    assert "it was behind" in take_back([jsonl(path)], behind)[0]
    shorter = {str(path): [st.st_dev, st.st_ino, 100]}
    assert "shorter" in take_back([jsonl(path)], shorter)[0]
    assert path.read_bytes() == b"one\ntwo\n"


@pytest.mark.asyncio
async def test_a_stuck_output_holds_one_mark_however_many_batches_pass(tmp_path: Path) -> None:
    """While a file output cannot keep up (its queue full, items dropped and counted), every
    batch still marks it: marks of batches that brought it nothing share one entry, so its
    memory does not grow with time; once it catches up, each of those batches' points is
    the file's end."""
    path = tmp_path / "events.jsonl"
    out = jsonl(path, queue=5)
    gate = OutputGate([out], wait=60.0)
    for pid in range(8):  # the sender is not running: 5 queued, 3 dropped
        gate.submit(exec_event(pid))
    gate.end_batch(1)
    for ticket in range(2, 1001):
        gate.submit(exec_event(ticket))  # dropped: the queue is full
        gate.end_batch(ticket)
    assert len(out._marks) == 1 and out.stats.dropped["queue_full"] == 3 + 999
    await out.start()
    try:
        async with asyncio.timeout(30):
            await gate.settle(1000)
    finally:
        await out.aclose(1.0)
    st = path.stat()
    end = [st.st_dev, st.st_ino, st.st_size]
    assert out.resolved == 1000 and len(path.read_text().splitlines()) == 5
    assert gate.points(1) == gate.points(500) == gate.points(1000) == {str(path): end}
