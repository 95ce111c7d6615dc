"""Native Sigma evaluation: modifiers, conditions, refusals, and real SigmaHQ rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from detect.engine import Engine
from detect.loader import load_paths, load_text
from detect.ruleset import RuleSet
from detect.testing import event_from_fields

SIGMAHQ = Path(__file__).resolve().parents[1] / "data" / "sigmahq"


def rule(detection: str, category: str = "process_creation") -> RuleSet:
    text = f"""
title: test rule
id: 00000000-0000-4000-8000-000000000001
logsource: {{product: linux, category: {category}}}
detection:
{detection}
level: high
"""
    rules = RuleSet()
    load_text(text, "test", rules)
    return rules


def matches(detection: str, fields: dict[str, Any], category: str = "process_creation") -> bool:
    rules = rule(detection, category)
    assert rules.refused == []
    return rules.rules[0].match(fields)


@pytest.mark.parametrize(
    ("detection", "fields", "expected"),
    [
        ("  s: {Image|endswith: /ssh}\n  condition: s", {"Image": "/usr/bin/SSH"}, True),
        ("  s: {Image|endswith: /ssh}\n  condition: s", {"Image": "/usr/bin/sshd"}, False),
        ("  s: {Image|startswith: /tmp/}\n  condition: s", {"Image": "/tmp/.x/y"}, True),
        (
            "  s: {CommandLine|contains: stratum+tcp}\n  condition: s",
            {"CommandLine": "x -o STRATUM+TCP://h:1"},
            True,
        ),
        (
            "  s: {CommandLine|contains|all: [' -N', ' -R']}\n  condition: s",
            {"CommandLine": "ssh -N -R 1:h:2 u@h"},
            True,
        ),
        (
            "  s: {CommandLine|contains|all: [' -N', ' -R']}\n  condition: s",
            {"CommandLine": "ssh -N u@h"},
            False,
        ),
        ("  s: {Image|cased: /usr/bin/SSH}\n  condition: s", {"Image": "/usr/bin/ssh"}, False),
        ("  s: {Image: '/usr/bin/s?h'}\n  condition: s", {"Image": "/usr/bin/ssh"}, True),
        (
            "  s: {CommandLine|re: '-[a-zA-Z]*R\\s*[0-9]+:'}\n  condition: s",
            {"CommandLine": "ssh -NfR 8080:localhost:22 h"},
            True,
        ),
        (
            "  s: {DestinationIp|cidr: 198.51.100.0/24}\n  condition: s",
            {"DestinationIp": "198.51.100.9"},
            True,
        ),
        (
            "  s: {DestinationIp|cidr: 198.51.100.0/24}\n  condition: s",
            {"DestinationIp": "192.0.2.1"},
            False,
        ),
        (
            "  s: {DestinationIp|cidr: '2001:db8::/32'}\n  condition: s",
            {"DestinationIp": "2001:db8::5"},
            True,
        ),
        ("  s: {DestinationPort: 3333}\n  condition: s", {"DestinationPort": 3333}, True),
        ("  s: {DestinationPort: '3333'}\n  condition: s", {"DestinationPort": 3333}, True),
        ("  s: {DestinationPort|gte: 1024}\n  condition: s", {"DestinationPort": 80}, False),
        ("  s: {DestinationPort|lt: 1024}\n  condition: s", {"DestinationPort": 80}, True),
        (
            "  s: {CommandLine|windash|contains: ' -R '}\n  condition: s",
            {"CommandLine": "ssh /R x"},
            True,
        ),
        (
            "  s: {CommandLine|base64offset|contains: 'stratum+tcp://'}\n  condition: s",
            {"CommandLine": "echo c3RyYXR1bSt0Y3A6Ly9o | base64 -d | sh"},
            True,
        ),
        ("  s: {SourceIp|exists: false}\n  condition: s", {"SourceIp": ""}, True),
        ("  s: {Argv: '-R'}\n  condition: s", {"Argv": ["ssh", "-R", "1:h:2"]}, True),
        (
            "  s: {ParentImage|fieldref: Image}\n  condition: s",
            {"Image": "/bin/sh", "ParentImage": "/bin/sh"},
            True,
        ),
        ("  k: [pty.spawn]\n  condition: k", {"CommandLine": "python3 -c 'pty.spawn(1)'"}, True),
        (
            "  a: {Image|endswith: /nc}\n  b: {CommandLine|contains: ' -l'}\n"
            "  condition: a and not b",
            {"Image": "/bin/nc", "CommandLine": "nc -lvp 1"},
            False,
        ),
        (
            "  sel_a: {Image|endswith: /nc}\n  sel_b: {Image|endswith: /ncat}\n"
            "  condition: 1 of sel_*",
            {"Image": "/usr/bin/ncat"},
            True,
        ),
        (
            "  sel_a: {Image|endswith: /nc}\n  sel_b: {CommandLine|contains: -e}\n"
            "  condition: all of sel_*",
            {"Image": "/usr/bin/nc", "CommandLine": "nc h 1"},
            False,
        ),
    ],
)
def test_modifiers_and_conditions(detection: str, fields: dict[str, Any], expected: bool) -> None:
    category = (
        "network_connection"
        if any(k.startswith(("Dest", "Source")) for k in fields)
        else ("process_creation")
    )
    assert matches(detection, fields, category) == expected


def test_unknown_field_is_refused_with_the_reason() -> None:
    rules = rule("  s: {TargetFilename|endswith: .sh}\n  condition: s")
    assert rules.rules == []
    ((where, why),) = rules.refused
    assert "test rule" in where and "TargetFilename" in why and "not provided" in why


def test_unknown_log_source_is_refused_with_the_reason() -> None:
    rules = RuleSet()
    load_text(
        """
