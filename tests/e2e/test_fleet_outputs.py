"""`[[output]]` sinks of a fleet worker, fed from the fleet's streams by durable consumers:
real workers on a real NATS server, collector sinks streaming numbered events, a JSON-lines
file and a real rsyslogd as sinks. The ground truth is what the collectors sent: every
event numbered per host, every hit of the test rule known in advance."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from tests.e2e.fleet import Proc, cleaning, start_collector, start_worker, write_config
from tests.e2e.natscluster import nats_cluster, server_port
from tests.e2e.test_fleet import wait_until
from tests.e2e.test_siem_outputs import run_rsyslogd

EVENTS, HIT_EVERY = 50, 7


def _lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stream(url: str, host: str, batches: int, procs: list[Proc], *extra: str) -> Proc:
    collector = start_collector(
        url, host, batches, "--events", str(EVENTS), "--hit-every", str(HIT_EVERY), *extra
    )
    procs.append(collector)
    return collector


def _hits(sent: dict[str, int]) -> Counter[tuple[str, int]]:
    return Counter((h, n) for h, count in sent.items() for n in range(0, count, HIT_EVERY))


def test_outputs_get_every_alert_and_event_once_across_restarts(tmp_path: Path) -> None:
    """A worker with a JSON-lines file for alerts and one for events, and a syslog output
    to rsyslogd: stopped (SIGTERM) while a collector streams and started again, and once
    more with batches stored while no worker ran. Each file ends with every alert and every
    event exactly once, each host's events in order; rsyslogd got every alert once."""
    alerts_file, events_file = tmp_path / "alerts.jsonl", tmp_path / "events.jsonl"
    with run_rsyslogd(tmp_path / "rsyslog", server_port()) as rsyslog:
        outputs = f"""
[[output]]
type = "jsonl"
name = "alerts-file"
path = "{alerts_file}"
what = "alerts"

[[output]]
type = "jsonl"
name = "events-file"
path = "{events_file}"
what = "events"

[[output]]
type = "syslog"
name = "siem"
address = "127.0.0.1:{rsyslog.port}"
what = "alerts"
"""
        config = write_config(tmp_path, "partitions = 2\nreplicas = 1\n" + outputs)
        sent = {"node-a": 40 * EVENTS, "node-b": 20 * EVENTS}
        with nats_cluster(size=1) as cluster, cleaning([]) as procs:
            worker, _port = start_worker(cluster.url, config, "w1")
            procs.append(worker)
            assert "3 outputs" in worker.log(), worker.log()
            first = _stream(cluster.url, "node-a", 40, procs, "--pause", "0.1")
            wait_until("alerts written", lambda: len(_lines(alerts_file)) >= 10)
            assert worker.stop() == 0, worker.log()  # mid-stream
            stopped_at = len(_lines(alerts_file))
            assert first.proc.wait(timeout=60) == 0, first.log()
            second = _stream(cluster.url, "node-b", 20, procs)  # no worker runs
            assert second.proc.wait(timeout=60) == 0, second.log()
            assert len(_lines(alerts_file)) == stopped_at
            worker, _port = start_worker(cluster.url, config, "w1")
            procs.append(worker)
            want = _hits(sent)
            total = sum(want.values())
            wait_until("every alert written", lambda: len(_lines(alerts_file)) >= total)
            events = sum(sent.values())
            wait_until("every event written", lambda: len(_lines(events_file)) >= events)
            wait_until("rsyslogd got every alert", lambda: len(rsyslog.lines()) >= total)
            time.sleep(1.5)  # anything more would come now
            assert worker.stop() == 0, worker.log()
    alerts = _lines(alerts_file)
    got = Counter((str(a["host"]), int(a["process"]["argv"][2])) for a in alerts)  # type: ignore[index]
    assert got == want, f"missing {want - got}, doubled {got - want}"
    assert len({a["alert_id"] for a in alerts}) == total
    numbers: dict[str, list[int]] = {h: [] for h in sent}
    for e in _lines(events_file):
        numbers[str(e["host"])].append(int(e["argv"][2]))  # type: ignore[index]
    for host, count in sent.items():
        assert numbers[host] == list(range(count)), f"{host}: events lost, doubled or reordered"
    syslog_ids = Counter(line.split("|", 7)[7] for line in rsyslog.lines())
    assert len(syslog_ids) == total and set(syslog_ids.values()) == {1}


def test_a_file_output_is_exactly_once_across_a_kill(tmp_path: Path) -> None:
    """With a state directory a JSON-lines file is cut back at the next start to where the
    last acknowledged chunk ended. A worker killed (SIGKILL, by itself: a failpoint) after
    writing a chunk and before saving and acknowledging it, and a worker started after it:
    every alert in the file exactly once."""
    alerts_file = tmp_path / "alerts.jsonl"
    outputs = f"""
[server]
state_dir = "{tmp_path / "state"}"

[[output]]
type = "jsonl"
name = "alerts-file"
path = "{alerts_file}"
what = "alerts"
"""
    config = write_config(tmp_path, "partitions = 2\nreplicas = 1\n" + outputs)
    sent = {"node-k": 60 * EVENTS}
    want = _hits(sent)
    with nats_cluster(size=1) as cluster, cleaning([]) as procs:
        doomed, _port = start_worker(
            cluster.url,
            config,
            "w1",
            env={"SANDTRACE_FAILPOINT": "kill-before-commit:alerts>=150"},
        )
        procs.append(doomed)
        collector = _stream(cluster.url, "node-k", 60, procs)
        assert collector.proc.wait(timeout=60) == 0, collector.log()
        assert doomed.proc.wait(timeout=60) == -9, doomed.log()
        written = len(_lines(alerts_file))
        assert 150 <= written < sum(want.values()), written  # a chunk written, not saved
        worker, _port = start_worker(cluster.url, config, "w2")
        procs.append(worker)
        assert "output alerts-file: took back" in worker.log(), worker.log()
        wait_until("every alert written", lambda: len(_lines(alerts_file)) >= len(want))
        time.sleep(1.5)  # anything more would come now
    got = Counter(_key(a) for a in _lines(alerts_file))
    assert got == want, f"missing {want - got}, doubled {got - want}"


def _key(alert: dict[str, object]) -> tuple[str, int]:
    return (str(alert["host"]), int(alert["process"]["argv"][2]))  # type: ignore[index]
