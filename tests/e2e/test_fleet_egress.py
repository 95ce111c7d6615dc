"""A fleet worker (`sandtrace serve --nats`, real, on a real one-node NATS JetStream) re-reads
its `[detection] egress_policy` file on SIGHUP, as `sandtrace serve` does: a connect the old
policy alerts on is silent under the new one, a bad file keeps the policy in use. The test
streams connect events itself through the collector's NATS sink, so every alert expected is
one it knows in advance."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from api.events import Alert, ConnectEvent, Process, decode
from detect.egress import EGRESS_RULE_ID
from fleet import names
from tests.e2e.fleet import cleaning, start_worker, write_config
from tests.e2e.natscluster import nats_cluster
from tests.e2e.test_fleet import read_stream, wait_until

HOST = "egress-node"
ALLOWED, LATER, NEVER = "192.0.2.10", "203.0.113.9", "198.51.100.77"


def connect(pid: int, daddr: str) -> ConnectEvent:
    process = Process(
        pid=pid,
        tid=pid,
        ns_pid=pid,
        ppid=1,
        uid=0,
        gid=0,
        comm=b"curl",
        start_ns=pid,
        key=f"{pid}@{pid}",
        exe=b"/usr/bin/curl",
    )
    return ConnectEvent(
        time_ns=time.time_ns(),
        mono_ns=time.monotonic_ns(),
        host=HOST,
        sandbox="sb-egress",
        cgroup_id=1,
        cgroup_path="/sandtrace/sb-egress",
        container_id="",
        process=process,
        protocol="tcp",
        family="ipv4",
        daddr=daddr,
        dport=443,
        outcome="success",
    )


def send(url: str, events: list[ConnectEvent]) -> None:
    """Stream the events as a collector does (collector/natsstream.py), all of them stored."""
    from collector.natsstream import NatsStreamSink  # noqa: PLC0415

    async def go() -> None:
        sink = NatsStreamSink(url, None, host=HOST, batch_events=10, linger=0.05)
        for event in events:
            sink.emit(event)
        await sink.aclose(deadline=30)
        assert sink.stats.sent_events == len(events)

    asyncio.run(go())


def egress_alerts(url: str) -> list[tuple[int, str]]:
    """(pid, description) of each egress allow-list alert stored, in stream order."""
    out = []
    for msg in asyncio.run(read_stream(url, names.ALERTS_STREAM)):
        alert = decode(msg.data)
        assert isinstance(alert, Alert)
        if alert.rule_id == EGRESS_RULE_ID and not alert.repeat:
            out.append((alert.process.pid, alert.description))
    return out


def policy(path: Path, allow: list[str]) -> None:
    path.write_text(f"[default]\nallow = [{', '.join(repr(a) for a in allow)}]\n")


def test_sighup_reloads_the_egress_policy_of_a_fleet_worker(tmp_path: Path) -> None:
    egress = tmp_path / "egress.toml"
    policy(egress, [f"{ALLOWED}:443"])
    config = write_config(tmp_path, "partitions = 1\nreplicas = 1")
    config.write_text(
        config.read_text().replace("[detection]\n", f'[detection]\negress_policy = "{egress}"\n')
    )
    denied = f"tcp {LATER}:443 is not on the allow-list"
    with nats_cluster(size=1) as cluster, cleaning([]) as procs:
        worker, _port = start_worker(cluster.url, config, "w1")
        procs.append(worker)
        send(cluster.url, [connect(1001, ALLOWED), connect(1002, LATER)])
        wait_until("the first alert", lambda: len(egress_alerts(cluster.url)) >= 1)
        # a bad file: said, and the policy in use stays
        egress.write_text('[default]\nallow = ["bad name"]\n')
        worker.proc.send_signal(signal.SIGHUP)
        worker.wait_for(f"sandtrace: SIGHUP: {egress} not reloaded (1 problem, listed above)")
        send(cluster.url, [connect(1003, LATER)])
        wait_until("the second alert", lambda: len(egress_alerts(cluster.url)) >= 2)
        # LATER allowed from now on; NEVER still alerts (and shows the worker went on)
        policy(egress, [f"{ALLOWED}:443", f"{LATER}:443"])
        worker.proc.send_signal(signal.SIGHUP)
        worker.wait_for(f"sandtrace: SIGHUP: egress policy {egress} of 2")
        send(cluster.url, [connect(1004, LATER), connect(1005, NEVER)])
        wait_until("the third alert", lambda: len(egress_alerts(cluster.url)) >= 3)
        time.sleep(1.0)  # anything more would come now
        assert worker.stop() == 0, worker.log()
        assert egress_alerts(cluster.url) == [
            (1002, denied),
            (1003, denied),
            (1005, f"tcp {NEVER}:443 is not on the allow-list"),
        ]
    assert f"sandtrace: SIGHUP: {egress}: [default] allow[0]: 'bad name': " in worker.log()
