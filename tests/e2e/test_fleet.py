"""A fleet on a real 3-node NATS JetStream cluster on loopback: real `sandtrace serve --nats`
workers, collectors streaming through the collector's NATS sink, and failures in the middle
of the stream (a worker and a NATS node SIGKILLed). The ground truth is what the collectors
sent: every event numbered per host, every hit of the test rule known in advance."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from api.events import Alert, decode
from fleet import names
from tests.e2e.fleet import (
    FLEET_RULE_ID,
    Proc,
    cleaning,
    spawn,
    start_collector,
    start_worker,
    write_config,
)
from tests.e2e.natscluster import NatsCluster, nats_cluster
from tests.tlsutil import make_tls

HOSTS = ["gpu-node-1", "gpu-node-2", "trainer.a.example", "trainer.b.example"]


async def read_stream(url: str, stream: str) -> list[Any]:
    """Every message of a stream, in stream order. A reader's consumer that is not ready yet
    (JetStream answers 503 while it places it) is tried again, a few times."""
    from nats.js.errors import ServiceUnavailableError  # noqa: PLC0415

    for attempt in range(5):
        try:
            return await _read_stream(url, stream)
        except ServiceUnavailableError:
            if attempt == 4:
                raise
            await asyncio.sleep(1)
    raise AssertionError("unreachable")


async def _read_stream(url: str, stream: str) -> list[Any]:
    import nats  # noqa: PLC0415
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy  # noqa: PLC0415

    nc = await nats.connect(url.split(","))
    try:
        js = nc.jetstream(timeout=10)
        total = (await js.stream_info(stream)).state.messages
        sub = await js.pull_subscribe(
            ">",
            None,
            stream=stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                num_replicas=1,
                mem_storage=True,
            ),
        )
        out: list[Any] = []
        while len(out) < total:
            out += await sub.fetch(min(256, total - len(out)), timeout=10)
        return out
    finally:
        await nc.close()


def healthz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        result: dict[str, Any] = json.load(resp)
        return result


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def wait_until(what: str, check: Any, timeout: float = 60) -> None:
    """Until check() is true; an error from it (a server still electing a stream leader)
    counts as not yet."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            if check():
                return
        except Exception as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what} (last error: {last!r})")
        time.sleep(0.3)


def siem_batches(cluster: NatsCluster) -> list[Any]:
    return asyncio.run(read_stream(cluster.url, names.SIEM_STREAM))


def check_outputs(cluster: NatsCluster, sent: dict[str, int], hit_every: int) -> None:
    """Every event handled once, in each host's order; every alert exactly once."""
    batches = siem_batches(cluster)
    numbers: dict[str, list[int]] = {h: [] for h in sent}
    for msg in batches:
        for line in msg.data.decode().splitlines():
            doc = json.loads(line)
            numbers[doc["host"]].append(int(doc["argv"][2]))
    for host, count in sent.items():
        assert numbers[host] == list(range(count)), f"{host}: events lost, doubled or reordered"
    alerts = [decode(m.data) for m in asyncio.run(read_stream(cluster.url, names.ALERTS_STREAM))]
    assert all(isinstance(a, Alert) and a.rule_id == FLEET_RULE_ID for a in alerts)
    got = Counter((a.host, int(a.process.argv[2])) for a in alerts if isinstance(a, Alert))
    want = Counter(
        (h, n)
        for h, count in sent.items()
        for n in range(0, count if hit_every else 1, hit_every or 1)
    )
    assert got == want, f"missing {want - got}, doubled {got - want}"


def test_sigkill_a_worker_and_a_nats_node_mid_stream(tmp_path: Path) -> None:
    config = write_config(tmp_path, "partitions = 8\nreplicas = 3")
    batches, events, hit_every = 120, 40, 7
    with nats_cluster() as cluster, cleaning([]) as procs:
        w1, port1 = start_worker(cluster.url, config, "w1")
        procs.append(w1)
        w2, port2 = start_worker(cluster.url, config, "w2")
        procs.append(w2)
        wait_until(
            "both workers hold partitions",
            lambda: (
                len(healthz(port1)["partitions"]) == 4 and len(healthz(port2)["partitions"]) == 4
            ),
        )
        collectors: list[Proc] = []
        for host in HOSTS:
            collectors.append(
                start_collector(
                    cluster.url,
                    host,
                    batches,
                    "--events",
                    str(events),
                    "--hit-every",
                    str(hit_every),
                    "--pause",
                    "0.05",
                )
            )
        procs.extend(collectors)
        wait_until(
            "w1 handles batches",
            lambda: (
                "sandtrace_fleet_batches_total" in metrics(port1)
                and sum(_values(metrics(port1), "sandtrace_fleet_batches_total")) >= 20
            ),
        )
        w1.kill()
        cluster.kill(0)
        for c in collectors:
            assert c.proc.wait(timeout=180) == 0, c.log()
            assert "discarded 0" in c.log(), c.log()
        wait_until("w2 holds every partition", lambda: len(healthz(port2)["partitions"]) == 8)
        total = len(HOSTS) * batches
        wait_until("every batch handled", lambda: len(siem_batches(cluster)) >= total, timeout=120)
        check_outputs(cluster, dict.fromkeys(HOSTS, batches * events), hit_every)
        page = metrics(port2)
        assert sum(_values(page, "sandtrace_fleet_takeovers_total")) >= 8
        assert "sandtrace_fleet_partition_lag_batches" in page
        assert w2.proc.poll() is None, w2.log()


