"""Fold windows end in a fleet as in `sandtrace serve`: real workers on a real NATS cluster,
a real collector sink streaming one process's repeated hits of the test rule. The ground
truth: every hit is by one process, so the stream must hold its first alert and, once the
fold window is over, one summary counting every hit, naming that alert."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from api.events import Alert, decode
from fleet import names
from tests.e2e.fleet import FLEET_RULE_ID, cleaning, start_collector, start_worker, write_config
from tests.e2e.natscluster import nats_cluster
from tests.e2e.test_fleet import _values, healthz, metrics, read_stream, wait_until

HOST = "folding-node"
BATCHES, EVENTS, HIT_EVERY = 6, 20, 5
HITS = BATCHES * EVENTS // HIT_EVERY


def _alerts(url: str) -> list[Alert]:
    out = []
    for msg in asyncio.run(read_stream(url, names.ALERTS_STREAM)):
        alert = decode(msg.data)
        assert isinstance(alert, Alert) and alert.rule_id == FLEET_RULE_ID
        out.append(alert)
    return out


def _stream_one_folding_host(url: str, procs: list) -> None:  # type: ignore[type-arg]
    collector = start_collector(
        url,
        HOST,
        BATCHES,
        "--events",
        str(EVENTS),
        "--hit-every",
        str(HIT_EVERY),
        "--same-process",
        "--pause",
        "0.05",
    )
    procs.append(collector)
    assert collector.proc.wait(timeout=60) == 0, collector.log()


def _first_and_summary(alerts: list[Alert]) -> None:
    """The stream holds exactly the first alert and one summary of all the hits."""
    assert [a.repeat for a in alerts] == [False, True], alerts
    first, summary = alerts
    assert first.count == 1 and int(first.process.argv[2]) == 0
    assert summary.count == HITS
    assert summary.folds == first.alert_id
    assert summary.alert_id != first.alert_id


def test_a_fold_window_ends_and_its_summary_is_stored_once(tmp_path: Path) -> None:
    """With no event after the window, the worker's own expiry ends it (serve's every
    second): one summary in the alert stream, and none more while the worker runs on."""
    config = write_config(tmp_path, "partitions = 2\nreplicas = 1", fold_seconds=3)
    with nats_cluster(size=1) as cluster, cleaning([]) as procs:
        worker, port = start_worker(cluster.url, config, "w1")
        procs.append(worker)
        started = time.monotonic()
        _stream_one_folding_host(cluster.url, procs)
        wait_until("the summary stored", lambda: len(_alerts(cluster.url)) >= 2, timeout=30)
        # the window (3 s) and the expiry's grace (2 s) are over before, not much later
        assert time.monotonic() - started < 20
        time.sleep(3.0)  # more seconds of expiry: nothing else comes out
        _first_and_summary(_alerts(cluster.url))
        assert sum(_values(metrics(port), "sandtrace_fleet_alerts_total")) == 2
        assert worker.proc.poll() is None, worker.log()


# JetStream's duplicate window kept short: a summary stored twice would be kept twice, so
# what these tests see is the workers' own bookkeeping (the expiry marks), not JetStream's.
SHORT_DEDUP = "partitions = 2\nreplicas = 1\nduplicate_window = 1\nrebuild_seconds = 600"


def test_the_last_worker_stopped_stores_the_open_summaries_once(tmp_path: Path) -> None:
    """SIGTERM to the only worker while a fold window is open (600 s): it stores the summary
    before it goes. A worker started afterwards rebuilds the fold from the stream and knows
    it was ended: no second summary, not even when it stops as the last worker in turn."""
    config = write_config(tmp_path, SHORT_DEDUP, fold_seconds=600)
    with nats_cluster(size=1) as cluster, cleaning([]) as procs:
        worker, port = start_worker(cluster.url, config, "w1")
        procs.append(worker)
        _stream_one_folding_host(cluster.url, procs)
        wait_until(
            "every batch handled",
            lambda: sum(_values(metrics(port), "sandtrace_fleet_batches_total")) == BATCHES,
        )
        assert len(_alerts(cluster.url)) == 1  # the window is open: no summary yet
        asked = time.monotonic()
        assert worker.stop() == 0, worker.log()
        # no subscription left to hold the connection's drain (its timeout is 30 s)
        assert time.monotonic() - asked < 10, worker.log()
        _first_and_summary(_alerts(cluster.url))
        heir, heir_port = start_worker(cluster.url, config, "w2")
        procs.append(heir)
        wait_until(
            "the heir holds both partitions",
            lambda: len(healthz(heir_port)["partitions"]) == 2,
        )
        wait_until(
            "the heir rebuilt the fold",
            lambda: (
                sum(_values(metrics(heir_port), "sandtrace_fleet_rebuilt_batches_total")) == BATCHES
            ),
        )
        time.sleep(2.0)  # past the duplicate window of the summary stored at the first stop
        assert heir.stop() == 0, heir.log()  # the last worker again: nothing open to store
        _first_and_summary(_alerts(cluster.url))


def test_a_new_owner_does_not_store_a_summary_again(tmp_path: Path) -> None:
    """The owner stores a summary when its window (2 s) ends and is SIGKILLed later; the
    next owner replays the fold's batches (rebuild_seconds), ends the window as the old
    owner did and, its expiry mark saying so, does not store the summary again."""
    config = write_config(tmp_path, SHORT_DEDUP, fold_seconds=2)
    with nats_cluster(size=1) as cluster, cleaning([]) as procs:
        worker, _port = start_worker(cluster.url, config, "w1")
        procs.append(worker)
        _stream_one_folding_host(cluster.url, procs)
        wait_until("the summary stored", lambda: len(_alerts(cluster.url)) >= 2, timeout=30)
        time.sleep(2.0)  # the expiry mark saved (every lease/4: 0.5 s), the window long past
        worker.kill()
        heir, heir_port = start_worker(cluster.url, config, "w2")
        procs.append(heir)
        wait_until(
            "the heir rebuilt the fold",
            lambda: (
                sum(_values(metrics(heir_port), "sandtrace_fleet_rebuilt_batches_total")) == BATCHES
            ),
        )
        time.sleep(4.0)  # seconds of the heir's expiry
        _first_and_summary(_alerts(cluster.url))
        assert heir.proc.poll() is None, heir.log()


def test_a_handed_over_fold_is_summarised_once_by_the_next_owner(tmp_path: Path) -> None:
    """SIGTERM to the owner while another worker runs: it hands the partition over without
    ending the window; the heir rebuilds the fold from the stream and stores its summary
    when the window ends, once."""
    config = write_config(tmp_path, "partitions = 2\nreplicas = 1", fold_seconds=8)
    partition = names.fnv1a_partition(HOST, 2)
    with nats_cluster(size=1) as cluster, cleaning([]) as procs:
        w1, port1 = start_worker(cluster.url, config, "w1")
        w2, port2 = start_worker(cluster.url, config, "w2")
        procs += [w1, w2]
        wait_until(
            "each worker holds a partition",
            lambda: len(healthz(port1)["partitions"]) == len(healthz(port2)["partitions"]) == 1,
        )
        owner, owner_port, heir, heir_port = (
            (w1, port1, w2, port2)
            if partition in healthz(port1)["partitions"]
            else (w2, port2, w1, port1)
        )
        _stream_one_folding_host(cluster.url, procs)
        wait_until(
            "every batch handled",
            lambda: sum(_values(metrics(owner_port), "sandtrace_fleet_batches_total")) == BATCHES,
        )
        assert owner.stop() == 0, owner.log()
        assert len(_alerts(cluster.url)) == 1  # handed over: the window is still open
        wait_until("the heir holds both", lambda: len(healthz(heir_port)["partitions"]) == 2)
        wait_until("the summary stored", lambda: len(_alerts(cluster.url)) >= 2, timeout=30)
        time.sleep(3.0)
        _first_and_summary(_alerts(cluster.url))
        assert sum(_values(metrics(heir_port), "sandtrace_fleet_rebuilt_batches_total")) >= 1
        assert heir.proc.poll() is None, heir.log()
