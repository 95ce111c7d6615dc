"""`sandtrace run` and `watch` end to end: a real command in a new sandbox and its own
network namespace fetches a page from a real HTTP server on a test host, and the events the
CLI prints match what happened, exactly; `run --json` keeps stdout for JSON lines; a run that
streams to a service that is down, or comes up late, says so; `watch --cgroup` takes a
cgroup in every form sandtrace prints."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from collector import cgroups
from tests.e2e.conftest import NetNS
from tests.serving import free_port, start_serve
from tests.unit.test_tail_service import Lines, processes, sandtrace

ROOT_DIR = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"

FETCH = """
import sys, urllib.request
body = urllib.request.urlopen(sys.argv[1], timeout=10).read()
sys.stdout.write(body.decode())
"""


def wait_listening(net: NetNS, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(
            net.in_outside("ss", "-Hltn", f"sport = :{port}"),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise AssertionError("the test HTTP server did not start")


def test_run_fetches_from_test_host_and_reports_it(testnet: NetNS, tmp_path: Path) -> None:
    (tmp_path / "page.txt").write_text("hello from the test host\n")
    server = subprocess.Popen(
        testnet.in_outside(
            PYTHON,
            "-m",
            "http.server",
            "--bind",
            testnet.outside_addr,
            "8080",
            "--directory",
            str(tmp_path),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_listening(testnet, 8080)
        url = f"http://{testnet.outside_addr}:8080/page.txt"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "sandtrace",
                "run",
                "--json",
                "--events",
                str(tmp_path / "events.jsonl"),
                "--",
                *testnet.in_inside(PYTHON, "-c", FETCH, url),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT_DIR,
            timeout=120,
            check=False,
        )
    finally:
        server.terminate()
        _, server_log = server.communicate(timeout=10)
    assert run.returncode == 0, run.stderr
    # stdout is JSON lines only; the command's own output went to stderr
    events: list[dict[str, Any]] = [json.loads(ln) for ln in run.stdout.splitlines()]
    assert "hello from the test host" in run.stderr.splitlines()
    assert events == [json.loads(ln) for ln in (tmp_path / "events.jsonl").read_text().splitlines()]
    execs = [e for e in events if e["kind"] == "exec"]
    assert [e["argv"][:2] for e in execs] == [["ip", "netns"], [PYTHON, "-c"]]
    fetcher = execs[-1]["process"]["pid"]
    assert execs[-1]["argv"][-1] == url
    connects = [e for e in events if e["kind"] == "connect"]
    assert len(connects) == 1
    conn = connects[0]
    assert conn["process"]["pid"] == fetcher
    assert (conn["protocol"], conn["daddr"], conn["dport"], conn["outcome"]) == (
        "tcp",
        testnet.outside_addr,
        8080,
        "success",
    )
    assert conn["saddr"] == testnet.inside_addr
    # the server saw that very connection: its log names the client's address
    assert f"{testnet.inside_addr} - - " in server_log and "GET /page.txt" in server_log
    exits = {e["process"]["pid"]: e["exit_code"] for e in events if e["kind"] == "exit"}
    assert exits[fetcher] == 0
    assert "lost: kernel=0 user=0" in run.stderr


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandtrace", "run", "--no-tail", *args],
        capture_output=True,
        text=True,
        cwd=ROOT_DIR,
        timeout=timeout,
        check=False,
    )


def test_run_json_keeps_stdout_for_json_lines(tmp_path: Path) -> None:
    """`run --json | jq` reads JSON only: the command's stdout goes to stderr, or to
    --command-output FILE."""
    run = run_cli("--json", "--", "sh", "-c", "echo hello")
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]  # every line parses
    assert [(e["kind"], e["argv"]) for e in events if e["kind"] == "exec"] == [
        ("exec", ["sh", "-c", "echo hello"])
    ]
    assert "hello" in run.stderr.splitlines()

    out = tmp_path / "command.out"
    run = run_cli("--json", "--command-output", str(out), "--", "sh", "-c", "echo hello; echo 2")
    assert run.returncode == 0, run.stderr
    assert out.read_text() == "hello\n2\n"
    assert "hello" not in run.stderr.splitlines()
    assert all(json.loads(line) for line in run.stdout.splitlines())

    # without --json, the command's output stays on stdout, between the text lines
    run = run_cli("--color", "never", "--", "sh", "-c", "echo hello")
    assert run.returncode == 0, run.stderr
    assert "hello" in run.stdout.splitlines()


def test_run_text_lines_are_whole_when_stdout_is_not_a_terminal() -> None:
    long_arg = "x" * 300
    run = run_cli("--color", "never", "--", "/bin/echo", long_arg)
    assert run.returncode == 0, run.stderr
    exec_line = next(ln for ln in run.stdout.splitlines() if " exec " in ln)
    assert exec_line.endswith(f" /usr/bin/echo {long_arg}"), exec_line
    run = run_cli("--color", "never", "--width", "60", "--", "/bin/echo", long_arg)
    exec_line = next(ln for ln in run.stdout.splitlines() if " exec " in ln)
    assert len(exec_line) == 60 and exec_line.endswith("…"), exec_line


def unreachable_lines(stderr: str, url: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(f"sandtrace: service {url} ")]


def test_run_says_once_that_the_service_is_unreachable(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    spool = tmp_path / "spool"
    # several seconds of events, so that the sender retries many times
    cmd = ["sh", "-c", "for i in 1 2 3 4 5 6 7 8; do /bin/true $i; sleep 0.3; done"]
    run = run_cli("--json", "--server", url, "--spool-dir", str(spool), "--", *cmd)
    assert run.returncode == 0, run.stderr  # nothing discarded: it waits in the spool
    assert unreachable_lines(run.stderr, url) == [
        f"sandtrace: service {url} unreachable (Connection refused); holding events, "
        f"spooling to {spool}"
    ]
    assert re.search(r"discarded 0; [1-9]\d* batches left in the spool", run.stderr), run.stderr

    # no spool: what is held at exit is discarded, and run says so with its exit status
    run = run_cli("--json", "--server", url, "--no-spool", "--", *cmd)
    assert unreachable_lines(run.stderr, url) == [
        f"sandtrace: service {url} unreachable (Connection refused); holding events in "
        "memory (16 MiB at most, then the oldest are discarded: no spool)"
    ]
    discarded = re.search(r"discarded (\d+) \(shutdown=\1\)", run.stderr)
    assert discarded is not None and int(discarded[1]) >= 17, run.stderr  # 8 x (exec, exit)
    assert run.stderr.splitlines()[-1] == (
        f"sandtrace: exit status 3: sh succeeded, but {discarded[1]} events never reached {url}"
    )
    assert run.returncode == 3


def test_run_says_when_a_late_service_takes_what_was_held(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    go, events = tmp_path / "go", tmp_path / "events.jsonl"
    waiter = f"while [ ! -e {go} ]; do sleep 0.2; done; /bin/echo done waiting"
    with processes() as procs:
        run = sandtrace(
            "run", "--no-tail", "--json", "--server", url, "--spool-dir", str(tmp_path / "s"),
            "--", "sh", "-c", waiter,
        )  # fmt: skip
        procs.append(run)
        err = Lines(run, "stderr")
        assert err.until(f"sandtrace: service {url}", timeout=120) == (
            f"sandtrace: service {url} unreachable (Connection refused); holding events, "
            f"spooling to {tmp_path / 's'}"
        )
        svc = start_serve(["--events", str(events)], port=port)
        try:
            back = err.until(f"sandtrace: service {url}", timeout=30)
            found = re.fullmatch(
                rf"sandtrace: service {re.escape(url)} reachable again after \d+\.\d s; "
                r"sending (\d+) held events \((\d+) were spooled\); 0 events discarded "
                "meanwhile",
                back,
            )
            assert found is not None, back
            assert int(found[1]) >= 2  # at least the shell's exec and a sleep's
            go.touch()
            assert run.wait(timeout=60) == 0
            assert err.until("streamed ").endswith("discarded 0; 0 batches left in the spool")
        finally:
            svc.stop()
    got = [json.loads(line) for line in events.read_text().splitlines()]
    assert any(e["kind"] == "exec" and e["argv"][:2] == ["sh", "-c"] for e in got)
    assert any(e["kind"] == "exec" and e["argv"] == ["/bin/echo", "done", "waiting"] for e in got)


def test_watch_takes_a_cgroup_in_every_form_sandtrace_prints() -> None:
    """The startup line names a sandbox's cgroup as /sandtrace/st-…; --cgroup takes that,
    the same without its leading slash, and the cgroup id (its directory's inode)."""
    root = cgroups.find_cgroup2_root()
    boxes = [cgroups.create_sandbox(root) for _ in range(3)]
    rels = ["/" + str(b.path.relative_to(root)) for b in boxes]
    try:
        forms = [rels[0], rels[1].lstrip("/"), str(boxes[2].path.stat().st_ino)]
        with processes() as procs:
            args = [a for form in forms for a in ("--cgroup", form)]
            watch = sandtrace("watch", "--json", "--no-detect", "--no-tail", *args)
            procs.append(watch)
            assert (
                Lines(watch, "stderr")
                .until("watching", timeout=120)
                .startswith(f"sandtrace: watching {rels[0]}, {rels[1]}, {rels[2]} (no detection)")
            )
            for i, box in enumerate(boxes):
                subprocess.run(["/bin/true", f"box{i}"], preexec_fn=box.join, check=True)
            out = Lines(watch, "stdout")
            seen: dict[str, str] = {}
            while len(seen) < 3:
                event = json.loads(out.next(timeout=30))
                if event["kind"] == "exec":
                    seen[event["argv"][1]] = event["sandbox"]
            assert seen == {f"box{i}": rels[i] for i in range(3)}
            watch.send_signal(signal.SIGTERM)
            assert watch.wait(timeout=60) == 0
    finally:
        for box in boxes:
            box.destroy()