def _values(page: str, name: str) -> list[float]:
    return [
        float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith(name + "{")
    ]


@pytest.mark.parametrize("workers", [1])
def test_batches_and_alerts_are_stored_once_when_sent_twice(tmp_path: Path, workers: int) -> None:
    """A collector restarted on its spool sends batches again under the same ids: stored
    once (the duplicate window), handled once."""
    config = write_config(tmp_path)
    spool = tmp_path / "spool"
    with nats_cluster() as cluster, cleaning([]) as procs:
        w, _port = start_worker(cluster.url, config, "w1")
        procs.append(w)
        first = start_collector(cluster.url, "node-x", 5, "--spool-dir", str(spool))
        procs.append(first)
        assert first.proc.wait(timeout=60) == 0, first.log()
        # the same batches again: the same collector id (from the spool) and sequence numbers
        copy = asyncio.run(read_stream(cluster.url, names.EVENTS_STREAM))
        assert len(copy) == 5
        asyncio.run(_republish(cluster.url, copy))
        wait_until("handled", lambda: len(siem_batches(cluster)) >= 5)
        time.sleep(1.0)
        assert len(asyncio.run(read_stream(cluster.url, names.EVENTS_STREAM))) == 5
        check_outputs(cluster, {"node-x": 5 * 50}, 7)


async def _republish(url: str, msgs: list[Any]) -> None:
    import nats  # noqa: PLC0415

    nc = await nats.connect(url.split(","))
    try:
        js = nc.jetstream()
        for m in msgs:
            host = names.host_of_token(m.subject.split(".")[-1])
            ack = await js.publish(names.events_subject(host), m.data, headers=dict(m.headers))
            assert ack.duplicate
    finally:
        await nc.close()


def test_a_new_owner_rebuilds_detection_state_from_the_stream(tmp_path: Path) -> None:
    """Repeats of one rule by one process fold into the first alert (fold_seconds): the
    worker that takes the host over after a SIGKILL replays the stream's last fold span,
    so it knows the alert was raised and raises none again."""
    config = write_config(tmp_path, "partitions = 8\nreplicas = 3", fold_seconds=600)
    host = "folding-node"
    partition = names.fnv1a_partition(host, 8)
    with nats_cluster() as cluster, cleaning([]) as procs:
        w1, port1 = start_worker(cluster.url, config, "w1")
        w2, port2 = start_worker(cluster.url, config, "w2")
        procs += [w1, w2]
        wait_until(
            "both workers hold partitions",
            lambda: (
                len(healthz(port1)["partitions"]) == 4 and len(healthz(port2)["partitions"]) == 4
            ),
        )
        owner, owner_port, heir, heir_port = (
            (w1, port1, w2, port2)
            if partition in healthz(port1)["partitions"]
            else (w2, port2, w1, port1)
        )
        collector = start_collector(
            cluster.url,
            host,
            80,
            "--events",
            "40",
            "--hit-every",
            "5",
            "--same-process",
            "--pause",
            "0.05",
        )
        procs.append(collector)
        wait_until(
            "the owner handles batches",
            lambda: sum(_values(metrics(owner_port), "sandtrace_fleet_batches_total")) >= 20,
        )
        owner.kill()
        assert collector.proc.wait(timeout=180) == 0, collector.log()
        wait_until("every batch handled", lambda: len(siem_batches(cluster)) >= 80, timeout=120)
        page = metrics(heir_port)
        rebuilt = sum(_values(page, "sandtrace_fleet_rebuilt_batches_total"))
        assert rebuilt >= 20, heir.log()
        check_outputs(cluster, {host: 80 * 40}, 0)  # one alert: the first hit, n = 0


