"""The hand-off queue between the ring reader and the event loop is bounded in bytes and
counts every record it cannot take."""

from __future__ import annotations

from probes.loader import RecordQueue


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
