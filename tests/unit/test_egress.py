"""Egress allow-lists: entries parsed strictly (ports 1-65535, ranges), loopback allowed by
default and judged by the list when switched off, and a bad entry on the command line of
`run`/`watch` a clear error (exit 2) before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from api.events import AnyEvent
from detect.egress import (
    EGRESS_RULE_ID,
    EgressPolicies,
    EgressPolicy,
    name_matches,
    parse_ports,
)
from detect.engine import Engine
from detect.ruleset import RuleSet
from detect.testing import event_from_fields
from tests.serving import ROOT_DIR

PORTS_EXPECTED = "(expected ports 1-65535: one (443), a range (8000-8100) or a list (80,443))"
NAME_EXPECTED = (
    "(expected a DNS name such as pypi.org or a wildcard such as *.githubusercontent.com, "
    "optionally followed by :PORTS)"
)


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("192.0.2.0/24:0", f"port 0 is out of range {PORTS_EXPECTED}"),
        ("192.0.2.0/24:65536", f"port 65536 is out of range {PORTS_EXPECTED}"),
        ("192.0.2.0/24:99999", f"port 99999 is out of range {PORTS_EXPECTED}"),
        ("192.0.2.0/24:443,99999", f"port 99999 is out of range {PORTS_EXPECTED}"),
        ("192.0.2.0/24:abc", f"'abc' is not a port or a range {PORTS_EXPECTED}"),
        ("192.0.2.0/24:", f"'' is not a port or a range {PORTS_EXPECTED}"),
        ("192.0.2.0/24:80,,443", f"'' is not a port or a range {PORTS_EXPECTED}"),
        ("192.0.2.0/24:-80", f"'-80' is not a port or a range {PORTS_EXPECTED}"),
        ("192.0.2.0/24:+80", f"'+80' is not a port or a range {PORTS_EXPECTED}"),
        ("192.0.2.0/24: 80", f"' 80' is not a port or a range {PORTS_EXPECTED}"),
        ("192.0.2.0/24:8100-8000", f"range 8100-8000 runs backwards {PORTS_EXPECTED}"),
        ("192.0.2.0/24:1-70000", f"port 70000 is out of range {PORTS_EXPECTED}"),
        ("[2001:db8::/32]:0", f"port 0 is out of range {PORTS_EXPECTED}"),
        ("[2001:db8::/32]x", "expected [IPV6-NETWORK] or [IPV6-NETWORK]:PORTS"),
        ("[2001:db8::/32:53", "expected [IPV6-NETWORK] or [IPV6-NETWORK]:PORTS"),
        (
            "192.0.2.300",
            "'192.0.2.300' does not appear to be an IPv4 or IPv6 network (expected an address "
            "or a network such as 192.0.2.0/24, optionally followed by :PORTS)",
        ),
        ("a.*.org", f"'a.*.org': '*' is allowed only as the first label '*' {NAME_EXPECTED}"),
        ("ex ample.org", f"'ex ample.org': bad label 'ex ample' {NAME_EXPECTED}"),
        ("-a.example.org", f"'-a.example.org': bad label '-a' {NAME_EXPECTED}"),
        ("pypi.org:0", f"port 0 is out of range {PORTS_EXPECTED}"),
        ("*", f"'*' is not a DNS name {NAME_EXPECTED}"),
    ],
)
def test_a_bad_entry_is_named_with_what_is_expected(entry: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        EgressPolicy.parse([entry])
    assert str(info.value) == f"egress allow-list entry {entry!r}: {why}"


def test_a_sandbox_entry_is_named_whole() -> None:
    with pytest.raises(ValueError) as info:
        EgressPolicies.parse(["192.0.2.0/24", "st-web=198.51.100.0/24:99999"])
    assert str(info.value).startswith(
        "egress allow-list entry 'st-web=198.51.100.0/24:99999': port 99999 is out of range"
    )
    with pytest.raises(ValueError, match=r"'=192\.0\.2\.0/24': no sandbox before '='"):
        EgressPolicies.parse(["=192.0.2.0/24"])


def test_ports_ranges_and_lists() -> None:
    assert parse_ports("1") == ((1, 1),)
    assert parse_ports("65535") == ((65535, 65535),)
    assert parse_ports("443,80,8000-8100") == ((80, 80), (443, 443), (8000, 8100))
    assert parse_ports("1-65535") == ((1, 65535),)
    policy = EgressPolicy.parse(["192.0.2.0/24:80,8000-8100", "[2001:db8::/32]:53-54"])
    allowed = [
        policy.allows(addr, port)
        for addr, port in [
            ("192.0.2.9", 80),
            ("192.0.2.9", 81),
            ("192.0.2.9", 7999),
            ("192.0.2.9", 8000),
            ("192.0.2.9", 8050),
            ("192.0.2.9", 8100),
            ("192.0.2.9", 8101),
            ("2001:db8::1", 52),
            ("2001:db8::1", 54),
            ("198.51.100.1", 80),
        ]
    ]
    assert allowed == [True, False, False, True, True, True, False, False, True, False]


def connect(ip: str, port: int = 5432, pid: int = 7, sandbox: str = "box") -> AnyEvent:
    fields = {"DestinationIp": ip, "DestinationPort": port, "ProcessId": pid, "Sandbox": sandbox}
    return event_from_fields("network_connection", fields)


LOOPBACK = ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"]


def test_loopback_is_allowed_by_default() -> None:
    engine = Engine(RuleSet(), EgressPolicies.parse(["192.0.2.0/24:443"]))
    assert [engine.feed(connect(ip, pid=i)) for i, ip in enumerate(LOOPBACK)] == [[]] * 4
    (alert,) = engine.feed(connect("198.51.100.7", 443, pid=9))
    assert alert.rule_id == EGRESS_RULE_ID  # the list is in force for everything else


def test_loopback_alerts_when_the_list_judges_it() -> None:
    egress = EgressPolicies.parse(
        ["192.0.2.0/24:443", "st-db=127.0.0.1:5432"], allow_loopback=False
    )
    engine = Engine(RuleSet(), egress)
    alerts = [a for i, ip in enumerate(LOOPBACK) for a in engine.feed(connect(ip, pid=i))]
    assert [a.rule_id for a in alerts] == [EGRESS_RULE_ID] * 4
    assert [a.process.pid for a in alerts] == [0, 1, 2, 3]
    assert "127.0.0.1:5432 is not on the allow-list" in alerts[0].description
    # an entry that covers a loopback destination still allows it (per sandbox here)
    assert engine.feed(connect("127.0.0.1", 5432, pid=20, sandbox="st-db")) == []
    assert len(engine.feed(connect("127.0.0.1", 5433, pid=21, sandbox="st-db"))) == 1


def test_an_ipv4_mapped_destination_is_judged_as_ipv4() -> None:
    policy = EgressPolicy.parse(["192.0.2.0/24:443"], allow_loopback=False)
    assert policy.allows("::ffff:192.0.2.7", 443)
    assert not policy.allows("::ffff:198.51.100.7", 443)


def sandtrace(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandtrace", *args],
        cwd=ROOT_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", ["run", "watch"])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--egress-allow", "192.0.2.0/24", "--egress-allow", "10.0.0.0/8:99999"],
            "sandtrace: --egress-allow: egress allow-list entry '10.0.0.0/8:99999': port 99999 "
            f"is out of range {PORTS_EXPECTED}",
        ),
        (
            ["--egress-allow", "192.0.2.300"],
            "sandtrace: --egress-allow: egress allow-list entry '192.0.2.300': '192.0.2.300' "
            "does not appear to be an IPv4 or IPv6 network",
        ),
        (
            ["--egress-check-loopback"],
            "sandtrace: --egress-check-loopback applies to an allow-list: give --egress-allow too",
        ),
        (
            ["--egress-allow", "192.0.2.0/24", "--server", "http://127.0.0.1:9"],
            "sandtrace: --egress-allow has no effect with --server (the service checks egress",
        ),
    ],
)
def test_the_command_line_refuses_a_bad_entry_before_it_starts(
    command: str, options: list[str], message: str
) -> None:
    done = sandtrace(command, *options, *(["--", "true"] if command == "run" else []))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message), done.stderr
    assert "Traceback" not in done.stderr
    assert "tracing" not in done.stderr and "watching" not in done.stderr


@pytest.mark.parametrize("command", [["run", "--", "true"], ["watch"]])
def test_the_command_line_switches_the_loopback_rule(command: list[str]) -> None:
    from collector.cli import _egress  # noqa: PLC0415
    from sandtrace.cli import build_parser  # noqa: PLC0415

    def policy(*options: str) -> EgressPolicy:
        args = build_parser().parse_args([command[0], *options, *command[1:]])
        egress = _egress(args)
        assert egress is not None and egress.policies.default is not None
        return egress.policies.default

    assert policy("--egress-allow", "192.0.2.0/24").allows("127.0.0.1", 5432)
    checked = policy("--egress-allow", "192.0.2.0/24", "--egress-check-loopback")
    assert not checked.allows("127.0.0.1", 5432) and checked.allows("192.0.2.3", 5432)


def test_names_and_wildcards_are_kept_apart_from_networks() -> None:
    policies = EgressPolicies.parse(
        ["PyPI.org.", "sb=*.Example.ORG:443", "192.0.2.0/24", "[2001:db8::/32]:53"]
    )
    assert policies.default is not None
    assert policies.default.names == (("pypi.org", ()),)
    assert [str(net) for net, _ in policies.default.allowed] == ["192.0.2.0/24", "2001:db8::/32"]
    assert policies.per_sandbox["sb"].names == (("*.example.org", ((443, 443),)),)
    assert policies.per_sandbox["sb"].allowed == ()
    assert len(policies) == 4


@pytest.mark.parametrize(
    ("pattern", "hostname", "matches"),
    [
        ("pypi.org", "pypi.org", True),
        ("pypi.org", "files.pypi.org", False),
        ("*.example.org", "a.example.org", True),
        ("*.example.org", "a.b.example.org", True),
        ("*.example.org", "example.org", False),
        ("*.example.org", "badexample.org", False),
    ],
)
def test_a_wildcard_stands_for_names_strictly_below_its_domain(
    pattern: str, hostname: str, matches: bool
) -> None:
    assert name_matches(pattern, hostname) is matches
