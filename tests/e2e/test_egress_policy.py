"""Egress policy by name, in audit, done for real: the sandbox resolves names through a real
DNS server (the namespace's resolv.conf names it) and connects to a real HTTP host, under
`sandtrace run --egress-policy FILE` or `--egress-allow NAME --resolver ADDR`.

A name on the policy, resolved then connected to, is silent; the same address reached with
no resolution, or through a name outside the policy, alerts naming the destination; DNS to a
server that is not a listed resolver alerts; a SIGHUP with a file adding a name makes it
silent from then on, and no event is lost across the reload. Every expected value is one the
test set up: its zone's names and addresses, its servers' ports, its policy files.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.e2e.conftest import NetNS
from tests.e2e.test_incidents import Run, _json_lines, sandtrace_run
from tests.e2e.testhosts import DnsServer, HttpHost, run_dns_server, run_http_host

EGRESS = "sandtrace-egress-allow-list"
RESOLVER = "sandtrace-egress-resolver"
DENIED = "ede89068-a3e8-4a81-a99b-d7010e689bfe"  # rules/enforcement.yml, egress_denied
PKG = "pkg.example.test"
OTHER = "other.example.test"
MIRROR = "a.mirror.example.test"
PORT = 8000
CURL = "/usr/bin/curl"


@pytest.fixture
def dns(testnet: NetNS) -> Iterator[DnsServer]:
    """The sandbox's resolver: every name of the zone is the HTTP host's address."""
    zone = {
        name: {"A": [testnet.outside_addr], "TTL": 300}
        for name in (PKG, OTHER, MIRROR, "mirror.example.test")
    }
    with run_dns_server(testnet, zone) as server:
        yield server


@pytest.fixture
def http(testnet: NetNS) -> Iterator[HttpHost]:
    with run_http_host(testnet, port=PORT) as host:
        host.put("index.html", "ok\n")
        yield host


def policy_file(path: Path, allow: list[str], resolvers: list[str]) -> Path:
    quoted = ", ".join(f'"{a}"' for a in allow)
    path.write_text(
        f"[default]\nallow = [{quoted}]\nresolvers = [{', '.join(map(repr, resolvers))}]\n"
    )
    return path


def curl(name: str, out: str) -> str:
    return f"{CURL} -fsS http://{name}:{PORT}/index.html > {out}"


def curl_pids(run: Run) -> list[int]:
    """The pids of the curl processes, in the order they started."""
    execs = [e for e in run.events if e["kind"] == "exec" and e["filename"] == CURL]
    return [e["process"]["pid"] for e in sorted(execs, key=lambda e: e["time_ns"])]


def by_rule(run: Run, rule_id: str) -> list[dict[str, Any]]:
    return [a for a in run.alerts if a["rule_id"] == rule_id and not a["repeat"]]


def connects(run: Run, pid: int, port: int = PORT) -> list[dict[str, Any]]:
    return [
        e
        for e in run.events
        if e["kind"] == "connect" and e["process"]["pid"] == pid and e["dport"] == port
    ]


def test_names_on_the_policy_pass_and_a_name_outside_it_alerts(
    testnet: NetNS, dns: DnsServer, http: HttpHost, work: Path
) -> None:
    policy = policy_file(
        work / "policy.toml", [f"{PKG}:{PORT}", f"*.mirror.example.test:{PORT}"], [dns.addr]
    )
    script = " && ".join(
        [
            curl(PKG, "a.txt"),
            curl(MIRROR, "b.txt"),
            curl(OTHER, "c.txt"),
            curl("mirror.example.test", "d.txt"),  # the wildcard's own domain: not below it
        ]
    )
    run = sandtrace_run(testnet, script, work, "--egress-policy", str(policy))
    assert run.returncode == 0, run.stderr
    assert [(work / f).read_text() for f in ("a.txt", "b.txt", "c.txt", "d.txt")] == ["ok\n"] * 4
    assert [r["path"] for r in http.requests()] == ["/index.html"] * 4
    pkg, mirror, other, domain = curl_pids(run)
    # each curl's connect carries the name it resolved (the ground truth the policy judges)
    assert [[c["hostname"] for c in connects(run, p)] for p in (pkg, mirror, other, domain)] == [
        [PKG],
        [MIRROR],
        [OTHER],
        ["mirror.example.test"],
    ]
    alerts = by_rule(run, EGRESS)
    assert sorted((a["process"]["pid"], a["description"], a["level"]) for a in alerts) == sorted(
        [
            (other, f"tcp {http.addr}:{PORT} ({OTHER}) is not on the allow-list", "high"),
            (
                domain,
                f"tcp {http.addr}:{PORT} (mirror.example.test) is not on the allow-list",
                "high",
            ),
        ]
    )
    assert by_rule(run, RESOLVER) == []  # DNS went to the listed resolver only
    assert f"egress policy {policy} of 2" in run.stderr


def test_an_address_never_resolved_and_dns_to_an_unlisted_resolver_alert(
    testnet: NetNS, dns: DnsServer, http: HttpHost, work: Path
) -> None:
    # The address first, with no name looked up (nothing in the sandbox resolved it yet),
    # then the allowed name through the namespace's resolver, which the policy does not list.
    script = f"{CURL} -fsS {http.url('index.html')} > a.txt && {curl(PKG, 'b.txt')}"
    run = sandtrace_run(
        testnet,
        script,
        work,
        "--egress-allow",
        f"{PKG}:{PORT}",
        "--resolver",
        "192.0.2.53",
    )
    assert run.returncode == 0, run.stderr
    assert [(work / f).read_text() for f in ("a.txt", "b.txt")] == ["ok\n"] * 2
    by_address, by_name = curl_pids(run)
    assert [c["hostname"] for c in connects(run, by_address)] == [""]
    [egress] = by_rule(run, EGRESS)
    assert (egress["process"]["pid"], egress["description"]) == (
        by_address,
        f"tcp {http.addr}:{PORT} is not on the allow-list",
    )
    assert [(q["name"], q["peer"]) for q in dns.queries() if q["type"] == 1] == [
        (PKG, testnet.inside_addr)
    ]
    resolver = by_rule(run, RESOLVER)
    assert resolver, run.alerts
    for alert in resolver:
        assert (alert["process"]["pid"], alert["level"]) == (by_name, "high")
        assert alert["description"].endswith("not one of the sandbox's resolvers (192.0.2.53)")
    assert {a["description"].split(",")[0] for a in resolver} <= {
        f"DNS to udp {dns.addr}:53",
        f"DNS answer for {PKG} A from {dns.addr}:53",
        f"DNS answer for {PKG} AAAA from {dns.addr}:53",
    }


class _Stderr:
    """The lines a process writes on stderr, read as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stderr is not None
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.lines.append(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} line in {self.lines}")

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "\n".join(self.lines)


