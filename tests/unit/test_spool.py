"""The collector's disk spool on its own: order, bounds, identity across restarts, damage."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.spool import LEASE, Spool, SpoolBusy, SpoolCorrupt


def fill(spool: Spool, seqs: range, size: int = 100) -> None:
    for seq in seqs:
        assert spool.put(seq, 10, 0, bytes([seq % 256]) * size) == []


def test_batches_come_back_in_order_across_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10_000)
    fill(spool, range(3))
    ident = spool.collector_id
    spool.close()
    (tmp_path / "00000000000000000099-1-0.batch.tmp").write_bytes(b"cut short")
    again = Spool(tmp_path, 10_000)
    assert again.collector_id == ident
    assert not list(tmp_path.glob("*.tmp"))  # a write cut short by a crash is removed
    assert (len(again), again.bytes) == (3, 300)
    seen = []
    while (head := again.head()) is not None:
        item, body = head
        assert body == bytes([item.seq]) * 100
        seen.append(item.seq)
        again.pop(item.seq)
    assert seen == [0, 1, 2] and again.bytes == 0


def test_sequence_numbers_never_repeat_across_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1000)
    used = [spool.take_seq() for _ in range(5)]
    spool.close()
    again = Spool(tmp_path, 1000)
    nxt = again.take_seq()
    assert used == [0, 1, 2, 3, 4] and nxt == LEASE  # above the whole lease of the first run
    for _ in range(LEASE):
        again.take_seq()
    again.close()
    assert Spool(tmp_path, 1000).take_seq() > nxt + LEASE


def test_full_spool_discards_oldest_but_never_the_batch_in_flight(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 350)
    fill(spool, range(3))
    dropped = spool.put(3, 10, 0, b"x" * 100)
    assert [d.seq for d in dropped] == [0]
    dropped = spool.put(4, 10, 7, b"y" * 100, keep=1)  # batch 1 is being sent
    assert [d.seq for d in dropped] == [2]
    spool.pop(1)  # acknowledged
    assert [s for s in (0, 1, 2) if (tmp_path / f"{s:020d}-10-0.batch").exists()] == []
    head = spool.head()
    assert head is not None and head[0].seq == 3
    with pytest.raises(OSError, match="larger than the whole spool"):
        spool.put(5, 1, 0, b"z" * 351)


def test_unreadable_batch_is_reported_not_fatal(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1000)
    fill(spool, range(2))
    first = tmp_path / "00000000000000000000-10-0.batch"
    first.unlink()
    first.mkdir()  # whatever happened to it, it cannot be read as a batch
    with pytest.raises(SpoolCorrupt, match="unreadable") as bad:
        spool.head()
    assert bad.value.item.seq == 0
    head = spool.head()
    assert head is not None and head[0].seq == 1


def test_one_collector_per_spool_directory(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1000)
    with pytest.raises(SpoolBusy, match="in use by another collector"):
        Spool(tmp_path, 1000)
    spool.close()
    Spool(tmp_path, 1000).close()


def test_an_older_batch_spooled_late_still_comes_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10_000)
    fill(spool, range(5, 8))
    fill(spool, range(2, 4))  # held in memory until exit, spooled after newer ones
    order = []
    while (head := spool.head()) is not None:
        order.append(head[0].seq)
        spool.pop(head[0].seq)
    assert order == [2, 3, 5, 6, 7]
