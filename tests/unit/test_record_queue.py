"""The hand-off queue between the ring reader and the event loop is bounded in bytes and
counts every record it cannot take."""

from __future__ import annotations

import struct
import threading

from probes.loader import (
    HAND_OVER_BUSY_INTERVAL,
    HAND_OVER_BUSY_RECORDS,
    RecordQueue,
    in_time_order,
    read_loop,
)


def test_bounded_in_bytes_and_drops_counted() -> None:
    q = RecordQueue(capacity_bytes=100, overhead=0)
    assert q.put([b"x" * 40, b"y" * 40]) is True  # was empty: wake the reader
    assert q.put([b"z" * 15, b"w" * 10, b"v" * 1]) is False
    assert (q.pending(), q.dropped) == (3, 2)  # 15 fits (95 bytes), the next 10 does not
    assert [len(r) for batch in q.drain() for r in batch] == [40, 40, 15]
    assert q.pending() == 0
    assert q.put([b"a" * 101]) is False  # a record larger than the whole queue
    assert q.dropped == 3
    assert q.put([b"b" * 100]) is True


def test_bound_counts_what_each_record_costs_beyond_its_payload() -> None:
    q = RecordQueue(capacity_bytes=1000)  # 48 bytes of overhead per record
    assert q.put([b"r" * 52] * 12) is True  # 100 bytes each: 10 fit
    assert (q.pending(), q.dropped) == (10, 2)


class _ScriptedStop(threading.Event):
    """Set once the scripted polls are used up; records each wait instead of sleeping."""

    def __init__(self, script: list[list[bytes]]) -> None:
        super().__init__()
        self.script = script
        self.waits: list[float] = []

    def is_set(self) -> bool:
        return not self.script

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(-1.0 if timeout is None else timeout)
        return False


def _run_reader(
    script: list[list[bytes]], interval: float
) -> tuple[list[list[bytes]], list[float]]:
    """read_loop over polls that find script's records in turn: (hand-overs, waits)."""
    stop = _ScriptedStop(script)
    pending: list[bytes] = []
    handed: list[list[bytes]] = []

    def poll() -> None:
        pending.extend(stop.script.pop(0))

    def hand_over() -> int:
        if not pending:
            return 0
        handed.append(pending.copy())
        pending.clear()
        return len(handed[-1])

    read_loop(poll, hand_over, stop, interval)
    return handed, stop.waits


def test_reader_waits_the_interval_after_each_hand_over_only() -> None:
    # A fork alone, then what came while the reader waited (exec and exit) together; a poll
    # that finds nothing hands nothing over and waits on the ring again at once.
    handed, waits = _run_reader([[b"fork"], [b"exec", b"exit"], [], [b"late"]], 0.004)
    assert handed == [[b"fork"], [b"exec", b"exit"], [b"late"]]
    assert waits == [0.004, 0.004, 0.004]


def test_reader_drains_a_flood_at_the_short_interval() -> None:
    # A hand-over of HAND_OVER_BUSY_RECORDS or more is a flood: the next one comes after the
    # short interval, so that the rings do not fill while the reader waits; then, with the
    # flood over, the full interval again.
    flood = [b"r"] * HAND_OVER_BUSY_RECORDS
    handed, waits = _run_reader([flood, [b"a"] * (HAND_OVER_BUSY_RECORDS - 1), [b"b"]], 0.02)
    assert [len(h) for h in handed] == [HAND_OVER_BUSY_RECORDS, HAND_OVER_BUSY_RECORDS - 1, 1]
    assert waits == [HAND_OVER_BUSY_INTERVAL, 0.02, 0.02]


def test_reader_without_interval_never_waits() -> None:
    handed, waits = _run_reader([[b"a"], [b"b"]], 0.0)
    assert (handed, waits) == ([[b"a"], [b"b"]], [])


def _rec(ktime: int, tag: bytes) -> bytes:
    return struct.pack("<HHIQ", 1, 3, 24, ktime) + tag.ljust(8, b"\0")


def test_records_of_both_rings_come_in_time_order() -> None:
    """An exec from the priority ring before the connects it made, its exit after them."""
    main = [_rec(20, b"connect"), _rec(30, b"connect2")]
    prio = [_rec(10, b"exec"), _rec(40, b"exit")]
    merged = in_time_order(prio, main)
    assert [r[16:].rstrip(b"\0") for r in merged] == [b"exec", b"connect", b"connect2", b"exit"]
    assert in_time_order([], main) is main
    assert in_time_order(prio, []) is prio
