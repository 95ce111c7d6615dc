"""A flood of cheap connects must not hide what comes next: three million UDP connects to
one loopback destination while a staged miner starts. The kernel counts repeats instead of
sending them, so the miner's exec and connect arrive, and the flood is reported exactly:
its first connect, then counts that add up to every call it made."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.events import ConnectEvent, ExecEvent
from collector import cgroups
from collector import records as R
from probes import kernel
from probes.loader import REPEAT_BUDGET, REPEAT_WINDOW_NS, ProbeConfig, Probes
from tests.kernel.tracer import PYTHON, Tracer, of

ROOT = Path(__file__).resolve().parents[2]
FLOOD = 3_000_000

# A miner's launch, staged: its argv, then a TCP connect to the "pool" (a local listener).
MINER = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.close()
"""


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("bench") / "micro"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(ROOT / "bench" / "micro.c")], check=True)
    return exe


@pytest.fixture
def pool() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


def test_flood_then_staged_miner(tracer: Tracer, micro: Path, pool: int) -> None:
    lost_before = tracer.probes.losses().kernel
    started = time.monotonic()
    with tracer.sandbox() as sb:
        flood = sb.spawn([str(micro), "connect", str(FLOOD)], stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)  # the flood is under way
            miner_argv = [PYTHON, "-c", MINER, str(pool), "-o", f"stratum+tcp://127.0.0.1:{pool}"]
            miner, _, _ = sb.run(miner_argv)
            assert flood.poll() is None, "the flood ended before the miner started"
            assert flood.wait(timeout=120) == 0
            seconds = time.monotonic() - started
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait()
        sb.wait_exit(flood.pid)
        # what the kernel still counts, as the collector's periodic drain reports it
        tracer.probes.drain_repeats(time.monotonic_ns() + REPEAT_WINDOW_NS)
        tracer.collect()
        events = sb.events()
    exec_ev = [e for e in of(events, "exec", miner) if isinstance(e, ExecEvent)]
    assert [e.argv[-1] for e in exec_ev] == [f"stratum+tcp://127.0.0.1:{pool}".encode()]
    miner_connects = [e for e in of(events, "connect", miner) if isinstance(e, ConnectEvent)]
    assert [(c.protocol, c.daddr, c.dport, c.outcome) for c in miner_connects] == [
        ("tcp", "127.0.0.1", pool, "success")
    ]
    flood_connects = [e for e in of(events, "connect", flood.pid) if isinstance(e, ConnectEvent)]
    assert {(c.protocol, c.daddr, c.dport) for c in flood_connects} == {("udp", "127.0.0.1", 9)}
    sent = [c for c in flood_connects if c.outcome == "success"]
    # at most REPEAT_BUDGET sent a window (of a second), and every connect made is either
    # sent or counted
    assert REPEAT_BUDGET <= len(sent) <= REPEAT_BUDGET * (seconds + 2)
    assert len(sent) + sum(c.repeats for c in flood_connects) == FLOOD
    assert flood_connects[-1].outcome == "repeated"
    assert tracer.probes.losses().kernel == lost_before


FLOOD_CODE = """
import socket, subprocess, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(40_000):
    s.connect(("127.0.0.1", 9))
    if i == 20_000:  # the staged program, in the thick of the flood
        print(subprocess.Popen(["/usr/bin/true", "staged-miner"]).wait(), flush=True)
"""


def test_exec_survives_a_flood_that_fills_the_main_ring() -> None:
    """Every connect sent (no counting) into a one-page main ring: connects are lost (and
    counted), the exec, fork and exit records of the priority ring are not."""
    probes = Probes(ProbeConfig(ring_pages=1, repeat_window_ns=0), kernel.check())
    root = cgroups.find_cgroup2_root()
    sandbox = cgroups.create_sandbox(root)
    records: list[R.AnyRecord] = []
    try:
        probes.trace_cgroup(sandbox.path, 0)
        probes.start(lambda: None)
        child = subprocess.Popen([PYTHON, "-c", FLOOD_CODE], preexec_fn=sandbox.join)  # noqa: PLW1509
        while child.poll() is None:
            records += [R.decode_record(b) for batch in probes.queue.drain() for b in batch]
            time.sleep(0.05)  # a slow reader: the main ring overflows
        probes.drain_now()
        records += [R.decode_record(b) for batch in probes.queue.drain() for b in batch]
        losses = probes.losses()
    finally:
        probes.close()
        sandbox.destroy()
    assert child.returncode == 0
    assert losses.kernel.get(R.REC_CONNECT, 0) > 0, "the flood should overrun a one-page ring"
    assert losses.sandboxes == {0: sum(losses.kernel.values())}  # all of sandbox index 0
    for rtype in (R.REC_EXEC, R.REC_FORK, R.REC_EXIT):
        assert losses.kernel.get(rtype, 0) == 0
    staged = [
        r
        for r in records
        if isinstance(r, R.ExecRecord)
        and R.exec_parts(r).argv == [b"/usr/bin/true", b"staged-miner"]
    ]
    assert len(staged) == 1
    assert any(isinstance(r, R.ExitRecord) and r.pid == staged[0].pid for r in records)