def test_tail_follows_the_fleet_and_replays_its_alert_stream(tmp_path: Path) -> None:
    """`sandtrace tail --server nats://`: live events of one host (filtered), and with
    --from-start every alert of the stream, once, filtered by host."""
    config = write_config(tmp_path)
    with nats_cluster() as cluster, cleaning([]) as procs:
        worker, _port = start_worker(cluster.url, config, "w1")
        procs.append(worker)
        tail_cmd = [
            sys.executable,
            "-m",
            "sandtrace",
            "tail",
            "--server",
            cluster.url,
            "-o",
            "json",
        ]
        live = spawn_tail(
            [*tail_cmd, "--host", "node-a", "--kind", "exec"], tmp_path / "live.jsonl"
        )
        procs.append(live)
        live.wait_for("following the fleet")
        time.sleep(1.0)  # the subscription is in place before the collectors start
        for host in ("node-a", "node-b"):
            c = start_collector(cluster.url, host, 4, "--events", "30", "--hit-every", "10")
            procs.append(c)
            assert c.proc.wait(timeout=60) == 0, c.log()
        wait_until("live events shown", lambda: _lines(tmp_path / "live.jsonl") >= 120)
        replay = spawn_tail(
            [*tail_cmd, "--alerts-only", "--from-start", "--host", "node-b"],
            tmp_path / "replay.jsonl",
        )
        procs.append(replay)
        wait_until("alerts replayed", lambda: _lines(tmp_path / "replay.jsonl") >= 12)
        time.sleep(1.0)
        assert live.stop() == 0 and replay.stop() == 0
        events = [json.loads(x) for x in (tmp_path / "live.jsonl").read_text().splitlines()]
        assert [
            (e["host"], e["kind"], int(e["argv"][2])) for e in events if e["kind"] == "exec"
        ] == [("node-a", "exec", n) for n in range(120)]
        alerts = [json.loads(x) for x in (tmp_path / "replay.jsonl").read_text().splitlines()]
        assert sorted(int(a["process"]["argv"][2]) for a in alerts) == list(range(0, 120, 10))
        assert {a["host"] for a in alerts} == {"node-b"}


def spawn_tail(cmd: list[str], out: Path) -> Proc:
    """A tail whose stdout goes to `out` (stderr read as for every Proc)."""
    return spawn(cmd, stdout=out)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sandtrace_run_streams_to_the_fleet(tmp_path: Path, work: Path) -> None:
    """A real collector (`sandtrace run --server nats://`, kernel tracing) streams to the
    fleet: the worker raises the test rule's alert for the traced program, once."""
    config = write_config(tmp_path)
    program = work / "fleet-hit"
    shutil.copy("/bin/true", program)
    with nats_cluster() as cluster, cleaning([]) as procs:
        worker, _port = start_worker(cluster.url, config, "w1")
        procs.append(worker)
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "sandtrace",
                "run",
                "--server",
                cluster.url,
                "--no-tail",
                "--",
                str(program),
                "fleet-hit",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
            cwd=work,
        )
        assert run.returncode == 0, run.stderr
        assert "streamed" in run.stderr, run.stderr
        assert "discarded 0" in run.stderr, run.stderr
        wait_until(
            "the alert stored",
            lambda: len(asyncio.run(read_stream(cluster.url, names.ALERTS_STREAM))) >= 1,
        )
        time.sleep(1.0)
        alerts = [
            decode(m.data) for m in asyncio.run(read_stream(cluster.url, names.ALERTS_STREAM))
        ]
        assert len(alerts) == 1
        alert = alerts[0]
        assert isinstance(alert, Alert)
        assert alert.rule_id == FLEET_RULE_ID
        assert alert.host == socket.gethostname()
        assert alert.process.exe == str(program).encode()