title: windows rule
logsource: {product: windows, category: process_creation}
detection: {s: {Image|endswith: '\\\\cmd.exe'}, condition: s}
""",
        "w",
        rules,
    )
    assert rules.rules == []
    assert "product=windows" in rules.refused[0][1]


def test_broken_yaml_is_refused_not_fatal() -> None:
    rules = RuleSet()
    load_text("title: [unclosed", "broken.yml", rules)
    assert rules.rules == [] and rules.refused and rules.refused[0][0].startswith("broken.yml")


MINING_POOLS = "a46c93b7-55ed-4d27-a41b-c259456c4746"  # net_connection_lnx_crypto_mining_...
NGROK = "19bf6fdb-7721-4f3d-867f-53467f6a5db6"  # net_connection_lnx_ngrok_tunnel
LOCALTONET = "c4568f5d-131f-4e78-83d4-45b2da0ec4f1"  # net_connection_lnx_domain_localtonet_...


@pytest.mark.parametrize(
    ("hostname", "fired"),
    [
        ("pool.supportxmr.com", [MINING_POOLS]),
        ("XMR-EU1.nanopool.org", [MINING_POOLS]),
        ("pool.supportxmr.com.example.net", []),
        ("1.tcp.tunnel.us.ngrok.com", [NGROK]),
        ("abc123.localto.net", [LOCALTONET]),
        ("localto.net.example.org", []),
        ("github.com", []),
        ("", []),
    ],
)
def test_sigmahq_destination_hostname_rules_fire_on_the_resolved_name(
    hostname: str, fired: list[str]
) -> None:
    """SigmaHQ's Linux rules keyed on DestinationHostname, unchanged, against connects that
    carry the name the sandbox resolved (the collector's DNS view)."""
    engine = Engine(load_paths([SIGMAHQ]))
    connect = event_from_fields(
        "network_connection",
        {
            "Image": "/work/helper",
            "DestinationIp": "203.0.113.10",
            "DestinationPort": 443,
            "DestinationHostname": hostname,
        },
    )
    assert [a.rule_id for a in engine.feed(connect)] == fired


def test_real_sigmahq_rules_load_unchanged_and_fire() -> None:
    rules = load_paths([SIGMAHQ])
    assert rules.refused == []
    assert {r.id for r in rules.rules} == {
        "9069ea3c-b213-4c52-be13-86506a227ab1",
        "83dcd9f6-9ca8-4af7-a16e-a1c7a6b51871",
        MINING_POOLS,
        NGROK,
        LOCALTONET,
    }
    engine = Engine(rules)
    miner = event_from_fields(
        "process_creation",
        {
            "Image": "/tmp/.cache/kworker",
            "CommandLine": "kworker -o stratum+tcp://198.51.100.1:3333 -u W -p x --donate-level=0",
        },
    )
    shell = event_from_fields(
        "network_connection",
        {"Image": "/usr/bin/bash", "DestinationIp": "198.51.100.1", "DestinationPort": 4444},
    )
    benign = event_from_fields(
        "network_connection",
        {"Image": "/usr/bin/bash", "DestinationIp": "127.0.0.1", "DestinationPort": 8000},
    )
    assert [a.rule_id for a in engine.feed(miner)] == ["9069ea3c-b213-4c52-be13-86506a227ab1"]
    assert [a.rule_id for a in engine.feed(shell)] == ["83dcd9f6-9ca8-4af7-a16e-a1c7a6b51871"]
    assert engine.feed(benign) == []


# Greek capital and small sigmas, dotted and dotless I, the Kelvin sign, a combining mark,
# the separators and an apostrophe (case-ignorable): what lowering treats by context.
_TRICKY = "aA\u03a3\u03c3\u03c2\u0130\u0131K\u212a \0'-/\u00e9\u0345"
_ARG = st.binary(max_size=12) | st.text(alphabet=_TRICKY, max_size=8).map(str.encode)


@settings(max_examples=2000, deadline=None)
@given(st.lists(_ARG, max_size=5))
def test_argv_texts_from_joined_bytes_equal_joining_the_decoded_args(argv: list[bytes]) -> None:
    """command_line and lower_joined decode the joined bytes once and lower the whole; they
    must give exactly what decoding, lowering and joining each argument gives (the form
    FieldDict.joined and the rules' closures use), broken UTF-8 and final sigma included."""
    from detect.fieldcache import joined as _joined  # noqa: PLC0415
    from detect.fieldcache import lowered as _lower  # noqa: PLC0415
    from detect.fields import command_line, lower_joined  # noqa: PLC0415

    decoded = [a.decode("utf-8", "backslashreplace") for a in argv]
    assert command_line(argv) == " ".join(decoded)
    assert lower_joined(argv) == _joined(_lower(decoded))
    # and the expressions generated matchers inline for an exec event say the same
    import msgspec.structs  # noqa: PLC0415

    from detect.fields import EXEC_ARGV, GETTERS, LOWER_JOINED, RAW_JOINED  # noqa: PLC0415

    base = event_from_fields("process_creation", {"ProcessId": 1})
    event = msgspec.structs.replace(base, argv=argv, parent_argv=argv)
    getters = GETTERS[type(event)]
    assert getters["CommandLine"](event) == getters["ParentCommandLine"](event) == " ".join(decoded)
    assert getters["Argv"](event) == decoded
    assert LOWER_JOINED[EXEC_ARGV](event) == _joined(_lower(decoded))
    assert RAW_JOINED[EXEC_ARGV](event) == _joined(decoded)


_OPTION_REGEXES = [
    r"^-[a-zA-Z]*c$",
    r"^-[46AaCfGgKkMNnqsTtVvXxYy]*R",
    r"^--?(e|exec)$",
    r"x\d+",
    r"^/dev/(tcp|udp)/",
    r"(^|/)sh$",
    r"\bsh$",
]


@settings(max_examples=1500, deadline=None)
@given(
    st.lists(st.text(alphabet="-abcRxE/dv:tcpu0123\n\0 ", max_size=7), max_size=5),
    st.sampled_from(_OPTION_REGEXES),
    st.booleans(),
)
@example(["ls", "-xc\n"], r"^-[a-zA-Z]*c$", False)  # $ before a final newline
@example(["a-R", "-4R"], r"^-[46AaCfGgKkMNnqsTtVvXxYy]*R", True)
def test_one_search_over_the_joined_argv_never_misses_an_element_match(
    args: list[str], pattern: str, fold: bool
) -> None:
    """_element_search prefilters a per-element |re over Argv with one search of the
    NUL-joined arguments: whenever an element matches, the joined text must too (it may
    match more: the per-element test decides)."""
    import re  # noqa: PLC0415

    from detect.fields import nul_joined  # noqa: PLC0415
    from detect.regexes import element_search as _element_search  # noqa: PLC0415

    rx = re.compile(pattern, re.IGNORECASE if fold else 0)
    spread = _element_search(rx)
    if spread is None:  # an anchor inside: not rewritten, the per-element test runs alone
        assert pattern == r"(^|/)sh$"
        return
    if any(rx.search(a) for a in args):
        assert spread.search(nul_joined([a.encode() for a in args])) is not None


_PREFILTER_REGEXES = [
    r"\b[0-9]{1,3}(\.[0-9]{1,3}){3}:[0-9]{1,5}:[0-9]{1,3}(\.[0-9]{1,3}){3}:[0-9]{1,5}\b",
    r"(ab){2,}|abab",
    r"a.a(b|bb)",
    r"x(?i:AB)x",
    r"(a:|:a)+:",
    r"a{3}|b{2}a",
    r"(?:a.){2}[:.]",
]


@settings(max_examples=3000, deadline=None)
@given(
    st.text(alphabet="aAbBx:.12 ", max_size=24), st.sampled_from(_PREFILTER_REGEXES), st.booleans()
)
@example("1.2.3.4:5:6.7.8.9:1", _PREFILTER_REGEXES[0], False)
@example("xabx", r"x(?i:AB)x", False)
def test_a_regex_prefilter_never_turns_away_a_match(text: str, pattern: str, fold: bool) -> None:
    """Whatever text a |re matches holds a string of each of its required literal sets and
    each required character at least as many times as _required_counts says (on the
    lowered text when the pattern ignores case, as generated matchers test it)."""
    import re  # noqa: PLC0415

    from detect.regexes import required_counts as _required_counts  # noqa: PLC0415
    from detect.regexes import required_literal_sets as _required_literal_sets  # noqa: PLC0415

    rx = re.compile(pattern, re.IGNORECASE if fold else 0)
    if rx.search(text) is None:
        return
    seen = text.lower() if fold else text
    for needles in _required_literal_sets(rx):
        assert any(n in seen for n in needles), needles
    for ch, n in _required_counts(rx).items():
        assert seen.count(ch) >= n, (ch, n)


_CMDLINE_RULE = """
title: command line needles
id: 00000000-0000-4000-8000-0000000000c1
logsource: {product: linux, category: process_creation}
detection:
  words: {CommandLine|contains: [ab, 'b c', ' -x', 'Σa', 'd ']}
  word: {CommandLine|contains: 'c d'}
  rx: {CommandLine|re|i: 'a[bc]+ -x'}
  condition: words or word or rx
level: high
"""


@settings(max_examples=1500, deadline=None)
@given(
    st.lists(
        st.binary(max_size=6) | st.sampled_from([b"ab", b"-x", "ΑΣ".encode(), b"c d"]), max_size=5
    ),
    st.text(alphabet="abcd\u03a3\u03c3\u03c2-x\0 ", min_size=1, max_size=4),
)
def test_a_command_line_needle_is_found_in_the_argv_pass(argv: list[bytes], needle: str) -> None:
    """A lowered command line is its argv lowered and joined with spaces; the argv's form
    for the automaton is the same joined with NULs (and framed by them): a needle with
    neither holds in one exactly when it holds in the other, so generated matchers look for
    command-line needles in the argv's pass. And a rule on such needles (spaced ones too)
    says the same generated or compiled."""
    import msgspec.structs  # noqa: PLC0415

    from api.events import ExecEvent  # noqa: PLC0415
    from detect.codegen import generate_matcher  # noqa: PLC0415
    from detect.fieldcache import FieldDict  # noqa: PLC0415
    from detect.fields import EXEC_ARGV, GETTERS, LOWER_JOINED  # noqa: PLC0415

    base = event_from_fields("process_creation", {"ProcessId": 1})
    event = msgspec.structs.replace(base, argv=argv)
    assert isinstance(event, ExecEvent)
    command_line = GETTERS[ExecEvent]["CommandLine"](event).lower()
    joined = LOWER_JOINED[EXEC_ARGV](event)
    if " " not in needle and "\0" not in needle:
        assert (needle in command_line) == (needle in joined)
    rules = RuleSet()
    load_text(_CMDLINE_RULE, "t", rules)
    rule = rules.rules[0]
    getters = GETTERS[ExecEvent]
    expected = [0] if rule.test(FieldDict(event=event, getters=getters)) else []
    assert generate_matcher([rule], getters)(event) == expected


# The file that actually runs, whatever runs it: (exe, filename, argv, cwd) -> TargetImage.
@pytest.mark.parametrize(
    ("exe", "filename", "argv", "cwd", "expected"),
    [
        # a #! script: the kernel puts the name given to execve after the interpreter
        ("/usr/bin/bash", "/tmp/x.sh", ["/bin/bash", "/tmp/x.sh"], "/", "/tmp/x.sh"),
        ("/usr/bin/perl", "./s", ["/usr/bin/perl", "-w", "./s", "a"], "/dev/shm", "/dev/shm/s"),
        ("/usr/bin/env", "/tmp/a.py", ["/usr/bin/env", "python3", "/tmp/a.py"], "/", "/tmp/a.py"),
        # a script named on the interpreter's command line, after its options
        (
            "/usr/bin/python3.12",
            "/usr/bin/python3",
            ["python3", "-u", "-W", "ignore", "x.py"],
            "/var/tmp",
            "/var/tmp/x.py",
        ),
        (
            "/usr/bin/python3.12",
            "/usr/bin/python3",
            ["python3", "-Wd", "--", "../q.py"],
            "/srv/p/sub",
            "/srv/p/q.py",
        ),
        ("/usr/bin/dash", "/bin/sh", ["sh", "-ex", "/dev/shm/s"], "/", "/dev/shm/s"),
        (
            "/usr/bin/bash",
            "/bin/bash",
            ["bash", "-o", "pipefail", "+x", "./run.sh"],
            "/w",
            "/w/run.sh",
        ),
        ("/usr/bin/perl", "/usr/bin/perl", ["perl", "-x", "/tmp/mail.txt"], "/", "/tmp/mail.txt"),
        (
            "/usr/bin/perl",
            "/usr/bin/perl",
            ["perl", "-I", "lib", "-Mstrict", "t.pl"],
            "/w",
            "/w/t.pl",
        ),
        (
            "/usr/bin/ruby3.2",
            "/usr/bin/ruby",
            ["ruby", "-r", "socket", "/tmp/r.rb"],
            "/",
            "/tmp/r.rb",
        ),
        (
            "/usr/bin/node",
            "/usr/bin/node",
            ["node", "--require", "x", "--inspect=9229", "a.js"],
            "/w",
            "/w/a.js",
        ),
        (
            "/usr/bin/php8.2",
            "/usr/bin/php",
            ["php", "-d", "a=b", "-f", "/tmp/p.php"],
            "/",
            "/tmp/p.php",
        ),
        (
            "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            "/lib64/ld-linux-x86-64.so.2",
            ["/lib64/ld-linux-x86-64.so.2", "--library-path", "/x", "/tmp/prog"],
            "/",
            "/tmp/prog",
        ),
        # inline code, a module or stdin: no other file runs
        (
            "/usr/bin/python3.12",
            "/usr/bin/python3",
            ["python3", "-m", "venv", "x.py"],
            "/w",
            "/usr/bin/python3.12",
        ),
        (
            "/usr/bin/python3.12",
            "/usr/bin/python3",
            ["python3", "-Ic", "print(1)"],
            "/w",
            "/usr/bin/python3.12",
        ),
        ("/usr/bin/bash", "/bin/bash", ["bash", "-c", "./x.sh"], "/tmp", "/usr/bin/bash"),
        ("/usr/bin/bash", "/bin/bash", ["bash", "-s", "x.sh"], "/tmp", "/usr/bin/bash"),
        (
            "/usr/bin/perl",
            "/usr/bin/perl",
            ["perl", "-ne", "print", "/tmp/f"],
            "/",
            "/usr/bin/perl",
        ),
        (
            "/usr/bin/node",
            "/usr/bin/node",
            ["node", "--eval", "1", "/tmp/a.js"],
            "/",
            "/usr/bin/node",
        ),
        (
            "/usr/bin/python3.12",
            "/usr/bin/python3",
            ["python3", "-"],
            "/tmp",
            "/usr/bin/python3.12",
        ),
        # any other program is its own file
        ("/usr/bin/gcc-12", "/usr/bin/gcc", ["gcc", "/tmp/x.c"], "/tmp", "/usr/bin/gcc-12"),
    ],
)
def test_target_image_is_the_file_that_actually_runs(
    exe: str, filename: str, argv: list[str], cwd: str, expected: str
) -> None:
    fields = {"Image": exe, "ExecFileName": filename, "Argv": argv, "CurrentDirectory": cwd}
    event = event_from_fields("process_creation", fields)
    engine = Engine(rule(f"  selection:\n    TargetImage: '{expected}'\n  condition: selection"))
    assert [a.rule_id for a in engine.feed(event)] == ["00000000-0000-4000-8000-000000000001"]


def test_identity_and_standard_stream_fields() -> None:
    fields = {
        "Image": "/srv/w/helper",
        "OriginalFileName": "/usr/bin/ssh",
        "Sha256": "ab" * 32,
        "Stdio": ["tcp:203.0.113.7:4444", "tcp:203.0.113.7:4444", "pipe"],
        "CommandLine": "helper -R 9000:localhost:22 h",
    }
    detection = """  selection:
    OriginalFileName|endswith: /ssh
    Hashes: 'SHA256=ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB'
    StdinType: tcp
    StdoutPeer|fieldref: StdinPeer
    StderrType: pipe
    StderrPeer: ''
  condition: selection"""
    event = event_from_fields("process_creation", fields)
    assert len(Engine(rule(detection)).feed(event)) == 1
    go = event_from_fields("process_creation", {"Image": "/w/x", "GoModule": "github.com/a/b"})
    assert len(Engine(rule("  s:\n    OriginalFileName: github.com/a/b\n  condition: s")).feed(go))
    unknown = event_from_fields("process_creation", {"Image": "/w/x"})
    assert Engine(rule("  s:\n    StdinType: ''\n    Hashes: ''\n  condition: s")).feed(unknown)


def test_network_events_read_the_target_from_the_process_argv() -> None:
    fields = {"Image": "/usr/bin/python3.12", "CommandLine": "python3 -u /tmp/m.py"}
    event = event_from_fields("network_connection", fields)
    detection = "  s:\n    TargetImage|startswith: /tmp/\n  condition: s"
    assert len(Engine(rule(detection, "network_connection")).feed(event)) == 1