def wait_file(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def lines_in(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sighup_reloads_the_policy_file_without_losing_events(
    testnet: NetNS, dns: DnsServer, http: HttpHost, work: Path
) -> None:
    policy = policy_file(work / "policy.toml", [f"{PKG}:{PORT}"], [dns.addr])
    # OTHER before the reload (outside the policy); then /bin/true over and over, counted,
    # while the test reloads; then OTHER again (on the new policy).
    script = (
        f"{curl(OTHER, 'a.txt')} && touch ready && "
        "while [ ! -e go ]; do /bin/true && echo x >> count; done && "
        f"{curl(OTHER, 'b.txt')}"
    )
    events, alerts = work / "events.jsonl", work / "alerts.jsonl"
    argv = [
        sys.executable,
        "-m",
        "sandtrace",
        "run",
        "--json",
        "--events",
        str(events),
        "--alerts",
        str(alerts),
        "--egress-policy",
        str(policy),
        "--",
        *testnet.in_inside("sh", "-c", script),
    ]
    proc = subprocess.Popen(
        argv, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    stderr = _Stderr(proc)
    try:
        wait_file(work / "ready")
        # a bad file first: the policy in use stays, and the problem is said
        policy.write_text('[default]\nallow = ["bad name"]\n')
        proc.send_signal(signal.SIGHUP)
        assert stderr.wait_for("sandtrace: SIGHUP: ").startswith(
            f"sandtrace: SIGHUP: {policy}: [default] allow[0]: 'bad name': "
        )
        stderr.wait_for(f"sandtrace: SIGHUP: {policy} not reloaded (1 problem, listed above)")
        policy_file(policy, [f"{PKG}:{PORT}", f"{OTHER}:{PORT}"], [dns.addr])
        before = lines_in(work / "count")
        proc.send_signal(signal.SIGHUP)
        assert stderr.wait_for(f"sandtrace: SIGHUP: egress policy {policy}") == (
            f"sandtrace: SIGHUP: egress policy {policy} of 2"
        )
        # the loop goes on across the reload, and a while after it
        deadline = time.monotonic() + 60
        while lines_in(work / "count") < before + 50:
            assert time.monotonic() < deadline, "the sandbox's loop stopped"
            time.sleep(0.05)
        (work / "go").touch()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run = Run(proc.returncode, stderr.text(), _json_lines(events), _json_lines(alerts))
    assert run.returncode == 0, run.stderr
    assert (work / "b.txt").read_text() == "ok\n"
    first, second = curl_pids(run)
    assert [c["hostname"] for c in connects(run, second)] == [OTHER]
    [alert] = by_rule(run, EGRESS)
    assert (alert["process"]["pid"], alert["description"]) == (
        first,
        f"tcp {http.addr}:{PORT} ({OTHER}) is not on the allow-list",
    )
    assert by_rule(run, RESOLVER) == []
    # not one event lost: every /bin/true the sandbox ran and counted is an exec event
    trues = [e for e in run.events if e["kind"] == "exec" and e["filename"] == "/bin/true"]
    counted = lines_in(work / "count")
    assert counted > before + 50
    assert len(trues) == counted
    assert not [e for e in run.events if e["kind"] == "lost"]


def test_a_policy_suggested_from_a_recording_lets_the_same_work_pass(
    testnet: NetNS, dns: DnsServer, http: HttpHost, work: Path
) -> None:
    # Record (no policy), suggest a policy file from the recording, then run the same work
    # and one name more under it: only that name alerts.
    work_script = f"{curl(PKG, 'a.txt')} && {curl(MIRROR, 'b.txt')}"
    recorded = sandtrace_run(testnet, work_script, work)
    assert recorded.returncode == 0, recorded.stderr
    suggest = subprocess.run(
        [
            sys.executable,
            "-m",
            "sandtrace",
            "policy",
            "suggest",
            "--any-sandbox",
            "--format",
            "policy",
            str(work / "events.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert suggest.returncode == 0, suggest.stderr
    lines = suggest.stdout.splitlines()
    assert lines[2:] == [
        "[default]",
        "allow = [",
        f'    "{MIRROR}:{PORT}",  # 1 connects (tcp)',  # ties: by name
        f'    "{PKG}:{PORT}",  # 1 connects (tcp)',
        "]",
        f'resolvers = ["{dns.addr}"]',
    ]
    policy = work / "suggested.toml"
    policy.write_text(suggest.stdout)
    for name in ("events.jsonl", "alerts.jsonl"):
        (work / name).unlink(missing_ok=True)
    run = sandtrace_run(
        testnet, f"{work_script} && {curl(OTHER, 'c.txt')}", work, "--egress-policy", str(policy)
    )
    assert run.returncode == 0, run.stderr
    _, _, other = curl_pids(run)
    assert [(a["process"]["pid"], a["description"]) for a in by_rule(run, EGRESS)] == [
        (other, f"tcp {http.addr}:{PORT} ({OTHER}) is not on the allow-list")
    ]
    assert by_rule(run, RESOLVER) == []


def test_sighup_under_enforce_gives_the_kernel_the_new_policy(
    testnet: NetNS, dns: DnsServer, http: HttpHost, work: Path
) -> None:
    # Under --enforce the kernel refuses OTHER until a SIGHUP brings a file that allows it;
    # the same curl then fetches. (PKG, which has the same address, is never resolved: a
    # resolved allowed name would let its address pass for every name.)
    policy = policy_file(work / "policy.toml", [f"{PKG}:{PORT}"], [dns.addr])
    script = (
        f"{{ {curl(OTHER, 'a.txt')} || echo refused > a.txt; }} && touch ready && "
        f"while [ ! -e go ]; do sleep 0.05; done && {curl(OTHER, 'b.txt')}"
    )
    events, alerts = work / "events.jsonl", work / "alerts.jsonl"
    argv = [
        *(sys.executable, "-m", "sandtrace", "run", "--json", "--enforce"),
        *("--events", str(events), "--alerts", str(alerts), "--egress-policy", str(policy)),
        *("--", *testnet.in_inside("sh", "-c", script)),
    ]
    proc = subprocess.Popen(
        argv, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    stderr = _Stderr(proc)
    try:
        wait_file(work / "ready")
        policy_file(policy, [f"{PKG}:{PORT}", f"{OTHER}:{PORT}"], [dns.addr])
        proc.send_signal(signal.SIGHUP)
        stderr.wait_for(f"sandtrace: SIGHUP: egress policy {policy} of 2")
        (work / "go").touch()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run = Run(proc.returncode, stderr.text(), _json_lines(events), _json_lines(alerts))
    assert run.returncode == 0, run.stderr
    assert [(work / f).read_text() for f in ("a.txt", "b.txt")] == ["refused\n", "ok\n"]
    assert len(http.requests()) == 1  # the refused connect never reached the host
    first, second = curl_pids(run)
    assert [(c["denied"], c["errno"]) for c in connects(run, first)] == [(True, 1)]
    assert [c["denied"] for c in connects(run, second)] == [False]
    assert [a["process"]["pid"] for a in by_rule(run, DENIED)] == [first]
    assert by_rule(run, EGRESS) == []  # the kernel's refusal is the denial rule's to report


def curl_resolved_over_tcp(testnet: NetNS, work: Path, name: str, resolver: str) -> Run:
    """`run --enforce` of curl fetching from `name`, the only name the policy allows, its
    resolver asked over TCP (glibc's RES_OPTIONS=use-vc); a.txt says "ok" or "refused"."""
    policy = policy_file(work / "policy.toml", [f"{name}:{PORT}"], [resolver])
    script = f"RES_OPTIONS=use-vc {curl(name, 'a.txt')} || echo refused > a.txt"
    run = sandtrace_run(testnet, script, work, "--enforce", "--egress-policy", str(policy))
    assert run.returncode == 0, run.stderr
    return run


def test_a_name_resolved_over_tcp_is_learnt_under_enforce(
    testnet: NetNS, dns: DnsServer, http: HttpHost, work: Path
) -> None:
    # glibc's resolver asks over TCP with RES_OPTIONS=use-vc: the answer arrives in one TCP
    # segment that starts with the message's length, and the kernel must learn PKG's address
    # from it before curl connects (nothing else allows that address).
    run = curl_resolved_over_tcp(testnet, work, PKG, dns.addr)
    assert (work / "a.txt").read_text() == "ok\n"
    assert {q["proto"] for q in dns.queries() if q["name"] == PKG} == {"tcp"}
    assert len(http.requests()) == 1
    [by_name] = curl_pids(run)
    [allowed] = connects(run, by_name)
    assert (allowed["denied"], allowed["hostname"]) == (False, PKG)
    answers = [e for e in run.events if e["kind"] == "dns" and e["query_name"] == PKG]
    assert answers and {e["protocol"] for e in answers} == {"tcp"}, answers
    assert sum(e["mapped"] for e in answers) == 1  # the A answer, entered in the kernel
    assert by_rule(run, DENIED) == []


SPLIT = "split.example.test"


@pytest.fixture
def split_dns(testnet: NetNS) -> Iterator[DnsServer]:
    """The resolver, answering SPLIT over TCP in two segments: the message's header and
    question (and 2 bytes of its answer) in the first, the rest of the answer in the next."""
    prefix_header_question = 2 + 12 + len(SPLIT) + 2 + 4
    zone = {
        SPLIT: {"A": [testnet.outside_addr], "TTL": 300, "TCP_SPLIT": prefix_header_question + 2}
    }
    with run_dns_server(testnet, zone) as server:
        yield server


def test_a_tcp_answer_split_across_segments_is_not_learnt_and_is_reported(
    testnet: NetNS, split_dns: DnsServer, http: HttpHost, work: Path
) -> None:
    # The kernel does not reassemble TCP: the A record, in the second segment, teaches it
    # nothing, so under --enforce the connect to the allowed name is refused; the DNS event
    # and the run's summary say why.
    run = curl_resolved_over_tcp(testnet, work, SPLIT, split_dns.addr)
    assert (work / "a.txt").read_text() == "refused\n"
    assert http.requests() == []
    assert {q["proto"] for q in split_dns.queries() if q["name"] == SPLIT} == {"tcp"}
    [answer] = [
        e
        for e in run.events
        if e["kind"] == "dns" and e["query_name"] == SPLIT and e["query_type"] == "A"
    ]
    full = 12 + len(SPLIT) + 2 + 4 + 16  # header, question, one A record
    assert (answer["protocol"], answer["truncated"], answer["mapped"]) == ("tcp", True, 0)
    assert answer["error"] == (
        f"the message continues in a later TCP segment ({full - 14} of its {full} bytes in "
        "the first): answers past them were not learnt"
    )
    [by_name] = curl_pids(run)
    assert [(c["denied"], c["errno_name"]) for c in connects(run, by_name)] == [(True, "EPERM")]
    assert (
        "sandtrace:   dns: 1 answers over TCP split across segments (the addresses past the "
        "first segment were not learnt)"
    ) in run.stderr.splitlines()
