"""Exponential backoff: the delays between tries, computed here; the waiting is the caller's.

    backoff = Backoff(first=0.5, cap=8.0)
    while True:
        try:
            attempt()
        except Transient:
            await asyncio.sleep(backoff.next())  # 0.5, 1, 2, 4, 8, 8, ...
        else:
            backoff.reset()  # the next failure waits `first` again

Every loop of sandtrace that retries over the network (an output's deliveries, a collector's
batches to the service, `sandtrace tail` reconnecting) takes its delays from a Backoff and
waits in its own way (a sleep, or an event that a shutdown sets to cut the wait short).
"""

from __future__ import annotations


class Backoff:
    """Delays that start at `first` and double after each one given, up to `cap`.

    The first delay is `first` even when it exceeds `cap`; every later one is at most `cap`.
    """

    __slots__ = ("_delay", "cap", "first")

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self._delay = first

    def __repr__(self) -> str:
        return f"Backoff(first={self.first!r}, cap={self.cap!r}, next={self._delay!r})"

    def next(self) -> float:
        """The delay to wait now; the one after it is twice as long (at most cap)."""
        delay = self._delay
        self._delay = min(delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        """After a success: the next delay is `first` again."""
        self._delay = self.first