def test_the_spool_covers_a_cluster_that_cannot_be_reached(tmp_path: Path) -> None:
    """Every NATS node down: the collector keeps its batches in its spool, also across its
    own restart; once the cluster is back, the restarted collector delivers them, each
    handled once."""
    config = write_config(tmp_path)
    spool = tmp_path / "spool"
    with nats_cluster() as cluster, cleaning([]) as procs:
        worker, _port = start_worker(cluster.url, config, "w1")
        procs.append(worker)
        for i in range(3):
            cluster.kill(i)
        first = start_collector(
            cluster.url, "node-s", 12, "--spool-dir", str(spool), "--deadline", "1"
        )
        procs.append(first)
        assert first.proc.wait(timeout=60) == 0, first.log()
        assert "sent 0 events in 0 batches; discarded 0; spool 12" in first.log(), first.log()
        for i in range(3):
            cluster.start(i)
        cluster.wait_healthy()
        again = start_collector(cluster.url, "node-s", 0, "--spool-dir", str(spool))
        procs.append(again)
        assert again.proc.wait(timeout=120) == 0, again.log()
        assert "sent 600 events in 12 batches; discarded 0; spool 0" in again.log(), again.log()
        wait_until("handled", lambda: len(siem_batches(cluster)) >= 12, timeout=90)
        check_outputs(cluster, {"node-s": 600}, 7)


def test_check_config_checks_the_streams(tmp_path: Path) -> None:
    config = write_config(tmp_path, "partitions = 4")

    def check(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "sandtrace",
                "serve",
                "--config",
                str(config),
                "--check-config",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    with nats_cluster() as cluster, cleaning([]) as procs:
        before = check("--nats", cluster.url)
        assert before.returncode == 0, before.stderr
        assert "note: stream SANDTRACE_EVENTS missing (a worker makes it" in before.stderr
        assert "configuration OK" in before.stderr
        worker, _port = start_worker(cluster.url, config, "w1")
        procs.append(worker)
        after = check("--nats", cluster.url)
        assert after.returncode == 0 and "missing" not in after.stderr, after.stderr
        other = check("--nats", cluster.url, "--partitions", "8")
        assert other.returncode == 2
        assert "made with another fleet.partitions" in other.stderr
        assert "Traceback" not in other.stderr
    gone = check("--nats", cluster.url)
    assert gone.returncode == 2 and "cannot reach NATS" in gone.stderr, gone.stderr


def test_tls_and_a_token_or_else_a_clear_refusal(tmp_path: Path) -> None:
    """A cluster that requires TLS and a token: a worker and a collector with the CA and
    the token deliver; a collector with the wrong token is refused, says what to fix, and
    keeps its batches (the spool) instead of losing them."""
    tls = make_tls(tmp_path / "tls", hosts=["127.0.0.1", "localhost"])
    token = tmp_path / "token"
    token.write_text("fleet-s3cret\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-it\n")
    extra = (
        f'tls {{ cert_file: "{tls.cert}", key_file: "{tls.key}" }}\n'
        'authorization { token: "fleet-s3cret" }\n'
    )
    config = write_config(tmp_path)
    with nats_cluster(extra=extra) as cluster, cleaning([]) as procs:
        url = cluster.url.replace("nats://", "tls://")
        auth = ["--nats-token-file", str(token), "--nats-ca-file", str(tls.ca)]
        worker, _port = start_worker(url, config, "w1", *auth)
        procs.append(worker)
        good = start_collector(
            url, "node-t", 3, "--token-file", str(token), "--ca-file", str(tls.ca)
        )
        procs.append(good)
        assert good.proc.wait(timeout=60) == 0, good.log()
        assert "sent 150 events in 3 batches; discarded 0" in good.log(), good.log()
        refused = start_collector(
            url,
            "node-u",
            2,
            "--token-file",
            str(wrong),
            "--ca-file",
            str(tls.ca),
            "--spool-dir",
            str(tmp_path / "spool"),
            "--deadline",
            "12",
        )
        procs.append(refused)
        assert refused.proc.wait(timeout=60) == 0, refused.log()
        assert "the NATS cluster refused this collector" in refused.log(), refused.log()
        assert "sent 0 events in 0 batches; discarded 0; spool 2" in refused.log()
        clear = start_collector(cluster.url, "node-v", 1, "--deadline", "12")
        procs.append(clear)
        assert clear.proc.wait(timeout=60) == 0
        assert "sent 0 events" in clear.log(), clear.log()
        wait_until("handled", lambda: _alerts_of(url, token, tls.ca) >= 22)
        assert _alerts_of(url, token, tls.ca) == 22  # 150 events, every 7th a hit


def _alerts_of(url: str, token: Path, ca: Path) -> int:
    async def count() -> int:
        import nats  # noqa: PLC0415

        from fleet.connect import target  # noqa: PLC0415

        where = target(url, token_file=str(token), ca_file=str(ca))
        nc = await nats.connect(**where.options())
        try:
            info = await nc.jetstream().stream_info(names.ALERTS_STREAM)
            return int(info.state.messages)
        finally:
            await nc.close()

    return asyncio.run(count())
