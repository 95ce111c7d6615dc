"""NKey and credentials-file authentication against a real nats-server: the collector, the
worker and the tail each connect with their own identity and do their work; each given a
key the server does not know says that the cluster refused it (not that it cannot be
reached) and exits, the collector keeping its batches in the spool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.fleet import (
    Proc,
    cleaning,
    serve_nats,
    spawn,
    start_collector,
    start_worker,
    write_config,
)
from tests.e2e.natsauth import decentralised, user
from tests.e2e.natscluster import nats_cluster, server_port
from tests.e2e.test_fleet import wait_until

BATCHES, EVENTS, HIT_EVERY = 3, 50, 7
ALERTS = len(range(0, BATCHES * EVENTS, HIT_EVERY))


def _identities(kind: str, directory: Path) -> tuple[str, dict[str, Path], Path]:
    """Server configuration, a known identity file for each part, and an unknown one."""
    if kind == "nkey":
        known = {part: user() for part in ("worker", "collector", "tail")}
        users = ", ".join(f"{{nkey: {u.public}}}" for u in known.values())
        files = {part: u.write_seed(directory / f"{part}.nk") for part, u in known.items()}
        return (
            f"authorization {{ users = [ {users} ] }}\n",
            files,
            user().write_seed(directory / "stranger.nk"),
        )
    ours, theirs = decentralised(), decentralised()
    files = {
        part: ours.creds(directory / f"{part}.creds") for part in ("worker", "collector", "tail")
    }
    # a user of an account the server does not know (signed by another operator's account)
    return ours.server_config(), files, theirs.creds(directory / "stranger.creds")


@pytest.mark.parametrize("kind", ["nkey", "creds"])
def test_each_part_connects_with_its_key_and_a_wrong_key_is_refused(
    tmp_path: Path, kind: str
) -> None:
    server, files, stranger = _identities(kind, tmp_path)
    flag = f"--{kind}-file"  # the collector's and the tail's; the worker's is --nats-<kind>-file
    config = write_config(tmp_path, "partitions = 2\nreplicas = 1")
    with nats_cluster(size=1, extra=server) as cluster, cleaning([]) as procs:
        url = cluster.url
        worker, _port = start_worker(url, config, "w1", f"--nats-{kind}-file", str(files["worker"]))
        procs.append(worker)
        collector = start_collector(url, "node-k", BATCHES, flag, str(files["collector"]))
        procs.append(collector)
        assert collector.proc.wait(timeout=60) == 0, collector.log()
        assert (
            f"sent {BATCHES * EVENTS} events in {BATCHES} batches; discarded 0" in collector.log()
        )
        out = tmp_path / "tail.jsonl"
        tail = _tail(url, [flag, str(files["tail"]), "-o", "json"], out)
        procs.append(tail)
        wait_until("the tail shows every alert", lambda: _count(out) >= ALERTS)
        assert tail.stop() == 0, tail.log()
        assert _count(out) == ALERTS

        # a key the server does not know: refused, said so, not taken for an outage
        bad_worker = spawn(
            serve_nats(
                url,
                config,
                "--listen",
                f"127.0.0.1:{server_port()}",
                f"--nats-{kind}-file",
                str(stranger),
            )
        )
        procs.append(bad_worker)
        assert bad_worker.proc.wait(timeout=30) == 2, bad_worker.log()
        bad_worker.close()
        assert "sandtrace: the NATS cluster refused this worker" in bad_worker.log()
        assert "Authorization Violation" in bad_worker.log()
        assert "cannot reach" not in bad_worker.log() and "Traceback" not in bad_worker.log()

        check = subprocess.run(
            serve_nats(url, config, "--check-config", f"--nats-{kind}-file", str(stranger)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert check.returncode == 2, check.stderr
        assert "configuration error: the NATS cluster refused this worker" in check.stderr

        bad_tail = _tail(url, [flag, str(stranger)], tmp_path / "bad-tail.txt")  # compact
        procs.append(bad_tail)
        assert bad_tail.proc.wait(timeout=30) == 2, bad_tail.log()
        bad_tail.close()
        assert "sandtrace: the NATS cluster refused this tail" in bad_tail.log()
        assert "Traceback" not in bad_tail.log()

        bad_collector = start_collector(
            url,
            "node-s",
            2,
            flag,
            str(stranger),
            "--spool-dir",
            str(tmp_path / "spool"),
            "--deadline",
            "8",
        )
        procs.append(bad_collector)
        assert bad_collector.proc.wait(timeout=60) == 0, bad_collector.log()
        assert "the NATS cluster refused this collector" in bad_collector.log()
        assert "sent 0 events in 0 batches; discarded 0; spool 2" in bad_collector.log()
        assert "unreachable" not in bad_collector.log()


def _tail(url: str, extra: list[str], out: Path) -> Proc:
    cmd = [sys.executable, "-m", "sandtrace", "tail", "--server", url]
    return spawn([*cmd, "--alerts-only", "--from-start", *extra], stdout=out)


def _count(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if json.loads(line)["kind"] == "alert")
