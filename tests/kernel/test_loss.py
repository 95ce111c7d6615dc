"""Nothing is dropped silently: a flood larger than the ring buffer is delivered or counted."""

from __future__ import annotations

from collector import cgroups
from collector import records as R
from probes import kernel
from probes.loader import ProbeConfig, Probes
from tests.kernel.tracer import PYTHON

FLOOD = 40_000

CODE = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range({FLOOD}):
    s.connect(("127.0.0.1", 9))
"""


def test_flood_is_delivered_or_counted() -> None:
    # One page of ring buffer (4 KiB, about 24 connect records) against a flood of 40,000,
    # every connect sent (none counted as a repeat in the kernel: see test_flood.py).
    probes = Probes(ProbeConfig(ring_pages=1, repeat_window_ns=0), kernel.check())
    root = cgroups.find_cgroup2_root()
    sandbox = cgroups.create_sandbox(root)
    try:
        probes.trace_cgroup(sandbox.path, 0)
        delivered = 0
        pid = 0

        def count() -> None:
            nonlocal delivered
            for batch in probes.queue.drain():
                for buf in batch:
                    rec = R.decode_record(buf)
                    if isinstance(rec, R.ConnectRecord) and rec.pid == pid:
                        delivered += 1

        probes.start(lambda: None)
        import subprocess  # noqa: PLC0415

        child = subprocess.Popen(
            [PYTHON, "-c", CODE],
            preexec_fn=sandbox.join,  # noqa: PLW1509
        )
        pid = child.pid
        while child.poll() is None:
            count()
        assert child.returncode == 0
        probes.drain_now()  # reads everything left in the ring before returning
        count()
        losses = probes.losses()
        lost = losses.kernel.get(R.REC_CONNECT, 0)
        assert lost > 0, "the flood should overrun a one-page ring"
        assert delivered > 0
        assert losses.user == 0
        assert delivered + lost == FLOOD
    finally:
        probes.close()
        sandbox.destroy()
