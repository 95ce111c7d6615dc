"""When something breaks between a collector and the service, nothing is lost.

Real processes throughout: `sandtrace serve`, `sandtrace watch --server` tracing a real
sandbox cgroup, and a workload in that cgroup that runs numbered marker programs at a steady
pace (every 100th one with a Stratum URL, which raises an alert). What the service wrote to
its JSON-lines outputs is compared with what the collector saw (its own --events file):

- the service killed (SIGKILL) mid-stream and restarted 10 s later: every event arrives, in
  order, none twice, and every alert exactly once;
- the collector restarted (SIGTERM) while the service is down: what it held is spooled and
  replayed by the next collector under the same id; again nothing lost, nothing twice;
- the collector's spool on a full disk (a small tmpfs): discards are counted and reported to
  the service, the collector does not crash, and it spools again when space returns.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from collector import cgroups
from tests.serving import ROOT_DIR, Serving, free_port, start_serve

LOOP = """
i={first}
while [ "$i" -le {last} ]; do
    if [ $((i % 100)) -eq 0 ]; then
        ./mark -o stratum+tcp://192.0.2.1:3333 -u WALLET -p x "$i"
    else
        ./mark "$i"
    fi
    i=$((i + 1))
    {pause}
done
"""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def markers(events: list[dict[str, Any]]) -> list[int]:
    """The numbers of the marker programs run, in the order their exec events came."""
    return [
        int(e["argv"][-1])
        for e in events
        if e.get("kind") == "exec" and e["argv"][:1] == ["./mark"]
    ]


def alerted(alerts: list[dict[str, Any]]) -> Counter[tuple[str, int]]:
    """How many times each (rule, marker) alerted (first alerts, not repeat summaries)."""
    out: Counter[tuple[str, int]] = Counter()
    for a in alerts:
        if a.get("kind") != "alert" or a.get("repeat"):
            continue
        argv = a["events"][0].get("argv", [])
        if argv[:1] == ["./mark"]:
            out[a["rule_id"], int(argv[-1])] += 1
    return out


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def scrape(svc: Serving) -> list[Sample]:
    """Every sample on the service's /metrics, read by prometheus_client's own parser."""
    with urllib.request.urlopen(f"{svc.url}/metrics", timeout=10) as resp:  # noqa: S310
        text = resp.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def metric(svc: Serving, name: str, **labels: str) -> int:
    """The value of one sample of the service (0 when it has none yet)."""
    found = [s.value for s in scrape(svc) if s.name == name and s.labels == labels]
    return int(found[0]) if found else 0


def gauge(svc: Serving, name: str) -> list[int]:
    """The values of a per-collector gauge of the service."""
    return [int(s.value) for s in scrape(svc) if s.name == name]


class Collector:
    """A real `sandtrace watch --server` on one cgroup, with its own copy of every event."""

    def __init__(
        self,
        box: cgroups.SandboxCgroup,
        url: str,
        token: Path,
        spool: Path,
        local: Path,
        *extra: str,
    ) -> None:
        self.local = local
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sandtrace",
                "watch",
                "--json",
                "--no-tail",
                "--cgroup",
                str(box.path),
                "--server",
                url,
                "--server-token-file",
                str(token),
                "--spool-dir",
                str(spool),
                "--events",
                str(local),
                *extra,
            ],
            cwd=ROOT_DIR,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        self.head = ""
        while "watching" not in self.head:
            line = self.proc.stderr.readline()
            assert line, f"watch ended before tracing: {self.head}"
            self.head += line

    def stop(self) -> str:
        """SIGTERM; its stderr. It must exit cleanly."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return self.head + err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


@contextmanager
def sandbox(work: Path) -> Iterator[cgroups.SandboxCgroup]:
    shutil.copy("/bin/true", work / "mark")
    box = cgroups.create_sandbox(cgroups.find_cgroup2_root())
    try:
        yield box
    finally:
        box.destroy()


def workload(
    box: cgroups.SandboxCgroup, work: Path, first: int, last: int, pause: str = "sleep 0.01"
) -> subprocess.Popen[bytes]:
    script = LOOP.format(first=first, last=last, pause=pause or ":")
    return subprocess.Popen(["/bin/sh", "-c", script], cwd=work, preexec_fn=box.join)  # noqa: PLW1509


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    token = tmp_path / "token"
    token.write_text("e2e-token\n")
    return {
        "token": token,
        "state": tmp_path / "state",
        "events": tmp_path / "svc-events.jsonl",
        "alerts": tmp_path / "svc-alerts.jsonl",
        "spool": tmp_path / "spool",
    }


