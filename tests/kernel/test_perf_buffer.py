"""The perf-buffer fallback (kernels before 5.8) delivers the same events as the ring."""

from __future__ import annotations

import socket

from collector import cgroups
from probes import kernel
from probes.loader import ProbeConfig, Probes
from tests.kernel.tracer import PYTHON, Tracer, one


def test_perf_buffer_delivers_exec_and_connect() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    probes = Probes(ProbeConfig(perf_buffer=True, ring_pages=64), kernel.check())
    try:
        assert probes.use_perf
        t = Tracer(probes, cgroups.find_cgroup2_root())
        code = f"import socket; socket.create_connection(('127.0.0.1', {port})).close()"
        with t.sandbox() as sb:
            pid, _, events = sb.run([PYTHON, "-c", code, "extra arg"])
        losses = probes.losses()
    finally:
        probes.close()
        srv.close()
    ev = one(events, "exec", pid)
    assert ev.argv == [PYTHON.encode(), b"-c", code.encode(), b"extra arg"]
    conn = one(events, "connect", pid)
    assert (conn.daddr, conn.dport, conn.outcome) == ("127.0.0.1", port, "success")
    assert losses.kernel == {}
