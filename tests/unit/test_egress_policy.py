"""Egress policy by name: a name entry allows a connect whose hostname matches it (never one
without a hostname), DNS is judged by the sandbox's resolvers, policy files are validated
with every problem at once, resolv.conf's nameservers fill in, and a reload swaps the
engine's policy and tells its subscribers."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import msgspec
import pytest

from api.events import AnyEvent
from collector.egresspolicy import EgressPolicySource, host_resolvers, nameservers
from detect.egress import (
    EGRESS_RULE_ID,
    RESOLVER_RULE_ID,
    EgressPolicies,
    EgressPolicy,
    parse_resolver,
)
from detect.engine import Engine
from detect.policyfile import PolicyFileError, parse_policy, read_policy_file
from detect.ruleset import RuleSet
from detect.testing import event_from_fields
from tests.unit.test_egress import sandtrace


def connect(
    ip: str,
    port: int = 443,
    hostname: str | None = None,
    *,
    pid: int = 7,
    sandbox: str = "box",
    protocol: str = "tcp",
) -> AnyEvent:
    fields: dict[str, object] = {
        "DestinationIp": ip,
        "DestinationPort": port,
        "ProcessId": pid,
        "Sandbox": sandbox,
        "Protocol": protocol,
    }
    if hostname is not None:
        fields["DestinationHostname"] = hostname
    return event_from_fields("network_connection", fields)


def dns(resolver: str, name: str = "pypi.org", pid: int = 7, sandbox: str = "box") -> AnyEvent:
    fields = {
        "QueryName": name,
        "QueryResults": ["192.0.2.7"],
        "ResolverIp": resolver,
        "ProcessId": pid,
        "Sandbox": sandbox,
    }
    return event_from_fields("dns_query", fields)


def rules_of(engine: Engine, *events: AnyEvent) -> list[str]:
    return [a.rule_id for e in events for a in engine.feed(e)]


# -- matching by name --------------------------------------------------------------------------


def test_a_name_entry_allows_the_address_the_sandbox_resolved_for_it() -> None:
    policy = EgressPolicy.parse(["pypi.org", "*.pythonhosted.org:443", "192.0.2.0/24:22"])
    assert policy.allows("203.0.113.5", 443, "pypi.org")
    assert policy.allows("203.0.113.5", 8080, "pypi.org")  # no ports: any port
    assert policy.allows("203.0.113.6", 443, "files.pythonhosted.org")
    assert policy.allows("203.0.113.6", 443, "Files.PythonHosted.org.")  # as kept: lower case
    assert policy.allows("192.0.2.9", 22)  # networks as before
    # near misses: the wildcard's own domain, a name only ending alike, another port, a
    # sibling of the exact name, and the same address with no name at all
    assert not policy.allows("203.0.113.6", 443, "pythonhosted.org")
    assert not policy.allows("203.0.113.6", 443, "evilpythonhosted.org")
    assert not policy.allows("203.0.113.6", 80, "files.pythonhosted.org")
    assert not policy.allows("203.0.113.5", 443, "test.pypi.org")
    assert not policy.allows("203.0.113.5", 443, "pypi.org.evil.example")
    assert not policy.allows("203.0.113.5", 443)
    assert not policy.allows("203.0.113.5", 443, "")


@pytest.mark.parametrize(
    ("hostname", "port", "allowed"),
    [
        ("a.b.example.org", 443, True),  # any depth below the wildcard's domain
        ("b.example.org", 443, True),
        ("example.org", 443, False),  # the domain itself is not below it
        ("example.org", 80, True),  # ...but has an entry of its own
        ("b.example.org", 80, False),
        ("x.deep.example.org", 22, True),  # two wildcards apply: either's ports
        ("x.deep.example.org", 443, True),
        ("deep.example.org", 22, False),
        ("x.deep.example.org", 25, False),
        ("org", 443, False),
        ("xexample.org", 443, False),
    ],
)
def test_wildcards_at_every_level(hostname: str, port: int, allowed: bool) -> None:
    policy = EgressPolicy.parse(["*.example.org:443", "example.org:80", "*.deep.example.org:22"])
    assert policy.allows("203.0.113.5", port, hostname) is allowed


def test_the_answer_cache_keys_on_the_hostname() -> None:
    policy = EgressPolicy.parse(["pypi.org"])
    # the same address and port, asked first with the allowed name, then without one and
    # with another: each is its own answer (a cache keyed on address and port would say yes)
    assert policy.allows("203.0.113.5", 443, "pypi.org")
    assert not policy.allows("203.0.113.5", 443)
    assert not policy.allows("203.0.113.5", 443, "evil.example")
    assert policy.allows("203.0.113.5", 443, "pypi.org")


def test_the_engine_alerts_by_name_and_names_the_destination() -> None:
    engine = Engine(RuleSet(), EgressPolicies.parse(["pypi.org:443"]))
    assert engine.feed(connect("203.0.113.5", 443, "pypi.org", pid=1)) == []
    [unnamed] = engine.feed(connect("203.0.113.5", 443, pid=2))
    assert unnamed.rule_id == EGRESS_RULE_ID
    assert unnamed.description == "tcp 203.0.113.5:443 is not on the allow-list"
    [other] = engine.feed(connect("203.0.113.5", 443, "pool.evil.example", pid=3))
    assert other.description == "tcp 203.0.113.5:443 (pool.evil.example) is not on the allow-list"
    assert engine.feed(connect("203.0.113.5", 80, "pypi.org", pid=4))[0].rule_id == EGRESS_RULE_ID


def test_a_tls_server_name_never_allows() -> None:
    """The client writes its ClientHello: a server name there is a claim, not a lookup."""
    engine = Engine(RuleSet(), EgressPolicies.parse(["pypi.org:443"]))
    claimed = msgspec.structs.replace(
        connect("203.0.113.66", 443, "pypi.org", pid=1), hostname_source="sni"
    )
    [alert] = engine.feed(claimed)
    assert alert.description == (
        "tcp 203.0.113.66:443 (TLS server name pypi.org) is not on the allow-list"
    )
    assert engine.feed(connect("203.0.113.66", 443, "pypi.org", pid=2)) == []  # resolved


def test_egress_alerts_per_process_still_fold() -> None:
    engine = Engine(RuleSet(), EgressPolicies.parse(["pypi.org:443"]))
    first = engine.feed(connect("203.0.113.5", 443, "a.example", pid=1))
    assert [a.rule_id for a in first] == [EGRESS_RULE_ID]
    assert engine.feed(connect("203.0.113.6", 443, "b.example", pid=1)) == []  # folded
    [summary] = engine.flush()
    assert (summary.count, summary.repeat) == (2, True)
    assert summary.description == (
        "tcp 203.0.113.5:443 (a.example), tcp 203.0.113.6:443 (b.example) are not on the allow-list"
    )


# -- resolvers ---------------------------------------------------------------------------------


def test_dns_to_a_server_not_listed_alerts_and_to_a_listed_one_passes() -> None:
    egress = EgressPolicies.parse(["pypi.org"], resolvers=["192.0.2.53", "2001:db8::53"])
    engine = Engine(RuleSet(), egress)
    # to a listed resolver: its port 53 passes without an allow-list entry, and its answers
    listed = [
        connect("192.0.2.53", 53, pid=1, protocol="udp"),
        dns("192.0.2.53", pid=1),
        connect("2001:db8::53", 53, pid=2, protocol="tcp"),
        connect("::ffff:192.0.2.53", 53, pid=3, protocol="udp"),
    ]
    assert rules_of(engine, *listed) == []
    [sent] = engine.feed(connect("198.51.100.9", 53, pid=4, protocol="udp"))
    assert (sent.rule_id, sent.level) == (RESOLVER_RULE_ID, "high")
    assert sent.description == (
        "DNS to udp 198.51.100.9:53, not one of the sandbox's resolvers (192.0.2.53, 2001:db8::53)"
    )
    [answer] = engine.feed(dns("198.51.100.9", "exfil.evil.example", pid=5))
    assert answer.rule_id == RESOLVER_RULE_ID
    assert answer.description.startswith(
        "DNS answer for exfil.evil.example A from 198.51.100.9:53, not one of the sandbox's"
    )
    # port 53 elsewhere is DNS's alone: a listed resolver's other ports are not allowed
    assert rules_of(engine, connect("192.0.2.53", 443, pid=6)) == [EGRESS_RULE_ID]


def test_without_resolvers_dns_is_judged_by_the_allow_list() -> None:
    """The service knows no sandbox's resolv.conf: with no resolvers given, DNS is a
    destination like any other and answers are not judged."""
    engine = Engine(RuleSet(), EgressPolicies.parse(["192.0.2.53:53"]))
    assert rules_of(engine, connect("192.0.2.53", 53, protocol="udp"), dns("198.51.100.9")) == []
    assert rules_of(engine, connect("198.51.100.9", 53, pid=2)) == [EGRESS_RULE_ID]


def test_resolvers_per_sandbox() -> None:
    egress = EgressPolicies.parse(
        ["pypi.org", "ci=github.com"], resolvers=["192.0.2.53", "web=198.51.100.53"]
    )
    assert egress.default is not None and egress.default.names == (("pypi.org", ()),)
    assert [str(r) for r in egress.default.resolvers] == ["192.0.2.53"]
    # a sandbox named only by a resolver keeps the shared entries, with its own resolvers
    web = egress.per_sandbox["web"]
    assert (web.names, [str(r) for r in web.resolvers]) == (
        (("pypi.org", ()),),
        ["198.51.100.53"],
    )
    # a sandbox with entries of its own and no resolvers of its own takes the shared ones
    ci = egress.per_sandbox["ci"]
    assert (ci.names, [str(r) for r in ci.resolvers]) == ((("github.com", ()),), ["192.0.2.53"])
    engine = Engine(RuleSet(), egress)
    assert rules_of(engine, dns("198.51.100.53", sandbox="web")) == []
    assert rules_of(engine, dns("198.51.100.53", sandbox="ci", pid=2)) == [RESOLVER_RULE_ID]


def test_shared_resolvers_apply_to_sandboxes_with_entries_of_their_own_only() -> None:
    egress = EgressPolicies.parse(["ci=github.com"], resolvers=["192.0.2.53"])
    assert egress.default is None  # sandboxes not named are not checked, DNS neither
    assert [str(r) for r in egress.per_sandbox["ci"].resolvers] == ["192.0.2.53"]


@pytest.mark.parametrize(
    ("resolvers", "message"),
    [
        (["192.0.2.300"], "resolver '192.0.2.300': '192.0.2.300' is not an IP address"),
        (["192.0.2.53:53"], "resolver '192.0.2.53:53': '192.0.2.53:53' is not an IP address"),
        (["=192.0.2.53"], "resolver '=192.0.2.53': no sandbox before '='"),
        (["db=192.0.2.53"], "resolver for sandbox 'db', which has no allow-list"),
    ],
)
def test_a_bad_resolver_is_named(resolvers: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        EgressPolicies.parse(["ci=github.com"], resolvers=resolvers)
    assert str(info.value).startswith(message)


def test_an_ipv4_mapped_resolver_is_its_ipv4_address() -> None:
    assert parse_resolver("::ffff:192.0.2.53") == ipaddress.IPv4Address("192.0.2.53")
    assert parse_resolver("[2001:db8::53]") == ipaddress.IPv6Address("2001:db8::53")


def test_resolv_conf_nameservers(tmp_path: Path) -> None:
    text = (
        "# generated\nsearch example.org\nnameserver 192.0.2.53\nnameserver  fe80::1%eth0\n"
        "nameserver not-an-address\nnameserver 192.0.2.53\noptions edns0\nnameserver\n"
        "  nameserver 198.51.100.53 # comment\n"
    )
    assert [str(a) for a in nameservers(text)] == ["192.0.2.53", "fe80::1", "198.51.100.53"]
    conf = tmp_path / "resolv.conf"
    conf.write_text("search x\n")  # none named: the library asks the local host
    assert [str(a) for a in host_resolvers(conf)] == ["127.0.0.1", "::1"]
    assert [str(a) for a in host_resolvers(tmp_path / "missing")] == ["127.0.0.1", "::1"]


def test_resolv_conf_fills_only_policies_without_resolvers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.1\n")
    egress = EgressPolicies.parse(["pypi.org", "ci=github.com"], resolvers=["ci=192.0.2.99"])
    source = EgressPolicySource(egress, resolv_conf=conf)
    assert source.policies.default is not None
    assert [str(r) for r in source.policies.default.resolvers] == ["192.0.2.1"]
    assert [str(r) for r in source.policies.per_sandbox["ci"].resolvers] == ["192.0.2.99"]
    assert egress.default is not None and egress.default.resolvers == ()  # not changed
    given = EgressPolicySource(
        EgressPolicies.parse(["pypi.org"], resolvers=["192.0.2.1"]), resolv_conf=conf
    )
    assert given.describe() == "egress allow-list of 1"  # its resolvers are its own
    assert source.describe().startswith(
        f"egress allow-list of 2, resolvers 192.0.2.1 from the host's {conf} (a sandbox in "
        "a mount namespace of its own may have others"
    )


# -- policy files ------------------------------------------------------------------------------

GOOD = """
[default]
allow = ["pypi.org:443", "*.pythonhosted.org:443", "10.0.0.0/8"]
resolvers = ["192.0.2.53"]