def serve_args(p: dict[str, Path]) -> list[str]:
    return [
        "--token-file",
        str(p["token"]),
        "--state-dir",
        str(p["state"]),
        "--events",
        str(p["events"]),
        "--alerts",
        str(p["alerts"]),
    ]


def hostile(first: int, last: int) -> set[int]:
    return {i for i in range(first, last + 1) if i % 100 == 0}


def test_service_killed_mid_stream_and_restarted_loses_and_repeats_nothing(
    setup: dict[str, Path], work: Path, tmp_path: Path
) -> None:
    svc = start_serve(serve_args(setup))
    collector = None
    try:
        with sandbox(work) as box:
            collector = Collector(
                box, svc.url, setup["token"], setup["spool"], tmp_path / "local.jsonl"
            )
            load = workload(box, work, 1, 1000)
            time.sleep(3)
            svc.kill()  # SIGKILL in the middle of the stream
            killed_with = len(markers(read_jsonl(setup["events"])))
            time.sleep(10)
            svc = start_serve(serve_args(setup), port=svc.port)
            assert load.wait(timeout=120) == 0
            wait_until(
                lambda: 1000 in markers(read_jsonl(setup["events"])),
                60,
                "the last marker at the service",
            )
            out = collector.stop()
        assert svc.stop() == 0
    finally:
        svc.kill()
        if collector is not None:
            collector.kill()
    assert 0 < killed_with < 1000, "the kill did not land mid-stream"
    local = markers(read_jsonl(tmp_path / "local.jsonl"))
    assert local == list(range(1, 1001))  # the collector saw every one
    got = markers(read_jsonl(setup["events"]))
    assert got == local  # every event at the service, in order, none twice
    counts = alerted(read_jsonl(setup["alerts"]))
    assert {m for _, m in counts} == hostile(1, 1000)
    assert set(counts.values()) == {1}, counts  # every alert exactly once
    assert "discarded 0;" in out


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_service_dying_between_its_outputs_and_its_commit_repeats_nothing(
    setup: dict[str, Path], work: Path, tmp_path: Path, transport: str
) -> None:
    """The narrowest window: a batch (with an alert) is in the output files, the replay state
    does not have it yet, and the service is killed. The restarted service takes those lines
    back; the collector sends the batch again; everything is in the files exactly once."""
    crash = {"SANDTRACE_FAILPOINT": "kill-before-commit:alerts>=2"}
    svc = start_serve(serve_args(setup), env=crash)
    collector = None
    try:
        with sandbox(work) as box:
            collector = Collector(
                box,
                svc.url,
                setup["token"],
                setup["spool"],
                tmp_path / "local.jsonl",
                "--server-transport",
                transport,
            )
            load = workload(box, work, 1, 300)
            assert svc.proc.wait(timeout=120) == -signal.SIGKILL
            svc.kill()
            # the window was hit: the first marker's alert is in the file (after the one on
            # the workload's shell, whose script has the URL), its batch not committed
            first = alerted(read_jsonl(setup["alerts"]))
            assert {m for _, m in first} == {100} and set(first.values()) == {1}, first
            before = markers(read_jsonl(setup["events"]))
            assert 100 in before and 300 not in before
            svc = start_serve(serve_args(setup), port=svc.port)
            assert "took back" in svc.log()
            assert load.wait(timeout=120) == 0
            wait_until(
                lambda: 300 in markers(read_jsonl(setup["events"])),
                60,
                "the last marker at the service",
            )
            out = collector.stop()
        assert svc.stop() == 0
        # stopped cleanly, the service saved where its files end: nothing to take back
        svc = start_serve(serve_args(setup), port=svc.port)
        assert "took back" not in svc.log() and svc.stop() == 0
    finally:
        svc.kill()
        if collector is not None:
            collector.kill()
    local = markers(read_jsonl(tmp_path / "local.jsonl"))
    assert local == list(range(1, 301))
    assert markers(read_jsonl(setup["events"])) == local  # in order, none twice
    counts = alerted(read_jsonl(setup["alerts"]))
    assert {m for _, m in counts} == hostile(1, 300)
    assert set(counts.values()) == {1}, counts
    assert "discarded 0;" in out


