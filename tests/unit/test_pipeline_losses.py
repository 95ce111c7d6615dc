"""The pipeline turns the probes' cumulative loss counters into LostEvents of what is new,
the kernel's losses per sandbox index named by the sandbox they were counted for."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from dataclasses import dataclass, field

from api.events import Alert, AnyEvent, LostEvent
from collector import records as R
from collector.assemble import Assembler, Scope
from collector.pipeline import CallbackSink, Pipeline


@dataclass
class Losses:
    kernel: dict[int, int] = field(default_factory=dict)
    user: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    sandboxes: dict[int, int] = field(default_factory=dict)


class Queue:
    def drain(self) -> list[list[bytes]]:
        return []


class Source:
    def __init__(self) -> None:
        self.now = Losses()
        self.queue = Queue()

    def start(self, wake: Callable[[], None]) -> None:
        wake()

    def drain_now(self) -> None:
        return None

    def collect(self) -> list[list[bytes]]:
        return self.queue.drain()

    def look_again(self) -> None:
        return None

    def losses(self) -> Losses:
        return self.now


def test_kernel_losses_name_their_sandboxes_and_only_what_is_new() -> None:
    source = Source()
    seen: list[AnyEvent | Alert] = []
    scopes = [Scope("st-aaaa", ["/sandtrace/st-aaaa"]), Scope("st-bbbb", ["/sandtrace/st-bbbb"])]
    asm = Assembler(scopes, lambda _id: "/", lambda _p: "", host="h")
    pipeline = Pipeline(source, asm, [CallbackSink(seen.append)])
    source.now = Losses(kernel={R.REC_CONNECT: 5}, sandboxes={0: 3, 1: 2})
    pipeline.check_losses()
    source.now = Losses(kernel={R.REC_CONNECT: 9}, sandboxes={0: 3, 1: 4, 7: 2})
    pipeline.check_losses()
    pipeline.check_losses()  # nothing new: no event
    lost = [e for e in seen if isinstance(e, LostEvent)]
    assert [(e.kernel, e.sandboxes) for e in lost] == [
        ({"connect": 5}, {"st-aaaa": 3, "st-bbbb": 2}),
        ({"connect": 4}, {"st-bbbb": 2, "scope-7": 2}),
    ]
    assert len(seen) == 2


def test_what_exists_when_the_pipeline_starts_is_out_of_the_collectors_reach() -> None:
    """gc.freeze() once everything is built: full collections then scan only what came
    since (the rules, tables and probes are never garbage)."""
    built: list[list[int]] = [[] for _ in range(10)]  # stands for what was built before the run
    gc.unfreeze()
    asm = Assembler([Scope("st-aaaa", ["/"])], lambda _id: "/", lambda _p: "", host="h")
    pipeline = Pipeline(Source(), asm, [])

    async def run() -> None:
        stop = asyncio.Event()
        stop.set()
        await pipeline.run(stop)

    try:
        assert gc.get_freeze_count() == 0
        asyncio.run(run())
        assert gc.get_freeze_count() >= len(built)
    finally:
        gc.unfreeze()
