"""Response end to end, with real processes in real cgroups: `run --kill-on high` kills a
miner started in its sandbox (and only it: the command goes on); a Responder never signals
a process outside its sandboxes or one whose pid was reused; `watch --freeze-on high`
freezes a sandbox that `sandtrace sandbox thaw` thaws and `sandtrace sandbox kill` empties;
a service set to respond orders the kill down a collector's own connection."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.events import Process, ResponseEvent
from api.orders import ORDER_VERSION, Order
from collector import cgroups
from collector.proctable import NS_PER_SEC, parse_stat
from collector.response import Responder, TracedSandbox
from tests.e2e.runs import json_lines, sandtrace_cli
from tests.serving import start_serve
from tests.unit.test_tail_service import Lines, processes, sandtrace


@pytest.fixture
def miner(tmp_path: Path) -> Path:
    """A copy of sleep named as a well-known miner (the built-in rule's, level high)."""
    path = tmp_path / "xmrig"
    shutil.copy("/bin/sleep", path)
    return path


@pytest.fixture
def sandbox() -> Iterator[cgroups.SandboxCgroup]:
    box = cgroups.create_sandbox(cgroups.find_cgroup2_root())
    try:
        yield box
    finally:
        # a frozen sandbox is killed and removed all the same (cgroup.kill)
        box.destroy()


def _state(pid: int) -> bytes:
    return parse_stat(Path(f"/proc/{pid}/stat").read_bytes())[0]


def _start_ns(pid: int) -> int:
    ticks = parse_stat(Path(f"/proc/{pid}/stat").read_bytes())[2]
    return ticks * (NS_PER_SEC // os.sysconf("SC_CLK_TCK"))


def test_run_kill_on_high_kills_the_miner_and_the_run_goes_on(miner: Path, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    out = tmp_path / "out.txt"
    run = sandtrace_cli(
        "run",
        "--no-tail",
        "--json",
        "--kill-on",
        "high",
        "--events",
        str(events),
        "--command-output",
        str(out),
        "--",
        "sh",
        "-c",
        f"{miner} 60 & echo miner $!; wait $!; echo exit $?; echo after",
    )
    assert run.returncode == 0, run.stderr
    lines = out.read_text().splitlines()
    pid = int(lines[0].split()[1])
    assert lines[1:] == ["exit 137", "after"]  # killed by SIGKILL (128 + 9); the run went on
    got = json_lines(events)
    (alert,) = [
        e for e in got if e["kind"] == "alert" and e["title"] == "Known Cryptominer Executable"
    ]
    (response,) = [e for e in got if e["kind"] == "response"]
    assert response["action"] == "kill"
    assert response["origin"] == "embedded"
    assert response["result"] == "ok", response
    assert response["target_pid"] == pid
    assert response["pids"] == [pid]
    assert response["alert_id"] == alert["alert_id"]
    assert response["rule_id"] == alert["rule_id"]
    assert response["level"] == "high"
    assert response["sandbox"] == alert["sandbox"]
    # the miner died of SIGKILL, and nothing else did (the shell that started it ran on)
    killed = [e["process"] for e in got if e["kind"] == "exit" and e["signal"]]
    assert [(p["pid"], 9) for p in killed] == [(pid, 9)]


def _order(process: Process, sandbox: str, action: str = "kill") -> Order:
    return Order(
        v=ORDER_VERSION,
        action=action,
        alert_id="0190a5c4-0000-7000-8000-00000000abcd",
        rule_id="test-rule",
        title="Known Cryptominer Executable",
        level="high",
        host="h",
        sandbox=sandbox,
        process=process,
    )


def _process(pid: int, start_ns: int) -> Process:
    return Process(
        pid=pid,
        tid=pid,
        ns_pid=pid,
        ppid=0,
        uid=0,
        gid=0,
        comm=b"xmrig",
        start_ns=start_ns,
        key=f"{pid}@{start_ns}",
    )


def _respond(responder: Responder, orders: list[Order]) -> list[ResponseEvent]:
    """Carry out orders as the service's, and the events the responder reports."""
    got: list[ResponseEvent] = []

    async def go() -> None:
        responder.out = got.append  # type: ignore[assignment]
        for order in orders:
            responder.order_from_service(order)
        await responder.aclose()
        await asyncio.sleep(0)  # the reports are made soon after

    asyncio.run(go())
    return got


def test_a_process_outside_the_sandbox_or_a_reused_pid_is_never_signalled(
    sandbox: cgroups.SandboxCgroup, miner: Path
) -> None:
    root = cgroups.find_cgroup2_root()
    outside = subprocess.Popen([str(miner), "60"])  # on the host, not in the sandbox
    inside = subprocess.Popen([str(miner), "60"], preexec_fn=sandbox.join)  # noqa: PLW1509 - no threads yet
    try:
        responder = Responder(
            {sandbox.name: TracedSandbox([sandbox.path])},
            root,
            host="h",
            kill_on="high",
            embedded=False,
        )
        got = _respond(
            responder,
            [
                # a crafted alert naming a host process, in the traced sandbox's name
                _order(_process(outside.pid, _start_ns(outside.pid)), sandbox.name),
                # the sandbox's process, but under another start time (a reused pid)
                _order(_process(inside.pid, _start_ns(inside.pid) + 5 * NS_PER_SEC), sandbox.name),
                # a sandbox this responder does not trace
                _order(_process(inside.pid, _start_ns(inside.pid)), "st-elsewhere"),
            ],
        )
        assert [(e.result, e.target_pid) for e in got] == [
            ("refused", outside.pid),
            ("gone", inside.pid),
            ("refused", inside.pid),
        ]
        assert "not inside the sandbox" in got[0].error
        assert "start time differs" in got[1].error
        assert "not a sandbox this collector traces" in got[2].error
        time.sleep(0.1)
        assert outside.poll() is None
        assert inside.poll() is None
        # the real one is killed; a second order for it does nothing more
        got = _respond(
            responder,
            [_order(_process(inside.pid, _start_ns(inside.pid)), sandbox.name)] * 2,
        )
        assert [(e.result, e.pids, e.origin) for e in got] == [("ok", [inside.pid], "service")]
        assert inside.wait(timeout=5) == -signal.SIGKILL
        assert outside.poll() is None
        # a collector not started to take freeze orders refuses them, and says so
        (refused,) = _respond(
            responder, [_order(_process(outside.pid, 0), sandbox.name, action="freeze")]
        )
        assert refused.result == "refused"
        assert refused.error == "this collector takes freeze orders only with --freeze-on"
    finally:
        for proc in (outside, inside):
            proc.kill()
            proc.wait()


def test_kill_reaches_the_descendants_in_the_sandbox(sandbox: cgroups.SandboxCgroup) -> None:
    root = cgroups.find_cgroup2_root()
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], preexec_fn=sandbox.join)  # noqa: PLW1509 - no threads yet
    try:
        deadline = time.monotonic() + 5
        while len(sandbox.pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = sorted(sandbox.pids())
        assert len(pids) == 3
        responder = Responder(
            {sandbox.name: TracedSandbox([sandbox.path])},
            root,
            host="h",
            kill_on="low",
            embedded=False,
        )
        (event,) = _respond(
            responder, [_order(_process(parent.pid, _start_ns(parent.pid)), sandbox.name)]
        )
        assert event.result == "ok"
        assert event.pids == pids
        assert parent.wait(timeout=5) == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while sandbox.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sandbox.pids() == set()
    finally:
        parent.kill()
        parent.wait()


def _events_value(path: Path, key: str) -> str:
    for line in (path / "cgroup.events").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return value
    raise AssertionError(f"no {key} in cgroup.events")


def test_watch_freeze_on_high_then_sandbox_thaw_and_kill(
    sandbox: cgroups.SandboxCgroup, miner: Path, tmp_path: Path
) -> None:
    root = cgroups.find_cgroup2_root()
    rel = "/" + str(sandbox.path.relative_to(root))
    counter = tmp_path / "counter"
    # a process that keeps counting: it stops while frozen and goes on once thawed
    counting = subprocess.Popen(
        ["sh", "-c", f"i=0; while true; do i=$((i+1)); echo $i > {counter}; sleep 0.02; done"],
        preexec_fn=sandbox.join,  # noqa: PLW1509 - no threads yet,
    )
    with processes() as procs:
        watch = sandtrace("watch", "--json", "--no-tail", "--cgroup", rel, "--freeze-on", "high")
        procs.append(watch)
        Lines(watch, "stderr").until("watching", timeout=120)
        miner_proc = subprocess.Popen([str(miner), "60"], preexec_fn=sandbox.join)  # noqa: PLW1509 - no threads yet
        try:
            out = Lines(watch, "stdout")
            while True:
                event = json.loads(out.next(timeout=30))
                if event["kind"] == "response":
                    break
                if event["kind"] == "alert" and event["level"] == "high":
                    alert = event
            assert event["action"] == "freeze"
            assert event["result"] == "ok", event
            assert event["alert_id"] == alert["alert_id"]
            assert event["sandbox"] == rel
            assert event["cgroup_path"] == rel
            assert _events_value(sandbox.path, "frozen") == "1"
            frozen_at = counter.read_text()
            time.sleep(0.3)
            assert counter.read_text() == frozen_at  # nothing runs
            assert miner_proc.poll() is None  # frozen, not killed
            thaw = sandtrace_cli("sandbox", "thaw", sandbox.name, "--json", timeout=60)
            assert thaw.returncode == 0, thaw.stderr
            assert thaw.stderr == f"sandtrace: thawed sandbox {rel}\n"
            thawed = json.loads(thaw.stdout)
            assert (thawed["kind"], thawed["action"], thawed["origin"], thawed["result"]) == (
                "response",
                "thaw",
                "operator",
                "ok",
            )
            assert _events_value(sandbox.path, "frozen") == "0"
            deadline = time.monotonic() + 5
            while counter.read_text() == frozen_at and time.monotonic() < deadline:
                time.sleep(0.02)
            assert counter.read_text() != frozen_at  # it runs on
            kill = sandtrace_cli("sandbox", "kill", rel, "--json", timeout=60)
            assert kill.returncode == 0, kill.stderr
            killed = json.loads(kill.stdout)
            assert (killed["action"], killed["result"]) == ("kill", "ok")
            # the counting shell, its sleep of the moment (if any) and the miner
            assert {counting.pid, miner_proc.pid} <= set(killed["pids"])
            assert len(killed["pids"]) in (2, 3)
            n = len(killed["pids"])
            assert kill.stderr == f"sandtrace: killed sandbox {rel} ({n} processes)\n"
            assert sandbox.pids() == set()
            assert counting.wait(timeout=5) == -signal.SIGKILL
            assert miner_proc.wait(timeout=5) == -signal.SIGKILL
            watch.send_signal(signal.SIGTERM)
            assert watch.wait(timeout=60) == 0
        finally:
            miner_proc.kill()
            miner_proc.wait()
            counting.kill()
            counting.wait()


def test_sandbox_refuses_what_is_not_a_sandbox() -> None:
    for name in ("st-00000000", "/"):
        run = sandtrace_cli("sandbox", "thaw", name, timeout=60)
        assert run.returncode == 2
        assert run.stderr.startswith(f"sandtrace: sandbox thaw: no sandbox cgroup {name!r} under")
        assert "Traceback" not in run.stderr


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_the_service_orders_the_kill_over_the_collectors_connection(
    miner: Path, tmp_path: Path, transport: str
) -> None:
    served = tmp_path / "served.jsonl"
    svc = start_serve(["--kill-on", "high", "--events", str(served)])
    try:
        out = tmp_path / "out.txt"
        run = sandtrace_cli(
            "run",
            "--no-tail",
            "--json",
            "--server",
            svc.url,
            "--server-transport",
            transport,
            "--kill-on",
            "high",
            "--command-output",
            str(out),
            "--",
            "sh",
            "-c",
            f"{miner} 60 & echo miner $!; wait $!; echo exit $?",
        )
        assert run.returncode == 0, run.stderr
        lines = out.read_text().splitlines()
        pid = int(lines[0].split()[1])
        assert lines[1:] == ["exit 137"]
        printed = [json.loads(line) for line in run.stdout.splitlines()]
        (response,) = [e for e in printed if e["kind"] == "response"]
        assert (response["origin"], response["result"], response["target_pid"]) == (
            "service",
            "ok",
            pid,
        )
    finally:
        svc.stop()
    # the service has the action among the collector's events
    got = json_lines(served)
    assert [(e["kind"], e["target_pid"]) for e in got if e["kind"] == "response"] == [
        ("response", pid)
    ]
