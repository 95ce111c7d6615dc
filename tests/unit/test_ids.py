"""Alert ids (api/ids.py): UUIDv7 as RFC 9562 lays it out, unique, time-ordered."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from api import ids
from api.ids import uuid7

ROOT_DIR = Path(__file__).resolve().parents[2]


def ms_of(text: str) -> int:
    return uuid.UUID(text).int >> 80


def test_layout_version_and_variant() -> None:
    before = time.time_ns() // 1_000_000
    text = uuid7()
    after = time.time_ns() // 1_000_000
    value = uuid.UUID(text)
    assert str(value) == text and len(text) == 36 and text == text.lower()
    assert value.version == 7
    assert value.variant == uuid.RFC_4122  # the bits 10 of RFC 9562's variant
    assert before <= ms_of(text) <= after + 1  # the Unix time in milliseconds, first


def test_a_hundred_thousand_are_unique_and_sorted() -> None:
    made = [uuid7() for _ in range(100_000)]
    assert len(set(made)) == len(made)
    assert made == sorted(made)  # as strings: the canonical form sorts as the number does
    assert all(uuid.UUID(t).version == 7 for t in made[::997])


def test_ids_made_within_one_millisecond_count_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "_counter", ids._Counter())  # a fresh state, restored after
    now = 1_900_000_000_000 * 1_000_000 + 123_456  # one fixed instant
    made = [uuid7(now) for _ in range(1000)]
    assert made == sorted(made) and len(set(made)) == 1000
    assert {ms_of(t) for t in made} == {1_900_000_000_000}
    counters = [uuid.UUID(t).int >> 64 & 0xFFF for t in made]
    assert counters == list(range(counters[0], counters[0] + 1000))
    # past 4,096 in one millisecond the next one is borrowed: still in order, still unique
    more = [uuid7(now) for _ in range(5000)]
    assert made + more == sorted(made + more) and len(set(more)) == 5000
    assert ms_of(more[-1]) == 1_900_000_000_001
    # a clock that steps back does not make an id sort before one made earlier
    earlier = uuid7(now - 5_000_000_000)
    assert earlier > more[-1]


CHILD = """
import sys, time
from api.ids import uuid7
start = int(sys.argv[1])
while time.time_ns() < start:
    pass
print("\\n".join(uuid7() for _ in range(20_000)))
"""


def test_two_processes_started_together_make_different_ids() -> None:
    """Same milliseconds, both counters started at random: no id in common."""
    start = time.time_ns() + 1_500_000_000  # both spin until then: they begin together
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(start)],
            cwd=ROOT_DIR,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    out = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    a, b = out
    assert len(a) == len(b) == 20_000 and len(set(a)) == len(set(b)) == 20_000
    assert set(a).isdisjoint(b)
    shared_ms = {ms_of(t) for t in a} & {ms_of(t) for t in b}
    assert shared_ms, "the two processes did not make ids in the same milliseconds"