[sandbox."/sandtrace/ci"]
allow = ["github.com:443"]
check_loopback = true

[sandbox.web]
resolvers = ["198.51.100.53"]
"""


def test_a_policy_file_holds_entries_resolvers_and_loopback_per_sandbox(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(GOOD)
    egress = read_policy_file(path)
    default = egress.default
    assert default is not None
    assert default.names == (("pypi.org", ((443, 443),)), ("*.pythonhosted.org", ((443, 443),)))
    assert [str(n) for n, _ in default.allowed] == ["10.0.0.0/8"]
    assert ([str(r) for r in default.resolvers], default.allow_loopback) == (["192.0.2.53"], True)
    ci = egress.per_sandbox["/sandtrace/ci"]
    assert (ci.names, ci.allowed, ci.allow_loopback) == (
        (("github.com", ((443, 443),)),),
        (),
        False,
    )
    assert [str(r) for r in ci.resolvers] == ["192.0.2.53"]  # the default's
    web = egress.per_sandbox["web"]
    assert (web.names, web.allowed) == (default.names, default.allowed)  # the default's
    assert [str(r) for r in web.resolvers] == ["198.51.100.53"]
    engine = Engine(RuleSet(), egress)
    assert rules_of(engine, connect("203.0.113.5", 443, "files.pythonhosted.org")) == []
    assert rules_of(engine, connect("203.0.113.5", 443, "pypi.org", sandbox="/sandtrace/ci")) == [
        EGRESS_RULE_ID
    ]


def test_every_problem_of_a_policy_file_is_said_at_once() -> None:
    data = {
        "default": {
            "allow": ["pypi.org:0", "ok.example", 7, "a.*.org"],
            "resolvers": "192.0.2.53",
            "check_loopback": "yes",
            "alow": [],
        },
        "sandbox": {"ci": {"resolvers": ["192.0.2.300"]}, "web": "github.com"},
        "sandboxes": {},
    }
    with pytest.raises(PolicyFileError) as info:
        parse_policy(data, "p.toml")
    assert info.value.problems == [
        "p.toml: [default] allow[0]: 'pypi.org:0': port 0 is out of range (expected ports "
        "1-65535: one (443), a range (8000-8100) or a list (80,443))",
        "p.toml: [default] allow[2]: 7 is an integer; expected a string",
        "p.toml: [default] allow[3]: 'a.*.org': 'a.*.org': '*' is allowed only as the first "
        "label '*' (expected a DNS name such as pypi.org or a wildcard such as "
        "*.githubusercontent.com, optionally followed by :PORTS)",
        "p.toml: [default] resolvers: '192.0.2.53' is a string; expected an array of strings: "
        "DNS servers' addresses (192.0.2.53, 2001:db8::53)",
        "p.toml: [default] check_loopback: 'yes' is a string; expected true or false",
        "p.toml: [default] alow: unknown key (expected one of allow, resolvers, check_loopback)",
        "p.toml: [sandbox.ci] resolvers[0]: '192.0.2.300' is not an IP address (expected a DNS "
        "server's address such as 192.0.2.53 or 2001:db8::53, without a port: DNS is port 53)",
        "p.toml: [sandbox.web]: is a string; expected a table",
        "p.toml: [sandboxes]: unknown table (expected [default] and [sandbox.NAME] tables)",
    ]


def test_a_sandbox_table_needs_an_allow_list_of_its_own_or_the_defaults() -> None:
    with pytest.raises(PolicyFileError) as info:
        parse_policy({"sandbox": {"a/b": {"resolvers": ["192.0.2.53"]}}}, "p.toml")
    assert info.value.problems == [
        'p.toml: [sandbox."a/b"]: no allow key and no [default] allow to take (expected '
        "allow = [...] in either)"
    ]
    with pytest.raises(PolicyFileError) as info:
        parse_policy({}, "p.toml")
    assert info.value.problems == [
        "p.toml: no table (expected [default] and [sandbox.NAME] tables)"
    ]
    # an empty allow list is a policy: nothing but loopback
    empty = parse_policy({"default": {"allow": []}}, "p.toml")
    assert empty.default is not None
    assert not empty.default.allows("192.0.2.1", 443, "pypi.org")


def test_an_unreadable_or_broken_policy_file_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError) as info:
        read_policy_file(tmp_path / "missing.toml")
    assert info.value.problems == [
        f"{tmp_path}/missing.toml: cannot read: No such file or directory"
    ]
    bad = tmp_path / "bad.toml"
    bad.write_text("[default\nallow = 1\n")
    with pytest.raises(PolicyFileError) as info:
        read_policy_file(bad)
    [problem] = info.value.problems
    assert problem.startswith(f"{bad}: not valid TOML: ")


# -- reloads -----------------------------------------------------------------------------------


def test_a_reload_swaps_the_policy_and_a_bad_file_keeps_the_old(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.53\n")
    path = tmp_path / "policy.toml"
    path.write_text('[default]\nallow = ["pypi.org"]\n')
    source = EgressPolicySource.from_file(path, resolv_conf=conf)
    engine = Engine(RuleSet(), source.policies)
    told: list[EgressPolicies] = []
    source.on_policy_change(lambda p: setattr(engine, "egress", p))
    source.on_policy_change(told.append)
    assert rules_of(engine, connect("203.0.113.9", 443, "github.com", pid=1)) == [EGRESS_RULE_ID]
    old = source.policies

    path.write_text('[default]\nallow = ["pypi.org", "github.com"]\n')
    conf.write_text("nameserver 192.0.2.54\n")  # resolv.conf is read again too
    assert asyncio.run(source.reload()) == []
    assert told == [source.policies] and engine.egress is source.policies
    assert rules_of(engine, connect("203.0.113.9", 443, "github.com", pid=2)) == []
    assert source.policies.default is not None
    assert [str(r) for r in source.policies.default.resolvers] == ["192.0.2.54"]
    assert old.default is not None and old.default.names == (("pypi.org", ()),)  # unchanged
    assert [str(r) for r in old.default.resolvers] == ["192.0.2.53"]

    path.write_text('[default]\nallow = ["pypi.org", "bad name"]\n')
    kept = source.policies
    problems = asyncio.run(source.reload())
    assert len(problems) == 1 and problems[0].startswith(f"{path}: [default] allow[1]: ")
    assert source.policies is kept and engine.egress is kept and len(told) == 1


# -- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "watch"])
@pytest.mark.parametrize(
    ("options", "lines"),
    [
        (
            ["--egress-allow", "pypi.org", "--resolver", "192.0.2.300"],
            [
                "sandtrace: --resolver: resolver '192.0.2.300': '192.0.2.300' is not an IP "
                "address (expected a DNS server's address such as 192.0.2.53 or 2001:db8::53, "
                "without a port: DNS is port 53)"
            ],
        ),
        (
            ["--resolver", "192.0.2.53"],
            [
                "sandtrace: --resolver applies to an egress allow-list: give --egress-allow too "
                "(or both in an --egress-policy file)"
            ],
        ),
        (
            ["--egress-allow", "ci=github.com", "--resolver", "db=192.0.2.53"],
            [
                "sandtrace: --resolver: resolver for sandbox 'db', which has no allow-list "
                "(expected allow-list entries db=... or entries for every sandbox)"
            ],
        ),
        (
            ["--egress-policy", "/nonexistent/p.toml", "--resolver", "192.0.2.53"],
            [
                "sandtrace: --egress-policy holds the whole policy: give --resolver in its file "
                "instead (allow, resolvers, check_loopback)"
            ],
        ),
        (
            ["--egress-policy", "/nonexistent/p.toml"],
            [
                "sandtrace: --egress-policy: /nonexistent/p.toml: cannot read: No such file or "
                "directory"
            ],
        ),
        (
            ["--egress-policy", "POLICY"],
            [
                "sandtrace: --egress-policy: POLICY: [default] allow[1]: 'x y': 'x y': bad "
                "label 'x y' (expected a DNS name such as pypi.org or a wildcard such as "
                "*.githubusercontent.com, optionally followed by :PORTS)",
                "sandtrace: --egress-policy: POLICY: [default] resolvers[0]: 'dns' is not an "
                "IP address (expected a DNS server's address such as 192.0.2.53 or "
                "2001:db8::53, without a port: DNS is port 53)",
            ],
        ),
        (
            ["--egress-policy", "POLICY", "--server", "http://127.0.0.1:9"],
            [
                "sandtrace: --egress-policy has no effect with --server (the service checks "
                "egress: set [detection] egress_allow or egress_policy in its configuration)"
            ],
        ),
    ],
)
def test_the_command_line_refuses_a_bad_policy_before_it_starts(
    command: str, options: list[str], lines: list[str], tmp_path: Path
) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('[default]\nallow = ["pypi.org", "x y"]\nresolvers = ["dns"]\n')
    options = [str(policy) if o == "POLICY" else o for o in options]
    lines = [line.replace("POLICY", str(policy)) for line in lines]
    done = sandtrace(command, *options, *(["--", "true"] if command == "run" else []))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == lines
