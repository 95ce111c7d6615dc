"""`sandtrace policy suggest` prefers names: a destination with a hostname is proposed as
that name (counted per name), the DNS servers asked become a policy file's resolvers, and
the `policy` format is an --egress-policy file that lets every recorded connect pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api.events import AnyEvent, ConnectEvent, DnsEvent
from api.render import json_line
from detect.engine import Engine
from detect.policyfile import read_policy_file
from detect.ruleset import RuleSet
from sandtrace.cli import main
from sandtrace.suffixes import PUBLIC_SUFFIX_LIST, PublicSuffixes
from tests.unit.test_schemas import common, process


def connect(
    sandbox: str, daddr: str, dport: int, hostname: str = "", pid: int = 4242, **kw: Any
) -> ConnectEvent:
    """A connect by process `pid` (each its own: alerts fold per process)."""
    fields: dict[str, Any] = {
        "protocol": "tcp",
        "family": "ipv6" if ":" in daddr else "ipv4",
        "daddr": daddr,
        "dport": dport,
        "outcome": "success",
        "hostname": hostname,
        "hostname_source": "dns" if hostname else "",
    }
    fields.update(kw)
    who = process(pid=pid, key=f"{pid}@99")
    return ConnectEvent(**common(sandbox=sandbox, process=who), **fields)


def answer(sandbox: str, resolver: str, name: str) -> DnsEvent:
    return DnsEvent(
        **common(sandbox=sandbox),
        query_name=name,
        query_type="A",
        addresses=["192.0.2.1"],
        resolver=resolver,
        resolver_port=53,
        protocol="udp",
    )


EVENTS: list[AnyEvent] = [
    # pypi.org behind two addresses (a CDN): one name, counted over both
    connect("/sandtrace/ci", "192.0.2.10", 443, "pypi.org"),
    connect("/sandtrace/ci", "192.0.2.11", 443, "PyPI.org"),
    connect("/sandtrace/ci", "192.0.2.11", 443, "pypi.org", outcome="repeated", repeats=4),
    connect("/sandtrace/ci", "192.0.2.20", 443, "files.pythonhosted.org"),
    connect("/sandtrace/ci", "192.0.2.20", 80, "files.pythonhosted.org"),
    # an address no name explains, and a name no policy can hold: by address
    connect("/sandtrace/ci", "198.51.100.7", 8443),
    connect("/sandtrace/ci", "198.51.100.8", 443, "bad name\\x00"),
    connect("/sandtrace/ci", "198.51.100.9", 443, "pypi.org", hostname_source="sni"),
    # DNS: to the resolver (a query), and its answers
    connect("/sandtrace/ci", "192.0.2.53", 53, protocol="udp"),
    answer("/sandtrace/ci", "192.0.2.53", "pypi.org"),
    answer("/sandtrace/ci", "::ffff:192.0.2.53", "files.pythonhosted.org"),
    # another sandbox, and a second resolver answered there
    connect("web", "192.0.2.30", 443, "github.com"),
    answer("web", "198.51.100.53", "github.com"),
]


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json_line(e) + "\n" for e in EVENTS))
    return path


def test_names_are_proposed_with_counts(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "suggest", str(recorded)]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines() == [
        "# sandbox /sandtrace/ci: 12 connects",
        "/sandtrace/ci=pypi.org:443  # 6 connects (tcp)",
        "/sandtrace/ci=files.pythonhosted.org:80,443  # 2 connects (tcp)",
        "/sandtrace/ci=192.0.2.53:53  # 1 connects (udp)",
        "/sandtrace/ci=198.51.100.7:8443  # 1 connects (tcp)",
        "/sandtrace/ci=198.51.100.8:443  # 1 connects (tcp)",
        "/sandtrace/ci=198.51.100.9:443  # 1 connects (tcp)",  # a TLS name: by address
        "# sandbox web: 1 connects",
        "web=github.com:443  # 1 connects (tcp)",
    ]


def test_the_policy_format_is_a_policy_file(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "suggest", "--format", "policy", str(recorded)]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines() == [
        "# sandtrace policy suggest: 13 events",
        "",
        '[sandbox."/sandtrace/ci"]',
        "allow = [",
        '    "pypi.org:443",  # 6 connects (tcp)',
        '    "files.pythonhosted.org:80,443",  # 2 connects (tcp)',
        '    "198.51.100.7:8443",  # 1 connects (tcp)',
        '    "198.51.100.8:443",  # 1 connects (tcp)',
        '    "198.51.100.9:443",  # 1 connects (tcp)',
        "]",
        'resolvers = ["192.0.2.53"]',
        "",
        "[sandbox.web]",
        "allow = [",
        '    "github.com:443",  # 1 connects (tcp)',
        "]",
        'resolvers = ["198.51.100.53"]',
    ]
    policy = tmp_path / "egress.toml"
    policy.write_text(out)
    # the file loads, and judges every recorded event as allowed
    engine = Engine(RuleSet(), read_policy_file(policy))
    assert [a for e in EVENTS for a in engine.feed(e)] == []
    # and only those: another name, port or resolver alerts
    others = [
        connect("/sandtrace/ci", "192.0.2.10", 443, "test.pypi.org", pid=1),
        connect("/sandtrace/ci", "192.0.2.10", 22, "pypi.org", pid=2),
        connect("web", "192.0.2.53", 53, protocol="udp", pid=3),
    ]
    assert [a.rule_id for e in others for a in engine.feed(e)] == [
        "sandtrace-egress-allow-list",
        "sandtrace-egress-allow-list",
        "sandtrace-egress-resolver",
    ]


def test_any_sandbox_is_one_default_table(
    recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "suggest", "--any-sandbox", "--format", "policy", str(recorded)]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[2:4] == ["[default]", "allow = ["]
    assert out.splitlines()[-1] == 'resolvers = ["192.0.2.53", "198.51.100.53"]'
    assert '    "github.com:443",  # 1 connects (tcp)' in out.splitlines()


SUFFIXES = "// a part of the list\norg\nio\ngithub.io\nuk\nco.uk\n*.ck\n!www.ck\n"


@pytest.mark.parametrize(
    ("name", "registrable"),
    [
        ("files.pypi.org", "pypi.org"),
        ("a.b.pypi.org", "pypi.org"),
        ("pypi.org", "pypi.org"),
        ("org", None),
        ("www.example.co.uk", "example.co.uk"),
        ("co.uk", None),
        ("alice.github.io", "alice.github.io"),  # github.io is a public suffix
        ("a.alice.github.io", "alice.github.io"),
        ("x.foo.ck", "x.foo.ck"),  # *.ck: foo.ck is a public suffix
        ("a.www.ck", "www.ck"),  # !www.ck: but www.ck is not
        ("a.example.test", "example.test"),  # no rule: the last label is the suffix
    ],
)
def test_registrable_domains_follow_the_public_suffix_list(
    name: str, registrable: str | None
) -> None:
    assert PublicSuffixes.parse(SUFFIXES).registrable(name) == registrable


def test_the_distributions_list_is_read() -> None:
    suffixes = PublicSuffixes.read(PUBLIC_SUFFIX_LIST)
    assert suffixes is not None, f"{PUBLIC_SUFFIX_LIST}: install Debian's publicsuffix"
    assert suffixes.registrable("raw.githubusercontent.com") == "raw.githubusercontent.com"
    assert suffixes.registrable("files.pythonhosted.org") == "pythonhosted.org"
    assert PublicSuffixes.read(Path("/nonexistent/list.dat")) is None


def test_wildcards_group_names_below_one_registrable_domain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [
        *[connect("ci", "192.0.2.1", 443, f"{n}.pythonhosted.org") for n in ("a", "b", "c")],
        connect("ci", "192.0.2.1", 80, "d.e.pythonhosted.org"),
        connect("ci", "192.0.2.2", 443, "pythonhosted.org"),  # the domain itself: apart
        connect("ci", "192.0.2.3", 443, "x.example.co.uk"),
        connect("ci", "192.0.2.4", 443, "y.example.co.uk"),  # 2 < 3: each on its own
        *[connect("ci", "192.0.2.5", 443, f"{n}.github.io") for n in ("al", "bo", "cy")],
        connect("ci", "192.0.2.6", 443),
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json_line(e) + "\n" for e in events))
    assert main(["policy", "suggest", "--wildcards", "3", "--format", "policy", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[2:] == [
        "[sandbox.ci]",
        "allow = [",
        '    "*.pythonhosted.org:80,443",  # 4 connects (tcp; 4 names)',
        '    "192.0.2.6:443",  # 1 connects (tcp)',
        '    "al.github.io:443",  # 1 connects (tcp)',  # owners apart: never grouped
        '    "bo.github.io:443",  # 1 connects (tcp)',
        '    "cy.github.io:443",  # 1 connects (tcp)',
        '    "pythonhosted.org:443",  # 1 connects (tcp)',
        '    "x.example.co.uk:443",  # 1 connects (tcp)',
        '    "y.example.co.uk:443",  # 1 connects (tcp)',
        "]",
    ]
    policy = tmp_path / "egress.toml"
    policy.write_text(out)
    engine = Engine(RuleSet(), read_policy_file(policy))
    assert [a for e in events for a in engine.feed(e)] == []


@pytest.mark.parametrize("value", ["1", "0", "many"])
def test_wildcards_takes_two_or_more(
    value: str, recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["policy", "suggest", "--wildcards", value, str(recorded)])
    assert info.value.code == 2
    assert f"argument --wildcards: {value!r}: expected a number of names, 2 or more" in (
        capsys.readouterr().err
    )
