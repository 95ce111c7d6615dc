"""The pipeline's event loop sleeps until the probes' reader thread hands records over: one
future and one timer per wake-up, no wake-up lost, records handed over from a real thread
assembled and emitted at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from api.events import Alert, AnyEvent, ForkEvent
from collector import records as R
from collector.assemble import Assembler, Scope
from collector.pipeline import CallbackSink, Pipeline
from tests.unit.test_assemble import pack
from tests.unit.test_pipeline_losses import Losses


class Queue:
    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.lock = threading.Lock()

    def drain(self) -> list[list[bytes]]:
        with self.lock:
            out, self.batches = self.batches, []
            return out


class ThreadSource:
    """Hands a fork record over from a thread of its own, as the probes' reader does."""

    def __init__(self, delay: float) -> None:
        self.queue = Queue()
        self.delay = delay
        self.thread: threading.Thread | None = None

    def start(self, wake: Callable[[], None]) -> None:
        def run() -> None:
            time.sleep(self.delay)
            with self.queue.lock:
                self.queue.batches.append([pack(R.REC_FORK, pid=10, child_pid=11)])
            wake()

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def drain_now(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def collect(self) -> list[list[bytes]]:
        return self.queue.drain()

    def look_again(self) -> None:
        return None

    def losses(self) -> Losses:
        return Losses()


def pipeline(source: ThreadSource, seen: list[AnyEvent | Alert]) -> Pipeline:
    asm = Assembler([Scope("box", ["/"])], lambda _id: "/", lambda _p: "", host="h")
    return Pipeline(source, asm, [CallbackSink(seen.append)])


def test_a_record_handed_over_from_the_reader_thread_is_emitted_while_running() -> None:
    source = ThreadSource(delay=0.2)
    seen: list[AnyEvent | Alert] = []
    p = pipeline(source, seen)

    async def run() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(p.run(stop))
        started = time.monotonic()
        while not seen:
            assert time.monotonic() - started < 10, "the handed-over record was not emitted"
            await asyncio.sleep(0.01)
        stop.set()
        await task
        return time.monotonic() - started

    elapsed = asyncio.run(run())
    assert [type(e) for e in seen] == [ForkEvent]  # once, not again at the end
    assert elapsed >= 0.2


def test_sleep_returns_on_a_wake_up_from_another_thread_not_at_the_timeout() -> None:
    p = pipeline(ThreadSource(0), [])

    async def run() -> float:
        loop = asyncio.get_running_loop()
        threading.Timer(0.05, lambda: loop.call_soon_threadsafe(p._wake_up)).start()
        started = time.monotonic()
        await p._sleep(loop, 30.0)
        return time.monotonic() - started

    assert asyncio.run(run()) < 10


def test_a_wake_up_before_the_sleep_is_not_lost_and_a_quiet_sleep_ends_at_the_timeout() -> None:
    p = pipeline(ThreadSource(0), [])

    async def run() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        p._wake_up()  # records came while the loop was busy
        started = time.monotonic()
        await p._sleep(loop, 30.0)
        woken = time.monotonic() - started
        started = time.monotonic()
        await p._sleep(loop, 0.05)  # nothing since: the timeout
        return woken, time.monotonic() - started

    woken, quiet = asyncio.run(run())
    assert woken < 10
    assert 0.05 <= quiet < 10