def test_collector_restarted_while_service_down_replays_its_spool(
    setup: dict[str, Path], work: Path, tmp_path: Path
) -> None:
    svc = start_serve(serve_args(setup))
    first = second = None
    try:
        with sandbox(work) as box:
            first = Collector(
                box, svc.url, setup["token"], setup["spool"], tmp_path / "local1.jsonl"
            )
            load = workload(box, work, 1, 1200)
            time.sleep(3)
            svc.kill()
            time.sleep(2)
            out1 = first.stop()  # service down: what it holds goes to the spool
            assert re.search(r"streamed \d+ events", out1)
            held = int(re.search(r"(\d+) batches left in the spool", out1).group(1))  # type: ignore[union-attr]
            assert held > 0
            second = Collector(
                box, svc.url, setup["token"], setup["spool"], tmp_path / "local2.jsonl"
            )
            time.sleep(3)
            svc = start_serve(serve_args(setup), port=svc.port)
            assert load.wait(timeout=120) == 0
            wait_until(
                lambda: 1200 in markers(read_jsonl(setup["events"])),
                60,
                "the last marker at the service",
            )
            ids = [
                s.labels["collector"]
                for s in scrape(svc)
                if s.name == "sandtrace_collector_last_seq"
            ]
            second.stop()
        assert svc.stop() == 0
    finally:
        svc.kill()
        for c in (first, second):
            if c is not None:
                c.kill()
    seen1 = markers(read_jsonl(tmp_path / "local1.jsonl"))
    seen2 = markers(read_jsonl(tmp_path / "local2.jsonl"))
    assert seen1 and seen2 and seen1[-1] < seen2[0]  # the gap: no collector was running
    got = markers(read_jsonl(setup["events"]))
    assert got == seen1 + seen2  # all that both collectors saw, in order, none twice
    counts = alerted(read_jsonl(setup["alerts"]))
    assert {m for _, m in counts} == hostile(1, 1200) & set(got)
    assert set(counts.values()) == {1}, counts
    assert len(ids) == 1  # one collector id across the restart: replays were recognised


def test_full_disk_under_the_spool_is_counted_and_recovers(
    setup: dict[str, Path], work: Path, tmp_path: Path
) -> None:
    spool = setup["spool"]
    spool.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(spool)], check=True
    )
    port = free_port()
    collector = None
    svc = None
    try:
        filler = spool / "filler"
        filler.write_bytes(b"\0" * (160 << 10))  # leaves ~96 KiB for batches
        with sandbox(work) as box:
            collector = Collector(
                box,
                f"http://127.0.0.1:{port}",
                setup["token"],
                spool,
                tmp_path / "local.jsonl",
                "--spool-max",
                "64",
            )
            assert workload(box, work, 1, 3000, pause="").wait(timeout=300) == 0
            time.sleep(2)  # the collector seals and tries to spool what it has
            assert collector.proc.poll() is None  # a full disk does not stop tracing
            filler.unlink()  # space returns
            svc = start_serve(serve_args(setup), port=port)
            running = svc
            wait_until(
                lambda: gauge(running, "sandtrace_collector_spool_bytes") == [0],
                60,
                "the collector's spool to drain",
            )
            assert workload(box, work, 3001, 3200).wait(timeout=120) == 0
            wait_until(
                lambda: 3200 in markers(read_jsonl(setup["events"])),
                60,
                "the markers run after space returned",
            )
            out = collector.stop()
            discarded = int(re.search(r"discarded (\d+) \(spool_error=\1\)", out).group(1))  # type: ignore[union-attr]
            reported = metric(
                svc, "sandtrace_collector_lost_total", host=_hostname(), cause="spool"
            )
        assert svc.stop() == 0
    finally:
        if svc is not None:
            svc.kill()
        if collector is not None:
            collector.kill()
        subprocess.run(["umount", "-l", str(spool)], check=False)
    local = read_jsonl(tmp_path / "local.jsonl")
    got = markers(read_jsonl(setup["events"]))
    assert discarded > 0  # the disk did fill
    assert reported == discarded  # and the service was told exactly how many
    told = sum(e["spool"] for e in read_jsonl(setup["events"]) if e["kind"] == "lost")
    assert told == discarded  # and its event output (the SIEM stream) carries the count
    sent_kinds = [e for e in local if e["kind"] != "lost"]
    arrived = [e for e in read_jsonl(setup["events"]) if e["kind"] != "lost"]
    assert len(sent_kinds) - len(arrived) == discarded  # every event arrived or is counted
    assert got == sorted(got) and len(got) == len(set(got))  # in order, none twice
    assert set(range(3001, 3201)) <= set(got)  # after space returned, nothing lost


def _hostname() -> str:
    return socket.gethostname()
