"""The event loop reads the rings itself while records come at a paced rate
(ProbeConfig.loop_reads, as the pipeline runs them): every record exactly once, the reader
thread asleep meanwhile (it wakes the loop only after a quiet spell), the rings back with the
thread when they are empty or flooded, and everything left read by drain_now()."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from collector import cgroups
from collector import records as R
from probes import kernel
from probes.loader import HAND_OVER_BUSY_RECORDS, REPEAT_WINDOW_NS, ProbeConfig, Probes
from tests.kernel.tracer import PYTHON

PACED = 300  # execs of /bin/true, a few milliseconds apart
PACED_CODE = f"""
import subprocess, time
for _ in range({PACED}):
    subprocess.run(["/bin/true"], check=True)
    time.sleep(0.002)
"""
FLOOD = 50_000  # UDP connects as fast as they go
FLOOD_CODE = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range({FLOOD}):
    s.connect(("127.0.0.1", 9))
"""


@dataclass
class Loop:
    """What the pipeline does with the probes, in a test's thread: sleep until woken or
    until look_again() says, then collect()."""

    probes: Probes
    records: list[R.AnyRecord] = field(default_factory=list)
    woken: threading.Event = field(default_factory=threading.Event)
    wakes: int = 0
    collects: int = 0
    held: int = 0  # collects made while the loop held the rings
    flood_given_back: bool = False  # a collect of a flood gave the rings back

    def wake(self) -> None:  # called from the reader thread
        self.wakes += 1
        self.woken.set()

    def trace(self, sandbox: cgroups.SandboxCgroup, code: str) -> subprocess.Popen[bytes]:
        """Start the probes, run Python `code` in the sandbox, turn until it has exited."""
        self.probes.start(self.wake)
        child = subprocess.Popen([PYTHON, "-c", code], preexec_fn=sandbox.join)  # noqa: PLW1509
        while child.poll() is None:
            self.turn()
        assert child.returncode == 0
        return child

    def finish(self) -> None:
        """What the pipeline does at its end: the reader drains the rings, then collect()."""
        self.probes.drain_now()
        self.records += [R.decode_record(b) for batch in self.probes.collect() for b in batch]

    def turn(self) -> list[R.AnyRecord]:
        look = self.probes.look_again()
        if look is None:
            self.woken.wait(0.1)
        else:
            time.sleep(look)
        self.woken.clear()
        batches = self.probes.collect()
        got = [R.decode_record(buf) for batch in batches for buf in batch]
        self.collects += 1
        if look is not None:
            self.held += 1
            if len(got) >= HAND_OVER_BUSY_RECORDS and self.probes.look_again() is None:
                self.flood_given_back = True
        self.records += got
        return got


@contextmanager
def probes_in_sandbox(repeat_window_ns: int) -> Iterator[tuple[Probes, cgroups.SandboxCgroup]]:
    config = ProbeConfig(loop_reads=True, repeat_window_ns=repeat_window_ns)
    probes = Probes(config, kernel.check())
    root = cgroups.find_cgroup2_root()
    sandbox = cgroups.create_sandbox(root)
    try:
        probes.trace_cgroup(sandbox.path, 0)
        yield probes, sandbox
    finally:
        probes.close()
        sandbox.destroy()


def test_paced_records_are_read_by_the_loop_each_once_the_thread_asleep() -> None:
    with probes_in_sandbox(REPEAT_WINDOW_NS) as (probes, sandbox):
        loop = Loop(probes)
        child = loop.trace(sandbox, PACED_CODE)
        # The rings empty, the loop gives them back within a look or two.
        deadline = time.monotonic() + 5
        while probes.look_again() is not None:
            assert time.monotonic() < deadline, "the loop kept the rings of a quiet sandbox"
            loop.turn()
        # A record after the quiet spell wakes the loop from the reader thread at once.
        wakes = loop.wakes
        late = subprocess.Popen(["/bin/true", "after-quiet"], preexec_fn=sandbox.join)  # noqa: PLW1509
        late.wait()
        started = time.monotonic()
        while not any(isinstance(r, R.ExecRecord) and r.pid == late.pid for r in loop.turn()):
            assert time.monotonic() - started < 5, "the record after a quiet spell never came"
        assert loop.wakes > wakes
        loop.finish()
        assert probes.look_again() is None
        losses = probes.losses()
    execs = [r for r in loop.records if isinstance(r, R.ExecRecord) and r.ppid == child.pid]
    assert len(execs) == PACED  # each exactly once, none lost
    assert len({r.pid for r in execs}) == PACED
    assert [r.pid for r in loop.records if isinstance(r, R.ExitRecord)].count(child.pid) == 1
    assert losses.user == 0 and sum(losses.kernel.values()) == 0
    # While the records kept coming the loop held the rings and read them on its own timer:
    # the thread woke it far less often than it looked.
    assert loop.held >= loop.collects // 2, (loop.held, loop.collects)
    assert loop.wakes <= loop.collects // 4, (loop.wakes, loop.collects)


def test_a_flood_goes_back_to_the_reader_thread_and_nothing_is_lost() -> None:
    with probes_in_sandbox(repeat_window_ns=0) as (probes, sandbox):
        loop = Loop(probes)
        child = loop.trace(sandbox, FLOOD_CODE)
        loop.finish()
        losses = probes.losses()
    connects = [r for r in loop.records if isinstance(r, R.ConnectRecord) and r.pid == child.pid]
    assert len(connects) + losses.kernel.get(R.REC_CONNECT, 0) == FLOOD
    assert losses.user == 0
    assert loop.flood_given_back, "no collect of the loop read a flood and gave the rings back"
