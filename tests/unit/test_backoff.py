"""api.backoff: the delays of the retry loops (outputs, collector stream, tail client)."""

from __future__ import annotations

from itertools import islice

from hypothesis import given
from hypothesis import strategies as st

from api.backoff import Backoff


def delays(backoff: Backoff, n: int) -> list[float]:
    return [backoff.next() for _ in range(n)]


def test_doubles_up_to_the_cap() -> None:
    assert delays(Backoff(0.5, 8.0), 8) == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    assert delays(Backoff(0.25, 1.0), 5) == [0.25, 0.5, 1.0, 1.0, 1.0]


def test_a_cap_that_is_not_a_doubling_of_first_is_reached_exactly() -> None:
    assert delays(Backoff(0.5, 3.0), 5) == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_first_above_the_cap_is_waited_once_then_the_cap() -> None:
    # as the loops always did: the first delay is `first`, the doubling is capped
    assert delays(Backoff(0.25, 0.1), 4) == [0.25, 0.1, 0.1, 0.1]


def test_reset_starts_again_from_first() -> None:
    backoff = Backoff(0.5, 8.0)
    assert delays(backoff, 3) == [0.5, 1.0, 2.0]
    backoff.reset()
    assert delays(backoff, 2) == [0.5, 1.0]


def test_repr_shows_the_next_delay() -> None:
    backoff = Backoff(0.5, 8.0)
    backoff.next()
    assert repr(backoff) == "Backoff(first=0.5, cap=8.0, next=1.0)"


@given(
    st.floats(min_value=1e-3, max_value=100.0),
    st.floats(min_value=1e-3, max_value=100.0),
    st.integers(min_value=1, max_value=40),
)
def test_matches_the_loops_arithmetic(first: float, cap: float, n: int) -> None:
    """What each retry loop computed by hand: delay = first; after each wait,
    delay = min(delay * 2, cap)."""

    def by_hand() -> list[float]:
        out, delay = [], first
        for _ in range(n):
            out.append(delay)
            delay = min(delay * 2, cap)
        return out

    got = delays(Backoff(first, cap), n)
    assert got == by_hand()
    assert all(d <= cap for d in islice(got, 1, None))
